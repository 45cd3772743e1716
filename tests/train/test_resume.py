"""Kill-safe training: an interrupted run resumed with --resume ends with the same weights
(bitwise on CPU) as an uninterrupted one, including after a real SIGKILL in the middle of
an epoch and in the middle of a checkpoint write.

The killed runs are ``drp train`` in a subprocess with two sleeps patched in (``_SLOW_DRP``),
which widen the kill windows and change no result: after every optimiser step, and before a
finished checkpoint file is renamed into place.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from drp_train import load_checkpoint
from drp_train import train as train_mod
from drp_train.config import TrainConfig
from drp_train.train import train
from _helpers import make_idx_dataset

TIME_KEYS = {"epoch_time_s", "samples_per_s", "train_time_s"}

pytestmark = pytest.mark.slow  # trains several runs each


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder, _ = make_idx_dataset(str(tmp_path_factory.mktemp("fmnist-resume")), n_train=256, n_test=64, seed=4)
    return folder


def options(data_dir, method):
    opts = dict(dataset="fashion-mnist", data_dir=data_dir, method=method, epochs=2, batch_size=32,
                limit_train=256, limit_test=64, augment=True, attack_steps=2, seed=7, lr=0.02, checkpoint_every=3)
    if method == "certified":  # Adam, the p schedule and the p saved in the weights
        opts.update(depth=2, width=16)
    else:
        opts.update(proto_dim=16)
    return opts


def cli_args(opts, out):
    args = ["train"]
    for k, v in opts.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            args.append(flag if v else "--no-" + k.replace("_", "-"))
        else:
            args += [flag, str(v)]
    return args + ["--out", str(out), "--quiet"]


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    runs = {}

    def get(method):
        if method not in runs:
            out = tmp_path_factory.mktemp(f"ref-{method}")
            train(TrainConfig(**options(data_dir, method), out=str(out), quiet=True), progress=False)
            runs[method] = load_checkpoint(str(out / "final.pt"))
        return runs[method]
    return get


def assert_same_run(resumed, ref):
    assert resumed["epoch"] == ref["epoch"] and resumed["global_step"] == ref["global_step"]
    assert resumed["model"].keys() == ref["model"].keys()
    for k in ref["model"]:
        if isinstance(ref["model"][k], torch.Tensor):
            assert torch.equal(resumed["model"][k], ref["model"][k]), f"weights {k} differ after resume"
        else:
            assert resumed["model"][k] == ref["model"][k], k
    for i, state in ref["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(resumed["optimizer"]["state"][i][key]), torch.as_tensor(value)), key
    assert resumed["scheduler"]["last_epoch"] == ref["scheduler"]["last_epoch"]
    strip = [{k: v for k, v in m.items() if k not in TIME_KEYS} for m in ref["metrics"]]
    assert [{k: v for k, v in m.items() if k not in TIME_KEYS} for m in resumed["metrics"]] == strip


class _Crash(Exception):
    pass


def _hook_loss(monkeypatch, at_call, action):
    """Make the training method's loss run ``action()`` at its ``at_call``-th call (1-based); returns the
    real ``make_method``, to put back."""
    real = train_mod.make_method
    calls = {"n": 0}

    def hooked(cfg, **kw):
        m = real(cfg, **kw)
        loss = m.loss

        def wrapped(*a, **k):
            calls["n"] += 1
            if calls["n"] == at_call:
                action()
            return loss(*a, **k)
        m.loss = wrapped
        return m
    monkeypatch.setattr(train_mod, "make_method", hooked)
    return real


def _crash():
    raise _Crash()


@pytest.mark.parametrize("method", ["drp", "pgd-at", "certified"])
def test_resume_after_an_exception_mid_epoch_is_exact(data_dir, tmp_path, monkeypatch, reference, method):
    real = _hook_loss(monkeypatch, 13, _crash)  # epoch 2, step 5: after the step-12 checkpoint
    cfg = TrainConfig(**options(data_dir, method), out=str(tmp_path), quiet=True)
    with pytest.raises(_Crash):
        train(cfg, progress=False)
    monkeypatch.setattr(train_mod, "make_method", real)
    partial = load_checkpoint(str(tmp_path / "last.pt"))
    assert (partial["epoch"], partial["step"], partial["global_step"]) == (1, 4, 12)
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1
    cfg.resume = True
    result = train(cfg, progress=False)
    assert_same_run(load_checkpoint(result["checkpoint"]), reference(method))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]


_SLOW_DRP = """
import sys, time
from drp_train import checkpoint, cli, train
step_sleep, save_sleep = float(sys.argv[1]), float(sys.argv[2])
real_step, real_write = train._Trainer._step, checkpoint.atomic_write

def step(self, *args, **kwargs):
    loss = real_step(self, *args, **kwargs)
    time.sleep(step_sleep)
    return loss

def write(path, writer, **kwargs):
    def hold(f):
        writer(f)
        f.flush()
        time.sleep(save_sleep)
    return real_write(path, hold, **kwargs)

train._Trainer._step = step
checkpoint.atomic_write = write
sys.exit(cli.main(sys.argv[3:]))
"""


def _start(opts, out, *, step_sleep=0.0, save_sleep=0.0):
    """``drp train`` in a subprocess, sleeping ``step_sleep`` s after every optimiser step and holding
    every finished checkpoint file ``save_sleep`` s before its rename."""
    return subprocess.Popen([sys.executable, "-c", _SLOW_DRP, str(step_sleep), str(save_sleep),
                             *cli_args(opts, out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_for(cond, proc, timeout=180.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        if proc.poll() is not None:
            raise AssertionError(f"training ended (rc {proc.returncode}) before the kill: {proc.stderr.read()!r}")
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("timed out waiting for the kill window")


def _kill(proc):
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    proc.stdout.close()
    proc.stderr.close()


def test_sigkill_mid_epoch_then_resume(data_dir, tmp_path, reference):
    opts = options(data_dir, "drp")
    out = tmp_path / "run"
    proc = _start(opts, out, step_sleep=0.2)
    metrics = out / "metrics.jsonl"
    _wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 1, proc)
    time.sleep(0.5)  # a couple of steps into epoch 2
    _kill(proc)
    newest = load_checkpoint(str(out))  # the run folder resolves to last.pt
    assert newest["epoch"] == 1 and newest["final"] is False
    assert not (out / "final.pt").exists()
    resumed = train(TrainConfig(**opts, out=str(out), quiet=True, resume=True), progress=False)
    assert_same_run(load_checkpoint(resumed["checkpoint"]), reference("drp"))


def test_sigkill_during_a_checkpoint_write_then_resume(data_dir, tmp_path, reference):
    opts = options(data_dir, "drp")
    out = tmp_path / "run"
    proc = _start(opts, out, save_sleep=1.0)

    def writing_second_checkpoint():
        if not (out / "last.pt").exists():
            return False
        return any(n.startswith(".tmp-last.pt.") for n in os.listdir(out))
    _wait_for(writing_second_checkpoint, proc)
    _kill(proc)
    leftovers = [n for n in os.listdir(out) if n.startswith(".tmp-")]
    assert leftovers, "the kill did not land inside the checkpoint write"
    newest = load_checkpoint(str(out / "last.pt"))
    assert newest["global_step"] == 3  # the first periodic checkpoint, complete
    resumed = train(TrainConfig(**opts, out=str(out), quiet=True, resume=True), progress=False)
    assert not [n for n in os.listdir(out) if n.startswith(".tmp-")]
    assert_same_run(load_checkpoint(resumed["checkpoint"]), reference("drp"))


def test_ctrl_c_saves_the_step_and_resume_is_exact(data_dir, tmp_path, monkeypatch, reference):
    from drp_train.errors import TrainingInterrupted

    # epoch 2, step 3 (8 steps per epoch): Ctrl-C arrives during the step
    real = _hook_loss(monkeypatch, 11, lambda: signal.raise_signal(signal.SIGINT))
    opts = dict(options(data_dir, "drp"), checkpoint_every=0)
    cfg = TrainConfig(**opts, out=str(tmp_path), quiet=True)
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN under `nohup ... &`, default_int_handler in a terminal
    with pytest.raises(TrainingInterrupted, match=r"epoch 2 step 3.*--resume --out") as info:
        train(cfg, progress=False)
    assert str(tmp_path / "last.pt") in str(info.value)
    monkeypatch.setattr(train_mod, "make_method", real)
    saved = load_checkpoint(str(tmp_path / "last.pt"))
    # the step in flight finished, then the state was saved at the step boundary
    assert (saved["epoch"], saved["step"], saved["global_step"]) == (1, 3, 11)
    assert signal.getsignal(signal.SIGINT) is before  # the caller's handler is restored
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]
    resumed = train(TrainConfig(**opts, out=str(tmp_path), quiet=True, resume=True), progress=False)
    ref = reference("drp")
    got = load_checkpoint(resumed["checkpoint"])
    for k in ref["model"]:
        assert torch.equal(got["model"][k], ref["model"][k]), f"weights {k} differ after Ctrl-C and resume"


def test_ctrl_c_in_a_real_process_names_resume(data_dir, tmp_path):
    opts = dict(options(data_dir, "ce"), checkpoint_every=0)
    out = tmp_path / "run"
    proc = _start(opts, out, step_sleep=0.2)
    metrics = out / "metrics.jsonl"
    _wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 1, proc)
    time.sleep(0.5)  # a couple of steps into epoch 2
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    err = err.decode()
    assert proc.returncode == 130, err
    errors = [line for line in err.splitlines() if line.startswith("drp: error:")]
    assert len(errors) == 1 and "drp train --resume --out" in errors[0], err
    assert "Traceback" not in err
    saved = load_checkpoint(str(out / "last.pt"))
    assert saved["epoch"] == 1 and saved["step"] > 0 and saved["final"] is False
    assert not (out / "final.pt").exists()
