"""drp_train.data: IDX and CIFAR loaders, the restricted unpickler, augmentation.

Also provides ``make_cifar_dataset`` (a tiny synthetic dataset in the real on-disk format);
``make_idx_dataset`` lives in tests/_helpers.py.
"""
import gzip
import os
import pickle

import numpy as np
import pytest
import torch

from _helpers import idx_bytes, make_idx_dataset
from drp_train import data as D
from drp_train.errors import DatasetError

FMNIST_DIR = "/usr/share/datasets/fashion-mnist"


# ----------------------------------------------------------------------------- writers
def _cifar_batch(rng, n, *, label_key, classes):
    return {
        b"batch_label": b"synthetic batch",
        label_key: [int(v) for v in rng.integers(0, classes, n)],
        b"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8),
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
    }


def make_cifar_dataset(parent, name, *, n_per_file=6, seed=0):
    """Write a tiny CIFAR-10 or CIFAR-100 python-pickle folder (protocol 2) under ``parent``."""
    rng = np.random.default_rng(seed)
    if name == "cifar10":
        folder = os.path.join(parent, "cifar-10-batches-py")
        files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
        label_key, classes = b"labels", 10
    else:
        folder = os.path.join(parent, "cifar-100-python")
        files = ["train", "test"]
        label_key, classes = b"fine_labels", 100
    os.makedirs(folder, exist_ok=True)
    batches = {}
    for fname in files:
        batch = _cifar_batch(rng, n_per_file, label_key=label_key, classes=classes)
        if name == "cifar100":
            batch[b"coarse_labels"] = [v // 5 for v in batch[label_key]]
        with open(os.path.join(folder, fname), "wb") as f:
            pickle.dump(batch, f, protocol=2)
        batches[fname] = batch
    return folder, batches


# ----------------------------------------------------------------------------- IDX
def test_idx_roundtrip_gz_and_raw(tmp_path):
    for gz in (True, False):
        folder, arrays = make_idx_dataset(str(tmp_path / f"d{gz}"), n_train=40, n_test=12, gz=gz)
        x, y = D.load_dataset("fashion-mnist", split="train", data_dir=folder)
        assert x.dtype == torch.uint8 and x.shape == (40, 1, 28, 28)
        assert y.dtype == torch.int64 and y.shape == (40,)
        assert torch.equal(x[:, 0], torch.from_numpy(arrays["train"][0]))
        assert torch.equal(y, torch.from_numpy(arrays["train"][1].astype(np.int64)))
        xt, yt = D.load_dataset("mnist", split="test", data_dir=folder, limit=5)
        assert xt.shape == (5, 1, 28, 28) and torch.equal(yt, torch.from_numpy(arrays["t10k"][1][:5].astype(np.int64)))


def test_drp_data_dir_env(tmp_path, monkeypatch):
    folder, arrays = make_idx_dataset(str(tmp_path / "env"), n_train=9, n_test=3, seed=3)
    monkeypatch.setenv("DRP_DATA_DIR", folder)
    x, y = D.load_dataset("fashion-mnist", split="test")
    assert x.shape[0] == 3 and torch.equal(y, torch.from_numpy(arrays["t10k"][1].astype(np.int64)))


def _write(path, raw, gz):
    if gz:
        raw = gzip.compress(raw)
    with open(path, "wb") as f:
        f.write(raw)


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("damage, expect", [
    ("truncated", "truncated or corrupt"),
    ("extra", "truncated or corrupt"),
    ("magic", "bad IDX magic"),
    ("ndim", "bad IDX magic"),
    ("header", "IDX header"),
    ("empty", "too short"),
])
def test_idx_corrupt_files_get_a_clear_error(tmp_path, gz, damage, expect):
    folder, _ = make_idx_dataset(str(tmp_path / "d"), n_train=20, n_test=5, gz=False)
    path = os.path.join(folder, "train-images-idx3-ubyte")
    raw = open(path, "rb").read()
    raw = {
        "truncated": raw[:-100],
        "extra": raw + b"\0" * 7,
        "magic": b"\x00\x00\x09\x03" + raw[4:],
        "ndim": b"\x00\x00\x08\x02" + raw[4:],
        "header": raw[:9],
        "empty": b"",
    }[damage]
    os.unlink(path)
    target = path + ".gz" if gz else path
    _write(target, raw, gz)
    D._CACHE.clear()
    with pytest.raises(DatasetError, match=expect) as info:
        D.load_dataset("fashion-mnist", data_dir=folder)
    assert target in str(info.value)


def test_idx_bad_gzip_and_mismatched_counts(tmp_path):
    folder, _ = make_idx_dataset(str(tmp_path / "d"), n_train=20, n_test=5)
    images = os.path.join(folder, "train-images-idx3-ubyte.gz")
    raw = open(images, "rb").read()
    with open(images, "wb") as f:
        f.write(raw[: len(raw) // 2])  # a cut download: valid gzip magic, truncated stream
    with pytest.raises(DatasetError, match="not a valid gzip file"):
        D.load_dataset("fashion-mnist", data_dir=folder)
    folder2, _ = make_idx_dataset(str(tmp_path / "e"), n_train=20, n_test=5)
    _write(os.path.join(folder2, "train-labels-idx1-ubyte.gz"), idx_bytes(np.zeros(19, np.uint8)), True)
    with pytest.raises(DatasetError, match="20 images but .* 19 labels"):
        D.load_dataset("fashion-mnist", data_dir=folder2)
    _write(os.path.join(folder2, "train-labels-idx1-ubyte.gz"), idx_bytes(np.full(20, 10, np.uint8)), True)
    with pytest.raises(DatasetError, match="outside 0..9"):
        D.load_dataset("fashion-mnist", data_dir=folder2)


def test_missing_dataset_names_path_and_remedy(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="apt-get install dataset-fashion-mnist") as info:
        D.load_dataset("fashion-mnist", data_dir=missing)
    assert missing in str(info.value)
    os.makedirs(missing)
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte"):
        D.load_dataset("fashion-mnist", data_dir=missing)
    with pytest.raises(DatasetError, match=r"cs\.toronto\.edu/~kriz/cifar\.html"):
        D.load_dataset("cifar10", data_dir=missing)
    with pytest.raises(DatasetError, match="cifar-100-python"):
        D.load_dataset("cifar100", data_dir=missing)
    with pytest.raises(DatasetError, match="dataset must be one of"):
        D.load_dataset("imagenet", data_dir=missing)
    with pytest.raises(DatasetError, match="split must be"):
        D.load_dataset("mnist", split="val", data_dir=missing)
    with pytest.raises(DatasetError, match="limit must be"):
        D.load_dataset("mnist", data_dir=missing, limit=0)


@pytest.mark.skipif(not os.path.isdir(FMNIST_DIR), reason="dataset-fashion-mnist is not installed")
def test_fashion_mnist_package():
    x, y = D.load_dataset("fashion-mnist", split="test")
    assert x.shape == (10000, 1, 28, 28) and x.dtype == torch.uint8
    assert torch.bincount(y).tolist() == [1000] * 10
    x2, _ = D.load_dataset("fashion-mnist", split="test", limit=7)
    assert torch.equal(x2, x[:7])


# ----------------------------------------------------------------------------- CIFAR
@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_loader_on_synthetic_folders(tmp_path, name):
    folder, batches = make_cifar_dataset(str(tmp_path), name, n_per_file=6, seed=1)
    label_key = b"labels" if name == "cifar10" else b"fine_labels"
    train_files = [f"data_batch_{i}" for i in range(1, 6)] if name == "cifar10" else ["train"]
    test_file = "test_batch" if name == "cifar10" else "test"
    for root in (str(tmp_path), folder):  # the parent or the folder itself
        D._CACHE.clear()
        x, y = D.load_dataset(name, split="train", data_dir=root)
        assert x.dtype == torch.uint8 and x.shape == (6 * len(train_files), 3, 32, 32)
        expected = np.concatenate([batches[f][b"data"] for f in train_files]).reshape(-1, 3, 32, 32)
        assert torch.equal(x, torch.from_numpy(expected))
        assert y.tolist() == sum((batches[f][label_key] for f in train_files), [])
        xt, yt = D.load_dataset(name, split="test", data_dir=root, limit=4)
        assert torch.equal(xt, torch.from_numpy(batches[test_file][b"data"][:4].reshape(-1, 3, 32, 32)))
        assert yt.tolist() == batches[test_file][label_key][:4]
    assert D.num_classes(name) == (10 if name == "cifar10" else 100)
    assert D.input_shape(name) == (3, 32, 32)


class _Payload:
    """Unpickling this would create a marker file (what a hostile pickle would do)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_refuses_a_hostile_cifar_batch(tmp_path):
    folder, _ = make_cifar_dataset(str(tmp_path), "cifar10", n_per_file=3)
    marker = tmp_path / "PWNED"
    batch = {b"data": np.zeros((3, 3072), np.uint8), b"labels": [0, 1, 2], b"evil": _Payload(str(marker))}
    path = os.path.join(folder, "data_batch_3")
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=2)
    # sanity check of the test itself: the plain unpickler would run the payload
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Payload(str(probe))))
    assert probe.exists()
    D._CACHE.clear()
    with pytest.raises(DatasetError, match="refused") as info:
        D.load_dataset("cifar10", data_dir=str(tmp_path))
    assert path in str(info.value) and "system" in str(info.value)
    assert not marker.exists()


def test_safe_unpickle_admits_only_arrays_and_plain_data(tmp_path):
    ok = tmp_path / "ok"
    obj = {b"a": np.arange(5, dtype=np.uint8), "b": [1, 2.5, "s", b"x", None, True], b"c": {"d": (1, 2)}}
    ok.write_bytes(pickle.dumps(obj, protocol=2))
    back = D.safe_unpickle(str(ok))
    assert np.array_equal(back[b"a"], obj[b"a"]) and back["b"] == obj["b"] and back[b"c"] == obj[b"c"]
    for bad_obj in (__import__("collections").OrderedDict(a=1), torch.nn.Linear):
        bad = tmp_path / "bad"
        bad.write_bytes(pickle.dumps(bad_obj, protocol=2))
        with pytest.raises(DatasetError, match="refused"):
            D.safe_unpickle(str(bad))
    trunc = tmp_path / "trunc"
    trunc.write_bytes(pickle.dumps(obj, protocol=2)[:30])
    with pytest.raises(DatasetError, match="truncated or corrupt"):
        D.safe_unpickle(str(trunc))


def test_cifar_wrong_content_is_rejected(tmp_path):
    folder, _ = make_cifar_dataset(str(tmp_path), "cifar100", n_per_file=3)
    with open(os.path.join(folder, "train"), "wb") as f:
        pickle.dump({b"data": np.zeros((3, 100), np.uint8), b"fine_labels": [0, 1, 2]}, f, protocol=2)
    with pytest.raises(DatasetError, match=r"shape \(N, 3072\)"):
        D.load_dataset("cifar100", data_dir=folder)
    with open(os.path.join(folder, "train"), "wb") as f:
        pickle.dump({b"data": np.zeros((3, 3072), np.uint8), b"labels": [0, 1, 2]}, f, protocol=2)
    D._CACHE.clear()
    with pytest.raises(DatasetError, match="fine_labels"):
        D.load_dataset("cifar100", data_dir=folder)


# ----------------------------------------------------------------------------- augmentation
def test_augment_batch_crops_and_flips_exactly():
    x = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    g = torch.Generator().manual_seed(5)
    out = D.augment_batch(x, generator=g, pad=2)
    assert out.dtype == torch.uint8 and out.shape == x.shape
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    flips = 0
    for i in range(x.shape[0]):
        windows = [(dy, dx, f) for dy in range(5) for dx in range(5) for f in (False, True)
                   if torch.equal(out[i], (lambda w: w.flip(2) if f else w)(padded[i, :, dy:dy + 8, dx:dx + 8]))]
        assert windows, f"sample {i} is not a (flipped) crop of its padded input"
        flips += any(w[2] for w in windows)
    assert 10 < flips < 54  # about half are flipped
    again = D.augment_batch(x, generator=torch.Generator().manual_seed(5), pad=2)
    assert torch.equal(out, again)
    assert torch.equal(D.augment_batch(x, generator=g, pad=0, flip=False), x)
