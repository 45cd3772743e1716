"""The one loader of the compiled extension ``drp_kernels.ops._C`` (built from ``csrc/``).

Importing it registers every C++ op under ``torch.ops.drp`` (schemas in
``csrc/drp.cpp`` and the op files' ``TORCH_LIBRARY_FRAGMENT`` blocks). Every op module asks this
module, never the package, whether the extension loaded:

* ``module`` is the loaded extension, or None in an unbuilt checkout or a broken install;
* ``load_error()`` says why it did not load (None when it did);
* ``has_cuda_kernels()`` whether it was built with its CUDA kernels;
* ``require(device)`` raises a ``RuntimeError`` that says how to (re)build, before a kernel on
  ``device`` is launched without the extension (nothing falls back silently).
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["module", "available", "load_error", "has_cuda_kernels", "require", "REBUILD_CUDA"]

REBUILD_CUDA = ("rebuild it with `DRP_FORCE_CUDA=1 pip install --no-build-isolation -e .` "
                "(needs nvcc and a CUDA build of torch)")

try:
    from . import _C as module
    _LOAD_ERROR: Optional[BaseException] = None
except ImportError as exc:  # pragma: no cover - exercised only on an unbuilt checkout or a broken install
    module = None
    _LOAD_ERROR = exc


def available() -> bool:
    """True when the extension is loaded (its ops are registered under ``torch.ops.drp``)."""
    return module is not None


def load_error() -> Optional[str]:
    """Why the extension could not be loaded, or None when it is loaded."""
    return None if _LOAD_ERROR is None else f"{type(_LOAD_ERROR).__name__}: {_LOAD_ERROR}"


def has_cuda_kernels() -> bool:
    """True when the extension is loaded and was built with its CUDA kernels."""
    return module is not None and bool(getattr(module, "with_cuda", False))


def require(device: Optional[torch.device] = None) -> None:
    """Raise a RuntimeError saying how to build unless the extension can run a kernel on ``device``."""
    if module is None:
        raise RuntimeError(
            f"drp_kernels.ops._C is not built or failed to load ({load_error()}); build it with "
            "`pip install --no-build-isolation -e .` in the repository (or use DRP_BACKEND=reference where an op "
            "has a reference), or for CUDA kernels " + REBUILD_CUDA)
    if device is None:
        return
    if device.type == "cuda" and not has_cuda_kernels():
        raise RuntimeError("drp_kernels.ops._C was built without CUDA kernels but CUDA tensors were passed; "
                           + REBUILD_CUDA)
    if device.type not in ("cpu", "cuda", "meta"):
        raise RuntimeError(f"drp_kernels kernels support CPU and CUDA tensors, got device {device}")
