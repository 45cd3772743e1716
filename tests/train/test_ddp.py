"""DDP: a 2-process gloo run started by torchrun on CPU matches the single-process run.

With --batch-size as the global batch, each rank takes half of every batch and DDP
averages the two half-batch gradients, which is the full-batch gradient: the weights
after training agree with a single-process run up to float rounding.
"""
import contextlib
import json
import os

import pytest
import torch

from drp_train import load_checkpoint
from drp_train.config import TrainConfig
from drp_train.train import train
from _helpers import make_idx_dataset, torchrun, torchrun_log

pytestmark = pytest.mark.slow  # trains several runs each


@pytest.mark.parametrize("method", ["ce", "drp"])
def test_two_process_gloo_matches_single_process(tmp_path, method):
    folder, _ = make_idx_dataset(str(tmp_path / "data"), n_train=200, n_test=50, seed=5)
    opts = dict(dataset="fashion-mnist", data_dir=folder, method=method, epochs=2, batch_size=32,
                limit_train=200, limit_test=50, proto_dim=16, seed=1, lr=0.02)
    single = tmp_path / "single"
    train(TrainConfig(**opts, out=str(single), quiet=True), progress=False)

    dist_out = tmp_path / "ddp"
    args = ["train"]
    for k, v in opts.items():
        args += ["--" + k.replace("_", "-"), str(v)]
    args += ["--out", str(dist_out), "--quiet"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = torchrun(["-m", "drp_train", *args], env=env)
    assert res.returncode == 0, torchrun_log(res)
    # only rank 0 writes: one summary line on stdout, one metrics line per epoch
    assert res.stdout.count("trained ") == 1, res.stdout
    rows = [json.loads(line) for line in (dist_out / "metrics.jsonl").read_text().splitlines()]
    ref_rows = [json.loads(line) for line in (single / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    # 200 samples in batches of 32: 6 full steps + one of 8, every sample counted once per epoch
    assert rows[-1]["global_step"] == ref_rows[-1]["global_step"] == 14
    for r, ref in zip(rows, ref_rows):
        assert r["train_loss"] == pytest.approx(ref["train_loss"], rel=1e-4)

    a = load_checkpoint(str(dist_out / "final.pt"))
    b = load_checkpoint(str(single / "final.pt"))
    for k in b["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], atol=1e-5, rtol=1e-4,
                                   msg=lambda m, k=k: f"{k}: {m}")
    assert not [n for n in os.listdir(dist_out) if n.startswith((".tmp-", ".drp-probe"))]


def test_two_process_certified_training_runs(tmp_path):
    # the mean shift uses each rank's own batch (like unsynchronised BatchNorm), so the weights
    # differ from a single process; the run must still train every parameter and end at p = inf
    folder, _ = make_idx_dataset(str(tmp_path / "data"), n_train=128, n_test=32, seed=6)
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = ["train", "--dataset", "fashion-mnist", "--data-dir", folder, "--method", "certified", "--depth", "2",
            "--width", "16", "--epochs", "2", "--batch-size", "32", "--cert-ce-weight", "0", "--out", str(out),
            "--quiet"]
    res = torchrun(["-m", "drp_train", *args], env=env)
    assert res.returncode == 0, torchrun_log(res)
    ckpt = load_checkpoint(str(out / "final.pt"))
    assert ckpt["model"]["_extra_state"]["head_p"] == float("inf")


@pytest.mark.parametrize("fails", [False, True])
def test_process_group_waits_for_the_other_ranks_only_after_a_normal_end(tmp_path, monkeypatch, fails):
    # a real one-process gloo group stands in for torchrun's: the barrier runs on a normal end (so
    # no rank tears the group down while another still writes or sends) and never after an error
    # (the other ranks may never reach it); the group is destroyed either way
    import torch.distributed as dist
    from drp_train import ddp

    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets; init is done here with one process
    calls = []
    monkeypatch.setattr(ddp, "setup", lambda device_type, timeout=None: (
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1),
        ddp.DistInfo(rank=0, world_size=1, backend="gloo", owns_group=True))[1])
    real_barrier = dist.barrier
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: (calls.append("barrier"), real_barrier(*a, **k))[1])
    try:
        with pytest.raises(RuntimeError, match="boom") if fails else contextlib.nullcontext():
            with ddp.process_group("cpu") as info:
                assert info.owns_group and dist.is_initialized()
                if fails:
                    raise RuntimeError("boom")
        assert calls == ([] if fails else ["barrier"])
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_process_group_outside_torchrun_is_a_single_process(monkeypatch):
    from drp_train import ddp

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with ddp.process_group("cpu") as info:
        assert not info.enabled and not info.owns_group and info.is_main
