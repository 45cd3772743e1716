"""What every Triton op file shares: availability, autotune gating, fp32 dot precision, tiles, sign.

* Triton is optional. ``import drp_kernels`` works without it (a CPU-only install runs the
  pure-PyTorch reference); ``HAS_TRITON`` says whether it imported, and ``require_triton()``
  raises a clear error where a kernel is about to be launched without it.
* ``DRP_AUTOTUNE=1`` turns on ``triton.autotune`` over each op's tile configurations; by default
  fixed tiles are used so that the first call is not slow.
* fp32 ``tl.dot`` precision follows ``torch.get_float32_matmul_precision()``, as a cuBLAS matmul
  does: "highest" gives IEEE fp32, "high" and "medium" allow TF32. CPU tensors (the Triton
  interpreter) always use IEEE fp32.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterable, Optional, Sequence

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
    TRITON_IMPORT_ERROR: Optional[BaseException] = None
except ImportError as exc:  # a CPU-only install without triton
    triton = None
    tl = None
    HAS_TRITON = False
    TRITON_IMPORT_ERROR = exc

__all__ = [
    "HAS_TRITON",
    "require_triton",
    "autotune_enabled",
    "interpreter_enabled",
    "interpreting",
    "fp32_dot_precision",
    "dot_precision_for",
    "make_configs",
    "tuned",
    "cdiv",
    "next_power_of_2",
    "on_device",
]

_TRUE = ("1", "true", "yes", "on")

#: torch.get_float32_matmul_precision() -> tl.dot input_precision for fp32 operands.
_MATMUL_PRECISION_TO_DOT = {"highest": "ieee", "high": "tf32", "medium": "tf32"}


def require_triton() -> None:
    """Raise if the Triton kernels cannot run because the triton package is missing."""
    if not HAS_TRITON:
        raise RuntimeError(
            "the drp_kernels Triton kernels need the `triton` package, which failed to import "
            f"({type(TRITON_IMPORT_ERROR).__name__}: {TRITON_IMPORT_ERROR}); install it "
            "(pip install 'drp_kernels[gpu]') or use DRP_BACKEND=reference"
        )


def autotune_enabled() -> bool:
    """True when DRP_AUTOTUNE asks for ``triton.autotune`` instead of the fixed tiles."""
    return os.environ.get("DRP_AUTOTUNE", "0").strip().lower() in _TRUE


def interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET`` asks for the Triton interpreter (the one parser of that variable).
    Triton reads it when a kernel is decorated, so it must be set before ``drp_kernels`` is imported."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE


def interpreting(t: torch.Tensor) -> bool:
    """True when a kernel on ``t`` runs under the Triton interpreter (CPU tensor, TRITON_INTERPRET=1)."""
    return not t.is_cuda and interpreter_enabled()


def fp32_dot_precision() -> str:
    """``input_precision`` of fp32 ``tl.dot`` on a GPU, from ``torch.get_float32_matmul_precision()``."""
    return _MATMUL_PRECISION_TO_DOT.get(torch.get_float32_matmul_precision(), "ieee")


def dot_precision_for(t: torch.Tensor) -> str:
    """fp32 dot precision for a kernel on ``t``: IEEE on the CPU (interpreter), else torch's setting."""
    return fp32_dot_precision() if t.is_cuda else "ieee"


def make_configs(rows: Iterable[Sequence[int]], names: Sequence[str]):
    """triton.Config list from rows (block sizes..., num_warps, num_stages) named by ``names``."""
    out = []
    for row in rows:
        *blocks, warps, stages = row
        out.append(triton.Config(dict(zip(names, blocks)), num_warps=warps, num_stages=stages))
    return out


_TUNED = {}


def tuned(kernel, configs, key, *, reset_to_zero=None, prune=None):
    """``kernel`` wrapped in ``triton.autotune`` over ``configs`` (built once per kernel and config set)."""
    fn = getattr(kernel, "fn", kernel)
    name = (fn.__module__, fn.__qualname__, tuple(str(c) for c in configs))
    if name not in _TUNED:
        extra = {"prune_configs_by": {"early_config_prune": prune}} if prune is not None else {}
        _TUNED[name] = triton.autotune(configs=configs, key=key, reset_to_zero=reset_to_zero, **extra)(kernel)
    return _TUNED[name]


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def on_device(t: torch.Tensor):
    """Context in which Triton launches on ``t``'s device (and its current stream), not the current one."""
    if t.is_cuda:
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


if HAS_TRITON:

    @triton.jit
    def sign(x):
        """torch.sign in fp32: -1, 0 or +1 (0 for NaN)."""
        return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))

    def even_d_heuristic():
        """``triton.heuristics`` setting EVEN_D when D is a multiple of BLOCK_D (no tail mask)."""
        return triton.heuristics({"EVEN_D": lambda a: a["D"] % a["BLOCK_D"] == 0})
