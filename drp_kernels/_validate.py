"""Argument checks shared by the public API (functional, modules, prototypes, layers, certified,
the attack engine).

One policy everywhere: ``TypeError`` when an argument has the wrong Python type (not a
tensor, not a number, a bool where a number is expected, not a string), ``ValueError``
when its value is wrong (shape, dtype, device, range, an unknown option). Every message
names the argument and says what was expected.
"""
from __future__ import annotations

import math
import numbers

import torch

from ._constants import FLOAT_DTYPES, METRICS

__all__ = [
    "FLOAT_DTYPES",
    "check_tensor",
    "check_choice",
    "check_metric",
    "check_int",
    "check_float",
    "check_p",
    "check_matrix",
    "check_targets",
]

def check_tensor(name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_choice(name: str, value, choices) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, one of {tuple(choices)}, got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_metric(metric, name: str = "metric") -> str:
    return check_choice(name, metric, METRICS)


def check_int(name: str, value, minimum: int) -> int:
    """An integer (Python or NumPy, not bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer >= {minimum}, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return int(value)


def check_float(name: str, value, *, positive: bool = False, minimum=None, maximum=None,
                max_open: bool = False) -> float:
    """A finite real number (not bool); ``positive``: > 0; ``minimum``/``maximum``: inclusive bounds
    (``max_open``: the maximum is excluded). The ValueError names every bound."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    v = float(value)
    bounds = ["> 0"] if positive else []
    if minimum is not None:
        bounds.append(f">= {minimum:g}")
    if maximum is not None:
        bounds.append(f"{'<' if max_open else '<='} {maximum:g}")
    below = (positive and not v > 0.0) or (minimum is not None and v < minimum)
    above = maximum is not None and (v >= maximum if max_open else v > maximum)
    if not math.isfinite(v) or below or above:
        what = "a finite number" + (" " + " and ".join(bounds) if bounds else "")
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return v


def check_p(p, name: str = "p") -> float:
    """The exponent of an lp distance: a float in [1, inf] (``math.inf`` allowed)."""
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise TypeError(f"{name} must be a float in [1, inf], got {type(p).__name__}")
    p = float(p)
    if math.isnan(p) or p < 1.0:
        raise ValueError(f"{name} must be a float in [1, inf] (math.inf allowed), got {p!r}")
    return p


def check_matrix(name: str, value, *, dtypes=None, min_rows: int = 0, min_cols: int = 0) -> torch.Tensor:
    """A 2-D floating-point tensor (``dtypes`` narrows the accepted dtypes)."""
    check_tensor(name, value)
    if value.dim() != 2:
        raise ValueError(f"{name} must be 2-D (rows, dim), got shape {tuple(value.shape)}")
    if dtypes is not None:
        if value.dtype not in dtypes:
            names = [str(d).replace("torch.", "") for d in dtypes]
            names = ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]
            raise ValueError(f"{name} must be {names}, got {value.dtype}")
    elif not value.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if value.shape[0] < min_rows:
        raise ValueError(f"{name} must have at least {min_rows} row(s), got shape {tuple(value.shape)}")
    if value.shape[1] < min_cols:
        raise ValueError(f"{name} must have at least {min_cols} column(s) (dim >= {min_cols}), "
                         f"got shape {tuple(value.shape)}")
    return value


def check_targets(name: str, y, *, batch: int, device: torch.device) -> torch.Tensor:
    """(B,) integer class indices on ``device``; returns them as int64 (no copy when already int64)."""
    check_tensor(name, y)
    if y.dtype == torch.bool or y.is_floating_point() or y.is_complex():
        raise ValueError(f"{name} must hold integer class indices (int64, int32, uint8, ...), got dtype {y.dtype}")
    if y.shape != (batch,):
        raise ValueError(f"{name} must have shape ({batch},) to match z, got {tuple(y.shape)}")
    if y.device != device:
        raise ValueError(f"{name} must be on z's device {device}, got {y.device}")
    return y if y.dtype == torch.int64 else y.to(torch.int64)
