"""Prototype files: ``save_prototypes`` and ``load_prototypes``.

Files (``save_prototypes`` / ``load_prototypes``) record the metric and method the prototypes were
made for: a ``.pt`` file holds a dict ``{"prototypes": tensor, "metric": str | None, "method": str |
None}``; a ``.npy`` file holds the plain float32 array, and the metadata goes to a JSON sidecar
``<file>.npy.json`` that also stores a SHA-256 of the array, so a sidecar that no longer belongs
to its array is ignored (with a warning). Plain tensors in ``.pt`` files and ``.npy`` files without
a sidecar, as older versions wrote them, still load, with metric and method ``None``.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from typing import Optional

import numpy as np
import torch

from .._constants import METRICS
from .._validate import check_matrix
from ..io import atomic_write
from .generation import PROTOTYPE_METHODS

__all__ = ["save_prototypes", "load_prototypes"]

_EXTENSIONS = (".pt", ".npy")
_SIDECAR = ".json"
_MADE_BY = PROTOTYPE_METHODS[1:]  # what a file records: a method actually run, never "default"


def _extension(path) -> str:
    ext = os.path.splitext(os.fspath(path))[1].lower()
    if ext not in _EXTENSIONS:
        raise ValueError(f"path must end in one of {_EXTENSIONS}, got {os.fspath(path)!r}")
    return ext


def _check_path(path) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    return os.fspath(path)


def _check_meta(name: str, value, choices, where: str = "") -> Optional[str]:
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"{name}{where} must be a string, one of {choices}, or None, got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"{name}{where} must be one of {choices} or None, got {value!r}")
    return value


def _digest(data: torch.Tensor) -> str:
    return hashlib.sha256(data.numpy().tobytes()).hexdigest()


def save_prototypes(P, path, *, metric=None, method=None) -> None:
    """Write P (2-D, floating point) as float32 to ``path`` (.pt or .npy) atomically, with its metadata.

    ``metric`` (one of ``METRICS``) and ``method`` (one of ``PROTOTYPE_METHODS`` other than ``"default"``)
    record what the prototypes were made for; ``repulsive_prototypes(..., with_info=True)`` returns
    both. ``.pt`` files hold ``{"prototypes", "metric", "method"}``; ``.npy`` files hold the plain
    array, with the metadata in the sidecar ``<path>.json`` (written when either is given, removed
    otherwise). Every file goes through a temporary file in the same directory that then replaces
    the target, so a crash never leaves a half-written file; new files get the umask's permissions.
    """
    P = check_matrix("P", P)
    path = _check_path(path)
    ext = _extension(path)
    metric = _check_meta("metric", metric, METRICS)
    method = _check_meta("method", method, _MADE_BY)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"the directory of path does not exist: {folder!r}")
    data = P.detach().to(device="cpu", dtype=torch.float32).contiguous()
    if ext == ".pt":
        atomic_write(path, lambda f: torch.save({"prototypes": data, "metric": metric, "method": method}, f))
        return
    atomic_write(path, lambda f: np.save(f, data.numpy(), allow_pickle=False))
    sidecar = path + _SIDECAR
    if metric is None and method is None:
        if os.path.exists(sidecar):
            os.unlink(sidecar)
        return
    meta = {"metric": metric, "method": method, "shape": list(data.shape), "sha256": _digest(data)}
    atomic_write(sidecar, lambda f: f.write(json.dumps(meta, indent=1) + "\n"), binary=False)


def _read_sidecar(path: str, data: torch.Tensor) -> dict:
    sidecar = path + _SIDECAR
    info = {"metric": None, "method": None}
    if not os.path.isfile(sidecar):
        return info
    try:
        with open(sidecar, encoding="utf-8") as f:
            meta = json.load(f)
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        warnings.warn(f"ignoring the unreadable metadata file {sidecar!r} ({e})", UserWarning, stacklevel=3)
        return info
    if meta.get("sha256") != _digest(data):
        warnings.warn(f"ignoring the metadata file {sidecar!r}: it was written for other prototypes than "
                      f"those now in {path!r}", UserWarning, stacklevel=3)
        return info
    info["metric"] = _check_meta("metric", meta.get("metric"), METRICS, f" in {sidecar!r}")
    info["method"] = _check_meta("method", meta.get("method"), _MADE_BY, f" in {sidecar!r}")
    return info


def load_prototypes(path, *, with_info=False):
    """Read prototypes saved by ``save_prototypes`` (.pt or .npy); returns a 2-D float32 CPU tensor.

    With ``with_info=True`` returns ``(P, info)``, ``info = {"metric": str | None, "method": str |
    None}``: what the file records, ``None`` where it records nothing (files of older versions,
    a ``.npy`` without its sidecar).
    """
    path = _check_path(path)
    ext = _extension(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no prototype file at path {path!r}")
    info = {"metric": None, "method": None}
    if ext == ".pt":
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(obj, dict):
            if not isinstance(obj.get("prototypes"), torch.Tensor):
                raise ValueError(f"{path!r} holds a dict without a 'prototypes' tensor, expected the dict "
                                 "save_prototypes writes or a 2-D tensor of prototypes")
            info["metric"] = _check_meta("metric", obj.get("metric"), METRICS, f" in {path!r}")
            info["method"] = _check_meta("method", obj.get("method"), _MADE_BY, f" in {path!r}")
            obj = obj["prototypes"]
        elif not isinstance(obj, torch.Tensor):
            raise ValueError(f"{path!r} holds a {type(obj).__name__}, expected a 2-D tensor of prototypes")
    else:
        arr = np.load(path, allow_pickle=False)
        if not isinstance(arr, np.ndarray):
            raise ValueError(f"{path!r} holds an archive, expected a single 2-D array of prototypes")
        obj = torch.from_numpy(arr)
    if obj.dim() != 2 or not obj.is_floating_point():
        raise ValueError(f"{path!r} must hold a 2-D floating-point array, got shape {tuple(obj.shape)} "
                         f"and dtype {obj.dtype}")
    P = obj.to(torch.float32).contiguous()
    if ext == ".npy":
        info = _read_sidecar(path, P)
    return (P, info) if with_info else P
