"""Backend selection shared by every op (the one reader of ``DRP_BACKEND``).

``DRP_BACKEND`` picks the implementation:
  auto       (default) Triton kernels for CUDA tensors; for CPU tensors the C++ kernels where an op
             has them (``lp_dist``), else the pure-PyTorch reference
  triton     always the Triton kernels; CPU tensors need ``TRITON_INTERPRET=1`` (how CI tests them)
  reference  always ``drp_kernels.reference``

Without the ``triton`` package (a CPU-only install) "auto" never picks Triton, and "triton"
raises a RuntimeError that says what to install.
"""
import math
import os

import torch

from .ops import _extension
from .ops._triton_utils import HAS_TRITON, interpreter_enabled

__all__ = ["BACKENDS", "backend_choice", "backend_for", "lp_dist_backend", "interpreter_enabled",
           "triton_available"]

BACKENDS = ("auto", "triton", "reference")


def backend_choice() -> str:
    """``DRP_BACKEND`` as one of ``BACKENDS`` (read at every call; unset or empty: "auto")."""
    choice = os.environ.get("DRP_BACKEND", "auto").strip().lower() or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"DRP_BACKEND must be one of {BACKENDS}, got {choice!r}")
    return choice


def triton_available() -> bool:
    """True when the triton package imports (the Triton kernels can run)."""
    return HAS_TRITON


def backend_for(*tensors: torch.Tensor) -> str:
    """Return ``"triton"`` or ``"reference"`` for an op on ``tensors``."""
    choice = backend_choice()
    if choice == "reference":
        return "reference"
    on_cuda = any(t.is_cuda for t in tensors)
    if choice == "triton":
        if not triton_available():
            raise RuntimeError(
                "DRP_BACKEND=triton needs the `triton` package, which is not installed "
                "(pip install 'drp_kernels[gpu]'); unset DRP_BACKEND to use the reference"
            )
        if not on_cuda and not interpreter_enabled():
            raise RuntimeError(
                "DRP_BACKEND=triton with CPU tensors needs TRITON_INTERPRET=1 set before "
                "drp_kernels is imported (the Triton interpreter), or use CUDA tensors"
            )
        return "triton"
    return "triton" if on_cuda and triton_available() else "reference"


def lp_dist_backend(x: torch.Tensor, w: torch.Tensor, p: float) -> str:
    """"reference", "triton" or "cpp" for an ``lp_dist`` call. CUDA tensors run Triton, which does float64
    at p = inf only (its float64 max path; other float64 work on CUDA runs the reference); CPU tensors
    run the C++ kernels unless ``DRP_BACKEND`` asks for the reference or for Triton (the interpreter)."""
    choice = backend_choice()
    if choice == "reference":
        return "reference"
    is64 = torch.float64 in (x.dtype, w.dtype) and p != math.inf
    if x.is_cuda:
        return "reference" if is64 else "triton"
    if choice == "triton" and not is64:
        return backend_for(x, w)  # raises unless TRITON_INTERPRET=1
    if x.device.type != "cpu" or not _extension.available():
        return "reference"
    return "cpp"
