"""Backend selection shared by every op.

``DRP_BACKEND`` picks the implementation:
  auto       (default) Triton kernels for CUDA tensors, the pure-PyTorch reference for CPU tensors
  triton     always the Triton kernels; CPU tensors need ``TRITON_INTERPRET=1`` (how CI tests them)
  reference  always ``drp_kernels.reference``

Without the ``triton`` package (a CPU-only install) "auto" always picks the reference, and
"triton" raises a RuntimeError that says what to install.
"""
import os

import torch

__all__ = ["BACKENDS", "backend_for", "interpreter_enabled", "triton_available"]

BACKENDS = ("auto", "triton", "reference")


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def triton_available() -> bool:
    """True when the triton package imports (the Triton kernels can run)."""
    from .ops._triton_utils import HAS_TRITON

    return HAS_TRITON


def backend_for(*tensors: torch.Tensor) -> str:
    """Return ``"triton"`` or ``"reference"`` for an op on ``tensors``."""
    choice = os.environ.get("DRP_BACKEND", "auto").strip().lower() or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"DRP_BACKEND must be one of {BACKENDS}, got {choice!r}")
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
