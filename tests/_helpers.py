"""Helpers shared by the test files (import them from here; test files never import each other).

* ``DEVICE``: where tests put the tensors of the Triton kernels: "cuda" when a GPU is present,
  else "cpu" (where tests/conftest.py has set TRITON_INTERPRET=1 so the kernels run under the
  interpreter). A test that forces ``DRP_BACKEND=triton`` must build its inputs on ``DEVICE``;
  ``make lint`` checks this (tools/check_test_hygiene.py).
* ``REPO``: the repository root (tests live one or two folders below it).
* ``assert_verbose_allclose``: allclose that also matches NaN/inf placement and says where and
  by how much two tensors differ.
* ``assert_png``: a finished PNG file (signature, size, nothing temporary left beside it).
* ``make_idx_dataset``: a tiny learnable 10-class dataset in the real IDX file format.
* ``torchrun``: run a command under ``torch.distributed.run --standalone`` with 2 processes (Python's
  fault handler on, so a worker that aborts prints where); ``torchrun_log`` the part of its
  stderr a failed assertion shows (the workers' own lines first, then the launcher's tail).
* ``optional_hypothesis``: hypothesis's ``given``, ``settings``, ``st``, ``HealthCheck``, or
  stand-ins that skip the property tests when hypothesis (a test extra) is not installed.
"""
import gzip
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

__all__ = ["DEVICE", "REPO", "assert_verbose_allclose", "PNG_SIGNATURE", "png_size", "assert_png", "idx_bytes",
           "make_idx_dataset", "optional_hypothesis", "torchrun", "torchrun_log"]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REPO = Path(__file__).resolve().parents[1]


def assert_verbose_allclose(actual, expected, *, atol=1e-6, rtol=1e-5, max_print=5, name="tensor"):
    """allclose that also matches NaN/inf placement and says where and by how much it differs."""
    actual = torch.as_tensor(actual)
    expected = torch.as_tensor(expected)
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    nan_mismatch = torch.isnan(a) != torch.isnan(e)
    inf_mismatch = torch.isinf(a) != torch.isinf(e)
    inf_sign = torch.isinf(a) & torch.isinf(e) & (torch.sign(a) != torch.sign(e))
    finite = torch.isfinite(a) & torch.isfinite(e)
    diff = torch.zeros_like(a)
    diff[finite] = (a[finite] - e[finite]).abs()
    tol_bad = finite & (diff > atol + rtol * e.abs())
    bad = nan_mismatch | inf_mismatch | inf_sign | tol_bad
    if bad.any():
        idx = bad.nonzero()[:max_print]
        lines = [
            f"{name}: {int(bad.sum())} of {a.numel()} elements differ "
            f"(atol={atol}, rtol={rtol}, max abs diff {diff.max().item():.3e})"
        ]
        for i in idx:
            t = tuple(i.tolist())
            lines.append(f"  at {t}: actual {a[t].item()!r}, expected {e[t].item()!r}")
        raise AssertionError("\n".join(lines))


# -------------------------------------------------------------------------------- PNG files
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path):
    """(width, height) of a PNG file, checking its signature and IHDR chunk."""
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert head[12:16] == b"IHDR", f"{path}: no IHDR chunk"
    return struct.unpack(">II", head[16:24])


def assert_png(path, *, min_bytes=5000, min_side=200):
    """``path`` is a complete PNG of at least min_side pixels a side and min_bytes bytes, written
    atomically (no ``.tmp-`` file left in its folder)."""
    path = os.fspath(path)
    assert os.path.isfile(path), f"{path} does not exist"
    w, h = png_size(path)
    assert w > min_side and h > min_side, f"{path}: {w}x{h} pixels"
    assert os.path.getsize(path) > min_bytes, f"{path}: only {os.path.getsize(path)} bytes"
    leftovers = [f for f in os.listdir(os.path.dirname(os.path.abspath(path))) if f.startswith(".tmp-")]
    assert not leftovers, f"temporary files left beside {path}: {leftovers}"


# ----------------------------------------------------------------------------- IDX datasets
def idx_bytes(array):
    """The IDX encoding (big-endian header, uint8 data) of an array."""
    array = np.asarray(array, dtype=np.uint8)
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


def make_idx_dataset(folder, *, n_train=256, n_test=128, seed=0, gz=True):
    """Write a learnable 10-class 28x28 dataset as IDX files; return (folder, arrays)."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        y = rng.integers(0, 10, n).astype(np.uint8)
        x = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for i, k in enumerate(y):  # a bright bar whose row depends on the class
            x[i, 2 + 2 * k:4 + 2 * k, 4:24] = 230
        for kind, arr in (("images-idx3", x), ("labels-idx1", y)):
            raw = idx_bytes(arr)
            name = f"{prefix}-{kind}-ubyte"
            if gz:
                with gzip.open(os.path.join(folder, name + ".gz"), "wb") as f:
                    f.write(raw)
            else:
                with open(os.path.join(folder, name), "wb") as f:
                    f.write(raw)
        out[prefix] = (x, y)
    return folder, out


# ------------------------------------------------------------------------------- hypothesis
class _Anything:
    """Stands in for ``hypothesis.strategies`` / ``HealthCheck``: every attribute and call is inert."""

    def __getattr__(self, name):
        return _Anything()

    def __call__(self, *args, **kwargs):
        return _Anything()


def optional_hypothesis():
    """(given, settings, st, HealthCheck); without hypothesis, ``given`` marks its test skipped."""
    try:
        from hypothesis import HealthCheck, given, settings
        from hypothesis import strategies as st
    except ImportError:
        skip = pytest.mark.skip(reason="needs hypothesis (pip install 'drp_kernels[test]')")

        def given(*args, **kwargs):
            return lambda fn: skip(fn)

        def settings(*args, **kwargs):
            return lambda fn: fn

        return given, settings, _Anything(), _Anything()
    return given, settings, st, HealthCheck


# ----------------------------------------------------------------- Fashion-MNIST and small models
FMNIST_DIR = os.environ.get("FMNIST_DIR", "/usr/share/datasets/fashion-mnist")


def load_fmnist(kind, n):
    """The first n images (float32 in [0, 1], N x 1 x 28 x 28) and labels (int64) of an IDX split
    ("train" or "t10k") of the installed Fashion-MNIST."""
    with gzip.open(os.path.join(FMNIST_DIR, f"{kind}-images-idx3-ubyte.gz")) as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)[:n]
    with gzip.open(os.path.join(FMNIST_DIR, f"{kind}-labels-idx1-ubyte.gz")) as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)[:n]
    return torch.from_numpy(images.astype(np.float32) / 255.0), torch.from_numpy(labels.astype(np.int64))


def small_cnn(out=10):
    """The attack tests' CNN for 28 x 28 inputs (conv 16, conv 32, both stride 2; FC 100)."""
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(1, 16, 4, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 4, 2, 1), nn.ReLU(), nn.Flatten(),
        nn.Linear(32 * 7 * 7, 100), nn.ReLU(), nn.Linear(100, out))


def train_small(model, loss_fn, x, y, *, epochs=2):
    """Adam (lr 1e-3), batches of 64 in a seeded order; ``loss_fn(x_batch, y_batch)`` returns the
    loss. Clears the parameter gradients and returns ``model`` in eval mode."""
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(epochs):
        perm = torch.randperm(x.shape[0], generator=g)
        for i in range(0, x.shape[0], 64):
            b = perm[i:i + 64]
            loss = loss_fn(x[b], y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    for p in model.parameters():
        p.grad = None
    return model.eval()


class NoisyLogits(torch.nn.Module):
    """A randomised model: ``net(x)`` plus Gaussian noise of standard deviation ``scale``."""

    def __init__(self, net, scale=0.5):
        super().__init__()
        self.net = net
        self.scale = scale

    def forward(self, x):
        out = self.net(x)
        return out + self.scale * torch.randn_like(out)


def torchrun(argv, *, env=None, nproc=2, timeout=300):
    """``python -m torch.distributed.run --standalone --nproc_per_node nproc *argv``, output captured.

    PYTHONFAULTHANDLER=1 makes a worker killed by a fatal signal (SIGABRT, SIGSEGV) print the Python
    stack of every thread, which the launcher's own report does not show."""
    env = dict(os.environ if env is None else env, PYTHONFAULTHANDLER="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(nproc), *map(str, argv)], capture_output=True, text=True, env=env, timeout=timeout)


def torchrun_log(res, *, head=6000, tail=3000):
    """The start of a torchrun's stderr (what the workers printed) and its end (the launcher's summary)."""
    err = res.stderr
    if len(err) <= head + tail:
        return err
    return f"{err[:head]}\n[... {len(err) - head - tail} characters ...]\n{err[-tail:]}"
