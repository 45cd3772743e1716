"""Datasets as uint8 tensors: Fashion-MNIST / MNIST (IDX) and CIFAR-10 / CIFAR-100 (pickle).

Nothing is downloaded and torchvision is not used.

- Fashion-MNIST is read from ``data_dir``, else ``$DRP_DATA_DIR``, else the Debian package
  ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``). MNIST reads the same
  IDX files (default ``/usr/share/datasets/mnist``).
- CIFAR-10 / CIFAR-100 are read from their python-pickle folders ``cifar-10-batches-py`` /
  ``cifar-100-python``; ``data_dir`` may be that folder or its parent.

Files are decoded once per process and kept as uint8 tensors (N, C, H, W). Security:
IDX headers are checked against the file size, and CIFAR pickles go through a restricted
unpickler that admits only the globals numpy arrays and bytes need; anything else is
refused before it can run.
"""
import gzip
import io
import os
import pickle
import struct
import zlib
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from .errors import DatasetError

__all__ = [
    "DatasetError",
    "DATASET_INFO",
    "load_dataset",
    "check_available",
    "num_classes",
    "input_shape",
    "normalization",
    "augment_batch",
    "validation_split",
    "safe_unpickle",
    "read_idx",
]

DEFAULT_DIRS = {
    "fashion-mnist": "/usr/share/datasets/fashion-mnist",
    "mnist": "/usr/share/datasets/mnist",
}

DATASET_INFO = {
    "fashion-mnist": dict(classes=10, shape=(1, 28, 28), mean=(0.2860,), std=(0.3530,)),
    "mnist": dict(classes=10, shape=(1, 28, 28), mean=(0.1307,), std=(0.3081,)),
    "cifar10": dict(classes=10, shape=(3, 32, 32), mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616)),
    "cifar100": dict(classes=100, shape=(3, 32, 32), mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762)),
}

_HOW_TO_GET = {
    "fashion-mnist": "install it with `sudo apt-get install dataset-fashion-mnist`, or pass --data-dir / set "
                     "DRP_DATA_DIR to a folder holding {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]",
    "mnist": "pass --data-dir / set DRP_DATA_DIR to a folder holding the MNIST files "
             "{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]",
    "cifar10": "download the python version from https://www.cs.toronto.edu/~kriz/cifar.html, unpack it and "
               "pass --data-dir pointing at cifar-10-batches-py or its parent",
    "cifar100": "download the python version from https://www.cs.toronto.edu/~kriz/cifar.html, unpack it and "
                "pass --data-dir pointing at cifar-100-python or its parent",
}

_CACHE = {}


def _info(name):
    if name not in DATASET_INFO:
        raise DatasetError(f"dataset must be one of {', '.join(DATASET_INFO)}, got {name!r}")
    return DATASET_INFO[name]


def num_classes(name: str) -> int:
    """Number of classes of dataset ``name``."""
    return _info(name)["classes"]


def input_shape(name: str) -> tuple:
    """(C, H, W) of one input of dataset ``name``."""
    return tuple(_info(name)["shape"])


def normalization(name: str) -> tuple:
    """Per-channel (mean, std) of dataset ``name`` for inputs in [0, 1]."""
    info = _info(name)
    return tuple(info["mean"]), tuple(info["std"])


def _root(name, data_dir):
    root = data_dir if data_dir is not None else os.environ.get("DRP_DATA_DIR") or DEFAULT_DIRS.get(name)
    if root is None:
        raise DatasetError(f"{name} needs --data-dir: {_HOW_TO_GET[name]}")
    root = os.path.abspath(os.path.expanduser(str(root)))
    if not os.path.isdir(root):
        raise DatasetError(f"{name} data folder {root} does not exist: {_HOW_TO_GET[name]}")
    return root


def check_available(name: str, *, data_dir: Optional[str] = None) -> str:
    """Cheaply check that the files of dataset ``name`` exist; return its folder.

    Raises DatasetError naming the path and how to obtain the data. Content is checked
    when the files are loaded.
    """
    _info(name)
    root = _root(name, data_dir)
    if name in ("fashion-mnist", "mnist"):
        for prefix in ("train", "t10k"):
            for kind in ("images-idx3", "labels-idx1"):
                _find_idx(root, f"{prefix}-{kind}-ubyte", name)
        return root
    folder = _cifar_folder(name, root)
    files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"] if name == "cifar10" else ["train", "test"]
    for fname in files:
        if not os.path.isfile(os.path.join(folder, fname)):
            raise DatasetError(f"{name} file {os.path.join(folder, fname)} not found: {_HOW_TO_GET[name]}")
    return folder


def load_dataset(name: str, *, split: str = "train", data_dir: Optional[str] = None,
                 limit: Optional[int] = None):
    """Return ``(x, y)``: x uint8 (N, C, H, W), y int64 (N,), the first ``limit`` samples if given.

    Raises DatasetError naming the path and how to obtain the data when the files are
    missing, corrupt or refused.
    """
    _info(name)
    if split not in ("train", "test"):
        raise DatasetError(f"split must be 'train' or 'test', got {split!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise DatasetError(f"limit must be a positive integer or None, got {limit!r}")
    root = _root(name, data_dir)
    if name in ("fashion-mnist", "mnist"):
        key = ("idx", name, root, split)
        loader = _load_idx_split
    else:
        key = ("cifar", name, root, split)
        loader = _load_cifar_split
    if key not in _CACHE:
        x, y = loader(name, root, split)
        _check_labels(name, y, root)
        _CACHE[key] = (x, y)
    x, y = _CACHE[key]
    if limit is not None:
        x, y = x[:limit], y[:limit]
    return x, y


def _check_labels(name, y, root):
    c = num_classes(name)
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= c):
        raise DatasetError(f"{name} labels in {root} fall outside 0..{c - 1}: the files are corrupt")


# ----------------------------------------------------------------------------- IDX
_IDX_TYPES = {0x08: np.uint8}


def read_idx(path: str, *, expect_ndim: int) -> np.ndarray:
    """Read one IDX file (optionally gzip-compressed), checking magic, dims and size."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DatasetError(f"cannot read {path}: {e.strerror}") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DatasetError(f"{path} is not a valid gzip file ({e}): the download is truncated or corrupt") from None
    if len(raw) < 4:
        raise DatasetError(f"{path} is too short ({len(raw)} bytes) to be an IDX file")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code not in _IDX_TYPES or ndim != expect_ndim:
        raise DatasetError(
            f"{path} has a bad IDX magic number 0x{raw[:4].hex()} "
            f"(expected 0x0000080{expect_ndim}: unsigned bytes, {expect_ndim} dimensions)"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"{path} is truncated inside its IDX header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(raw) != expected:
        raise DatasetError(
            f"{path} holds {len(raw)} bytes but its IDX header {list(dims)} needs {expected}: "
            "the file is truncated or corrupt"
        )
    return np.frombuffer(raw, dtype=_IDX_TYPES[dtype_code], offset=header).reshape(dims)


def _find_idx(root, stem, name):
    for candidate in (stem + ".gz", stem):
        p = os.path.join(root, candidate)
        if os.path.isfile(p):
            return p
    raise DatasetError(f"{name} file {os.path.join(root, stem)}[.gz] not found: {_HOW_TO_GET[name]}")


def _load_idx_split(name, root, split):
    prefix = "train" if split == "train" else "t10k"
    images_path = _find_idx(root, f"{prefix}-images-idx3-ubyte", name)
    labels_path = _find_idx(root, f"{prefix}-labels-idx1-ubyte", name)
    images = read_idx(images_path, expect_ndim=3)
    labels = read_idx(labels_path, expect_ndim=1)
    if images.shape[1:] != (28, 28):
        raise DatasetError(f"{images_path} holds images of {images.shape[1:]} pixels, expected 28x28")
    if images.shape[0] != labels.shape[0]:
        raise DatasetError(f"{images_path} holds {images.shape[0]} images but {labels_path} "
                           f"holds {labels.shape[0]} labels")
    x = torch.from_numpy(images.copy()).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    return x, y


# ----------------------------------------------------------------------------- CIFAR
# Exactly the globals that pickled numpy arrays (numpy 1.x or 2.x) and Python-3 bytes
# under protocol 2 refer to. Nothing here can run a command or touch files.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, *, path):
        super().__init__(file, encoding="bytes")
        self._path = path

    def find_class(self, module, name):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise DatasetError(
            f"{self._path} was refused: its pickle asks for {module}.{name}, which a CIFAR batch never "
            "needs (only numpy arrays, bytes, lists and dicts are admitted); the file may be hostile"
        )


def safe_unpickle(path: str):
    """Unpickle ``path`` admitting only numpy arrays, bytes, str, numbers, lists and dicts."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DatasetError(f"cannot read {path}: {e.strerror}") from None
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data), path=path).load()
    except DatasetError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError,
            AttributeError, struct.error, UnicodeDecodeError) as e:
        raise DatasetError(f"{path} is not a readable CIFAR pickle ({type(e).__name__}: {e}): "
                           "the file is truncated or corrupt") from None
    if isinstance(obj, np.ndarray) and obj.dtype == object:
        raise DatasetError(f"{path} was refused: it holds an object array")
    return obj


def _cifar_folder(name, root):
    sub = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
    marker = "data_batch_1" if name == "cifar10" else "train"
    for folder in (root, os.path.join(root, sub)):
        if os.path.isfile(os.path.join(folder, marker)):
            return folder
    raise DatasetError(f"{name} files not found in {root} (looked for {marker} there and in {sub}/): "
                       f"{_HOW_TO_GET[name]}")


def _get(d, key):
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    return None


def _load_cifar_file(path, label_key, name):
    d = safe_unpickle(path)
    if not isinstance(d, dict):
        raise DatasetError(f"{path} holds a {type(d).__name__}, expected a CIFAR batch dict")
    data = _get(d, "data")
    labels = _get(d, label_key)
    if data is None or labels is None:
        raise DatasetError(f"{path} lacks the 'data' or '{label_key}' entry of a {name} batch")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", None)
        raise DatasetError(f"{path}: 'data' must be a uint8 array of shape (N, 3072), got "
                           f"{type(data).__name__} {getattr(data, 'dtype', '')} {shape}")
    if not isinstance(labels, (list, np.ndarray)):
        raise DatasetError(f"{path}: '{label_key}' must be a list of ints, got {type(labels).__name__}")
    try:
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError):
        raise DatasetError(f"{path}: '{label_key}' must be a list of ints") from None
    if labels.shape[0] != data.shape[0]:
        raise DatasetError(f"{path} holds {data.shape[0]} images but {labels.shape[0]} labels")
    return data, labels


def _load_cifar_split(name, root, split):
    folder = _cifar_folder(name, root)
    if name == "cifar10":
        files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        label_key = "labels"
    else:
        files = ["train"] if split == "train" else ["test"]
        label_key = "fine_labels"
    xs, ys = [], []
    for fname in files:
        path = os.path.join(folder, fname)
        if not os.path.isfile(path):
            raise DatasetError(f"{name} file {path} not found: {_HOW_TO_GET[name]}")
        data, labels = _load_cifar_file(path, label_key, name)
        xs.append(data)
        ys.append(labels)
    x = torch.from_numpy(np.concatenate(xs).reshape(-1, 3, 32, 32).copy())
    y = torch.from_numpy(np.concatenate(ys))
    return x, y


# ----------------------------------------------------------------------------- validation split
#: The seed of the held-out validation split: fixed, so every run (any --seed) holds out the same images.
VALIDATION_SEED = 20261206


def validation_split(n: int, n_val: int):
    """(train indices, validation indices) of n training samples, n_val of them held out: a fixed
    random subset (the same for every run and seed), both index tensors sorted."""
    if not 0 < n_val < n:
        raise ValueError(f"n_val must be in [1, {n - 1}], got {n_val}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(VALIDATION_SEED))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


# ----------------------------------------------------------------------------- augmentation
def augment_batch(x: torch.Tensor, *, generator: torch.Generator, pad: int = 4, flip: bool = True) -> torch.Tensor:
    """Random crop with zero padding ``pad`` and random horizontal flip of a (N, C, H, W) batch.

    Works on any dtype (uint8 included) and device; the draws come from ``generator``
    (which must live on x's device), so a batch's augmentation is reproducible.
    """
    n, c, h, w = x.shape
    if n == 0:
        return x
    dev = x.device
    padded = F.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=dev)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=dev)
    rows = (oy[:, None] + torch.arange(h, device=dev))[:, None, :, None]
    cols = (ox[:, None] + torch.arange(w, device=dev))[:, None, None, :]
    out = padded[torch.arange(n, device=dev)[:, None, None, None], torch.arange(c, device=dev)[None, :, None, None],
                 rows, cols]
    if flip:
        do_flip = torch.rand(n, generator=generator, device=dev) < 0.5
        out = torch.where(do_flip[:, None, None, None], out.flip(3), out)
    return out
