"""Shared test set-up.

Without a GPU the Triton kernels run under the interpreter: TRITON_INTERPRET must
be set before triton decorates any kernel, so it is set here, before any test
module imports drp_kernels.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


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


@pytest.fixture
def verbose_allclose():
    return assert_verbose_allclose
