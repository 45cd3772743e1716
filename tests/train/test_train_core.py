"""drp_train core: config, models, every method end to end, checkpoints, load_classifier, faults."""
import json
import math
import os
import pickle
import time

import pytest
import torch

import drp_kernels
import drp_train
from drp_train import checkpoint as ckpt_mod
from drp_train import run_folder
from drp_train import train as train_mod
from drp_train.optim import lr_factor, make_scheduler
from drp_train.train import train as run_train
from drp_train.config import TrainConfig, apply_preset
from drp_train.errors import CheckpointError, ConfigError, NonFiniteLossError, OutputDirError
from drp_train.models import build_model
from _helpers import REPO, make_idx_dataset

METHODS = ["drp", "ce", "pgd-at", "trades", "fast-at"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    folder, _ = make_idx_dataset(str(tmp_path_factory.mktemp("fmnist")), n_train=192, n_test=96, seed=0)
    return folder


def tiny_cfg(data_dir, out, **kw):
    base = dict(dataset="fashion-mnist", data_dir=data_dir, epochs=1, batch_size=64, limit_train=192,
                limit_test=96, out=str(out), quiet=True, attack_steps=2, proto_dim=16)
    base.update(kw)
    return TrainConfig(**base)


# ----------------------------------------------------------------------------- config
def test_config_plain_data_roundtrip_and_defaults():
    cfg = TrainConfig(method="pgd-at")
    d = cfg.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert TrainConfig.from_dict(d) == cfg
    r = cfg.resolved()
    assert r.model == "cnn" and r.eps == 0.1 and r.proto_dim == 100 and r.augment is False
    assert math.isclose(r.attack_alpha, 2.5 * 0.1 / 10)
    assert TrainConfig(method="fast-at").resolved().attack_alpha == pytest.approx(0.125)
    assert (TrainConfig().resolved().weight_decay, r.weight_decay) == (5e-5, 5e-4)
    assert TrainConfig().resolved().proto_method == "box"
    assert (TrainConfig().resolved().lr, r.lr) == (0.2, 0.05)
    assert TrainConfig(proto_method="paper").resolved().lr == 0.01  # the paper's unbounded prototypes
    c10 = TrainConfig(dataset="cifar10").resolved()
    assert c10.model == "resnet18" and c10.eps == pytest.approx(8 / 255) and c10.augment is True
    assert TrainConfig(dataset="cifar100").resolved().proto_dim == 500
    p = apply_preset("paper-cifar10", {"epochs": 3})
    assert (p.dataset, p.proto_dim, p.metric, p.epochs, p.preset) == ("cifar10", 100, "linf", 3, "paper-cifar10")
    assert apply_preset("paper-cifar100", {}).proto_dim == 500
    with pytest.raises(ConfigError, match="unknown training config keys: bogus"):
        TrainConfig.from_dict({"bogus": 1})


@pytest.mark.parametrize("field, value, match", [
    ("epochs", 0, "--epochs must be >= 1"),
    ("eps", -0.1, "--eps must be >= 0"),
    ("proto_dim", 0, "--proto-dim must be >= 1"),
    ("lr", 0.0, "--lr must be > 0"),
    ("method", "sgd", "--method must be one of"),
    ("amp", "fp8", "--amp must be one of"),
    ("batch_size", 2.5, "--batch-size must be an integer"),
    ("momentum", 1.0, "--momentum must be < 1"),
    ("limit_train", 0, "--limit-train must be >= 1"),
    ("lr_hold", 1.0, "--lr-hold must be < 1"),
    ("lr_hold", -0.5, "--lr-hold must be >= 0"),
])
def test_config_rejects_impossible_values(field, value, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig(**{field: value}).resolved()


def test_lr_schedules():
    cos = lr_factor("cosine", 100)
    assert cos(0) == 1.0 and cos(50) == pytest.approx(0.5) and cos(100) == pytest.approx(0.0)
    cyc = lr_factor("cyclic", 100)
    assert cyc(39) == pytest.approx(1.0) and cyc(19) == pytest.approx(0.5) and cyc(99) == pytest.approx(0.0)
    ms = lr_factor("multistep", 100)
    assert (ms(49), ms(50), ms(74), ms(75)) == (1.0, pytest.approx(0.1), pytest.approx(0.1), pytest.approx(0.01))


def test_lr_hold_keeps_the_base_lr_then_runs_the_schedule_over_the_rest():
    held = lr_factor("cosine", 100, hold=0.2)
    assert [held(t) for t in (0, 10, 19)] == [1.0, 1.0, 1.0]
    assert held(20) == 1.0 and held(60) == pytest.approx(0.5) and held(100) == pytest.approx(0.0)
    ms = lr_factor("multistep", 100, hold=0.2)  # steps at 20 + 40 and 20 + 60
    assert (ms(59), ms(60), ms(80)) == (1.0, pytest.approx(0.1), pytest.approx(0.01))
    assert lr_factor("cosine", 100, hold=0.0)(50) == pytest.approx(0.5)
    assert lr_factor("cosine", 1, hold=0.9)(0) == 1.0  # too short to hold: the schedule alone
    for bad in (1.0, -0.1):
        with pytest.raises(ConfigError, match="--lr-hold must be in"):
            lr_factor("cosine", 100, hold=bad)
    # the scheduler a run builds from its config follows the same factors
    cfg = TrainConfig(lr=0.1, lr_hold=0.25, schedule="cosine").resolved()
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = make_scheduler(cfg, opt, 8)
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expect = [0.1 * lr_factor("cosine", 8, hold=0.25)(t) for t in range(8)]
    assert lrs[:2] == [0.1, 0.1] and lrs == pytest.approx(expect) and lrs[2] == pytest.approx(0.1)
    assert lrs[3] < 0.1


# ----------------------------------------------------------------------------- models
@pytest.mark.parametrize("name, channels, size", [
    ("cnn", 1, 28), ("resnet18", 3, 32), ("preact-resnet18", 3, 32), ("wrn-34-10", 3, 32)])
def test_build_model_shapes_and_normalisation(name, channels, size):
    torch.manual_seed(0)
    model = build_model(name, in_channels=channels, num_classes_or_dim=7, input_size=size,
                        mean=[0.25] * channels, std=[0.5] * channels).eval()
    x = torch.rand(2, channels, size, size)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    norm = model[0]
    assert torch.allclose(norm(x), (x - 0.25) / 0.5)
    with pytest.raises(ValueError, match="num_classes_or_dim"):
        build_model(name, in_channels=channels, num_classes_or_dim=0, input_size=size)


def test_build_model_rejects_unknown():
    with pytest.raises(ValueError, match="model must be one of"):
        build_model("vgg", in_channels=1, num_classes_or_dim=10, input_size=28)


# ----------------------------------------------------------------------------- every method
@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_and_round_trips(tiny_dir, tmp_path, method):
    extra = {} if method == "drp" else dict(lr=0.1)
    cfg = tiny_cfg(tiny_dir, tmp_path / method, method=method, epochs=2, batch_size=16,
                   augment=(method == "drp"), **extra)
    result = run_train(cfg, progress=False)
    out = tmp_path / method
    assert result["out"] == str(out) and result["checkpoint"] == str(out / "final.pt")
    assert result["train_time_s"] > 0
    for name in ("final.pt", "last.pt", "config.json", "metrics.jsonl"):
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    for r in rows:
        for key in ("lr", "train_loss", "train_accuracy", "test_accuracy", "epoch_time_s"):
            assert isinstance(r[key], float) and math.isfinite(r[key]), key
    assert rows[-1] == result["final"]
    assert json.loads((out / "config.json").read_text())["method"] == method

    # load_classifier: the right type, eval mode, and exactly the accuracy measured in training
    clf = drp_train.load_classifier(str(out))
    assert not clf.training
    if method == "drp":
        assert isinstance(clf, drp_kernels.ProtoClassifier)
        data = drp_train.load_checkpoint(str(out / "final.pt"))
        assert torch.equal(clf.prototypes, data["prototypes"]) and clf.metric == "linf"
        assert data["prototypes"].shape == (10, 16)
    else:
        assert not isinstance(clf, drp_kernels.ProtoClassifier)
    x, y = drp_train.load_dataset("fashion-mnist", split="test", data_dir=tiny_dir, limit=96)
    with torch.no_grad():
        logits = clf(x.float() / 255)
    assert logits.shape == (96, 10)
    acc = (logits.argmax(1) == y).double().mean().item()
    assert acc == pytest.approx(rows[-1]["test_accuracy"], abs=1e-12)
    if method == "drp":
        # 12 steps on 192 synthetic images: the loss falls; accuracy is not yet meaningful
        assert rows[1]["train_loss"] < rows[0]["train_loss"]
    else:
        assert acc > 0.3, f"{method} did not learn the synthetic task (test accuracy {acc})"
    same = drp_train.load_classifier(str(out / "last.pt"))
    with torch.no_grad():
        assert torch.equal(same(x.float() / 255), logits)


def test_drp_with_prototype_file_and_cosine(tiny_dir, tmp_path):
    P = drp_kernels.repulsive_prototypes(10, 12, metric="cosine", seed=3)
    path = str(tmp_path / "protos.pt")
    drp_kernels.save_prototypes(P, path)
    cfg = tiny_cfg(tiny_dir, tmp_path / "run", method="drp", metric="cosine", prototypes=path, proto_dim=None)
    run_train(cfg, progress=False)
    # the file's dimension is the run's: recorded in config.json and the checkpoint
    assert json.loads((tmp_path / "run" / "config.json").read_text())["proto_dim"] == 12
    with pytest.raises(ConfigError, match="--proto-dim 16 disagrees"):
        run_train(tiny_cfg(tiny_dir, tmp_path / "run3", metric="cosine", prototypes=path), progress=False)
    clf = drp_train.load_classifier(str(tmp_path / "run"))
    assert clf.metric == "cosine" and torch.equal(clf.prototypes, torch.as_tensor(P, dtype=torch.float32))
    bad = str(tmp_path / "bad.pt")
    drp_kernels.save_prototypes(torch.randn(9, 12), bad)
    with pytest.raises(ConfigError, match=r"shape \(9, 12\), expected \(10, D\)"):
        run_train(tiny_cfg(tiny_dir, tmp_path / "run2", prototypes=bad), progress=False)


# ----------------------------------------------------------------------------- faults
def test_nan_loss_stops_with_a_clear_error_and_no_checkpoint(tiny_dir, tmp_path):
    cfg = tiny_cfg(tiny_dir, tmp_path / "nan", method="ce", lr=1e30, momentum=0.0, epochs=2)
    with pytest.raises(NonFiniteLossError, match=r"at epoch 1 step \d+ .*without saving a checkpoint"):
        run_train(cfg, progress=False)
    assert not (tmp_path / "nan" / "last.pt").exists()
    assert not (tmp_path / "nan" / "final.pt").exists()


def test_unwritable_out_fails_before_training(tiny_dir, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    calls = []
    monkeypatch.setattr(train_mod, "load_dataset", lambda *a, **k: calls.append(1))
    with pytest.raises(OutputDirError, match="cannot be created") as info:
        run_train(tiny_cfg(tiny_dir, blocker / "run"), progress=False)
    assert str(blocker / "run") in str(info.value)

    class Usage:
        free = 1 << 20
    monkeypatch.setattr(run_folder.shutil, "disk_usage", lambda path: Usage())
    with pytest.raises(OutputDirError, match="MiB free but the checkpoints need"):
        run_train(tiny_cfg(tiny_dir, tmp_path / "full"), progress=False)
    assert not calls, "the dataset was loaded although --out was unusable"


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions")
def test_read_only_out_fails_before_training(tiny_dir, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(OutputDirError, match="not writable"):
            run_train(tiny_cfg(tiny_dir, ro), progress=False)
    finally:
        ro.chmod(0o700)


def test_out_with_a_run_needs_resume(tiny_dir, tmp_path):
    cfg = tiny_cfg(tiny_dir, tmp_path / "r", method="ce")
    first = run_train(cfg, progress=False)
    with pytest.raises(OutputDirError, match="already holds a run"):
        run_train(cfg, progress=False)
    cfg.resume = True
    again = run_train(cfg, progress=False)  # already finished: nothing to do
    assert again["final"] == first["final"]
    cfg.lr = 0.5
    with pytest.raises(CheckpointError, match="trained with other options: lr"):
        run_train(cfg, progress=False)


# ----------------------------------------------------------------------------- checkpoints
def test_checkpoint_is_plain_data_and_complete(tiny_dir, tmp_path):
    run_train(tiny_cfg(tiny_dir, tmp_path / "c", method="drp"), progress=False)
    path = str(tmp_path / "c" / "final.pt")
    data = torch.load(path, weights_only=True)  # would raise on anything but plain data
    assert data["kind"] == "drp_train.checkpoint" and data["format"] == 1 and data["final"] is True
    for key in ("model", "optimizer", "scheduler", "epoch", "rng", "prototypes", "config", "metrics"):
        assert key in data, key
    assert data["epoch"] == 1 and TrainConfig.from_dict(data["config"]).method == "drp"
    assert set(data["rng"]) == {"torch", "cuda", "python", "numpy"}
    assert not [n for n in os.listdir(tmp_path / "c") if n.startswith(".tmp-")]


class Evil:
    def __reduce__(self):
        return (os.system, ("true",))


def test_load_checkpoint_refuses_non_plain_wrong_kind_and_corrupt(tmp_path):
    evil = str(tmp_path / "evil.pt")
    torch.save({"kind": "drp_train.checkpoint", "format": 1, "x": Evil()}, evil)
    with pytest.raises(CheckpointError, match="needs more than plain data") as info:
        drp_train.load_checkpoint(evil)
    assert evil in str(info.value)
    other = str(tmp_path / "other.pt")
    torch.save({"state_dict": {}}, other)
    with pytest.raises(CheckpointError, match="not a drp_train checkpoint"):
        drp_train.load_classifier(other)
    corrupt = str(tmp_path / "corrupt.pt")
    with open(corrupt, "wb") as f:
        f.write(b"\x80\x02garbage")
    with pytest.raises(CheckpointError, match="corrupt.pt"):
        drp_train.load_checkpoint(corrupt)
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        drp_train.load_classifier(str(tmp_path))
    with pytest.raises(CheckpointError, match="does not exist"):
        drp_train.load_checkpoint(str(tmp_path / "missing.pt"))
    pickled = str(tmp_path / "pickled.pt")
    with open(pickled, "wb") as f:
        pickle.dump({"kind": "drp_train.checkpoint"}, f)
    with pytest.raises(CheckpointError):
        drp_train.load_checkpoint(pickled)


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    path = str(tmp_path / "f.pt")
    ckpt_mod.save_checkpoint(path, {"config": {}, "model": {}, "v": 1})

    def boom(f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")
    with pytest.raises(OSError):
        ckpt_mod.atomic_write(path, boom)
    assert torch.load(path, weights_only=True)["v"] == 1
    assert os.listdir(tmp_path) == ["f.pt"]


# ----------------------------------------------------------------------------- timing
@pytest.mark.slow
def test_epoch_timing_counts_the_whole_epoch_with_periodic_checkpoints(tiny_dir, tmp_path, monkeypatch):
    # 6 steps of 32, each followed by a 0.1 s sleep: each epoch lasts at least 0.6 s, however
    # often a mid-epoch checkpoint restarts a timer.
    real_step = train_mod._Trainer._step

    def slow_step(self, *args, **kwargs):
        loss = real_step(self, *args, **kwargs)
        time.sleep(0.1)
        return loss
    monkeypatch.setattr(train_mod._Trainer, "_step", slow_step)
    cfg = tiny_cfg(tiny_dir, tmp_path / "t", method="ce", epochs=2, batch_size=32, checkpoint_every=2)
    result = run_train(cfg, progress=False)
    for row in result["metrics"]:
        assert row["epoch_time_s"] >= 0.6, row
        assert row["samples_per_s"] == pytest.approx(192 / row["epoch_time_s"], rel=1e-9)
        assert row["samples_per_s"] <= 192 / 0.6
    assert result["train_time_s"] >= sum(r["epoch_time_s"] for r in result["metrics"]) - 1e-9


# ----------------------------------------------------------------------------- one source of defaults
def test_presets_and_compare_settings_derive_from_trainconfig():
    from drp_train import compare
    from drp_train.config import PRESETS, describe_default

    d = TrainConfig()
    for name, preset in compare.PRESETS.items():
        assert preset["batch_size"] == d.resolved().batch_size, name
        assert preset["dataset"] == d.dataset, name
        # None: drp train resolves it per dataset and method, exactly as a plain `drp train` would
        assert preset["lr"] is None and preset["model"] is None and preset["train_eps"] is None, name
    assert compare.PRESETS["demo"]["methods"] == ["ce", "drp-linf", "pgd-at", "certified"]
    assert compare.PRESETS["full"]["methods"] == list(compare.DEFAULT_METHODS)
    # the fmnist preset of drp train is the plain defaults on Fashion-MNIST
    assert apply_preset("fmnist", {}).resolved() == TrainConfig(dataset="fashion-mnist", preset="fmnist").resolved()
    for preset in PRESETS.values():
        TrainConfig(**preset).resolved()  # every preset is a valid config
    assert describe_default("epochs") == str(d.epochs)
    with pytest.raises(ConfigError, match="unknown options: bogus"):
        from drp_train.config import _preset
        _preset(bogus=1)


def test_certified_preset_is_the_committed_headline_recipe():
    # `drp train --preset certified-fmnist` reproduces results/fashion-mnist/certified: every option
    # of its config.json but the run's own bookkeeping (output folder, checkpoint cadence, progress)
    committed = json.loads((REPO / "results" / "fashion-mnist" / "certified" / "config.json").read_text())
    preset = apply_preset("certified-fmnist", {}).resolved().to_dict()
    own = {"out", "checkpoint_every", "quiet", "resume", "preset", "data_dir", "device"}
    differ = {k: (preset[k], committed[k]) for k in committed if k not in own and preset[k] != committed[k]}
    assert not differ


def test_drp_defaults_use_bounded_prototypes():
    r = TrainConfig().resolved()
    assert (r.method, r.metric, r.proto_method) == ("drp", "linf", "box")
    assert TrainConfig(metric="cosine").resolved().proto_method == "default"
    paper = apply_preset("paper-cifar10", {}).resolved()
    assert paper.proto_method == "paper"
    with pytest.raises(ConfigError, match="--proto-dim 1 with --metric cosine"):
        TrainConfig(metric="cosine", proto_dim=1).resolved()
