"""Shared test set-up (helpers live in tests/_helpers.py).

Without a GPU the Triton kernels run under the interpreter: TRITON_INTERPRET must be set
before triton decorates any kernel, so it is set here, before any test module imports
drp_kernels. With a GPU, tests put the kernels' inputs on CUDA (``_helpers.DEVICE``);
``cuda``-marked tests are skipped without one.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from _helpers import DEVICE  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    """Where the kernels' inputs go: "cuda" with a GPU, else "cpu" (Triton interpreter)."""
    return DEVICE


@pytest.fixture
def triton_backend(monkeypatch):
    """Force the Triton kernels (DRP_BACKEND=triton); inputs must be on ``DEVICE``."""
    monkeypatch.setenv("DRP_BACKEND", "triton")


@pytest.fixture(scope="module")
def one_thread():
    """Small CNNs run far faster single-threaded, above all on a shared 2-core machine.
    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
