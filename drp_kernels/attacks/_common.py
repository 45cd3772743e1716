"""Shared pieces of the attack engine: input validation (built on ``drp_kernels._validate``),
losses on logits (CE, DLR, targeted DLR, margin), the fused step on prepared budgets and the
input-gradient helper.

Conventions (torchattacks / AutoAttack): a model maps inputs in [0, 1] (NCHW, or
any (B, ...) layout where an attack allows it) to logits (B, C); attacks return
detached adversarial inputs of x's shape and dtype; gradients are taken with
``torch.autograd.grad`` with respect to the input only, so no parameter ``.grad``
is ever written.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .._constants import NORMS
from .._contexts import eval_mode, single_thread
from .._validate import check_choice, check_float, check_int, check_tensor
from ..ops.pgd_step import PreparedBudget, pgd_step_prepared_, prepare_budget

__all__ = [
    "RobustnessWarning",
    "LOSSES",
    "NORMS",
    "eval_mode",
    "check_model",
    "check_images",
    "check_labels",
    "check_budget",
    "check_positive_int",
    "check_norm",
    "check_logits",
    "validate_attack",
    "step_budget",
    "fused_step_",
    "budget_view",
    "exit_every",
    "model_device",
    "make_generator",
    "check_seed",
    "check_index",
    "resolve_loss",
    "ce_loss",
    "dlr_loss",
    "dlr_targeted_loss",
    "margin",
    "input_grad",
    "predict",
    "StableRows",
    "stable_rows",
    "row_call",
    "MIN_ROWS",
    "THREADED_ROWS",
]

Budget = Union[float, torch.Tensor]
LOSSES = ("ce", "dlr", "dlr-t")


class RobustnessWarning(UserWarning):
    """A sanity check of the evaluation failed (see ``evaluate``'s ``flags``)."""


# ------------------------------------------------------------------ model handling
def check_model(model, name: str = "model") -> None:
    if not callable(model):
        raise TypeError(f"{name} must be a callable returning logits (e.g. an nn.Module), got {type(model).__name__}")


def model_device(model, fallback: torch.device) -> torch.device:
    """The device of the model's first parameter or buffer, else ``fallback``."""
    if isinstance(model, nn.Module):
        for t in model.parameters():
            return t.device
        for t in model.buffers():
            return t.device
    return fallback


# ---------------------------------------------------------------- input validation
def check_images(x, *, name: str = "x", nchw: bool = False) -> None:
    """x: a floating tensor (B, ...) with every value finite and in [0, 1]."""
    check_tensor(name, x)
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor with values in [0, 1], got dtype {x.dtype}")
    if nchw and x.dim() != 4:
        raise ValueError(f"{name} must be a 4-D NCHW tensor, got shape {tuple(x.shape)}")
    if x.dim() < 2:
        raise ValueError(f"{name} must have a batch dimension and at least one feature dimension, "
                         f"got shape {tuple(x.shape)}")
    if x.numel() == 0:
        return
    lo, hi = torch.aminmax(x.detach())
    lo, hi = float(lo), float(hi)  # one host sync per call
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{name} must be finite (found NaN or inf)")
    if lo < 0.0 or hi > 1.0:
        raise ValueError(f"{name} must lie in [0, 1] (normalisation belongs inside the model), "
                         f"got range [{lo:.4g}, {hi:.4g}]")


def check_labels(y, x, *, name: str = "y") -> torch.Tensor:
    """y: int64 tensor of shape (B,); returned on x's device."""
    check_tensor(name, y)
    if y.dtype != torch.int64:
        raise ValueError(f"{name} must have dtype torch.int64 (class indices), got {y.dtype}")
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"{name} must have shape ({x.shape[0]},) to match x, got {tuple(y.shape)}")
    return y.to(x.device)


def check_logits(logits, y, *, rows=None, min_classes: int = 1, what: str = "") -> int:
    """Checks the model's output (rows, C) and that every label of y indexes its classes; returns C.

    rows: the expected number of output rows (default len(y))."""
    rows = y.shape[0] if rows is None else rows
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != rows:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"model must return logits of shape (B, C) = ({rows}, C), got {shape}")
    c = logits.shape[1]
    if c < min_classes:
        raise ValueError(f"{what} needs a model with at least {min_classes} classes, got C={c}")
    if y.numel() > 0:
        lo, hi = torch.aminmax(y)
        if int(lo) < 0 or int(hi) >= c:
            raise ValueError(f"y must hold class indices in [0, {c - 1}] (the model has C={c} logits), "
                             f"got range [{int(lo)}, {int(hi)}]")
    return c


def check_budget(eps, x, *, name: str = "eps") -> Budget:
    """eps: a float >= 0 or a 1-D tensor of length B with values >= 0.

    Returns a Python float or a float32 tensor (B,) on x's device."""
    if isinstance(eps, torch.Tensor) and eps.dim() == 0:
        eps = float(eps)
    if not isinstance(eps, torch.Tensor):
        return check_float(name, eps, minimum=0.0)
    if eps.dim() != 1 or eps.shape[0] != x.shape[0]:
        raise ValueError(f"{name} must be a float or a 1-D tensor of length B={x.shape[0]}, "
                         f"got shape {tuple(eps.shape)}")
    if not (eps.is_floating_point() or eps.dtype in (torch.int32, torch.int64)):
        raise ValueError(f"{name} must hold real numbers, got dtype {eps.dtype}")
    e = eps.detach().to(device=x.device, dtype=torch.float32)
    if e.numel() and not bool(torch.isfinite(e).all() & (e >= 0).all()):
        raise ValueError(f"{name} must be a finite number >= 0 for every sample")
    return e


def check_positive_int(v, *, name: str, minimum: int = 1) -> int:
    return check_int(name, v, minimum)


def check_norm(norm, *, allowed=NORMS) -> str:
    return check_choice("norm", norm, allowed)


_UNSET = object()


def validate_attack(model, x, y, *, eps=_UNSET, norm=_UNSET, nchw: bool = False):
    """The checks every attack entry point shares: a callable model, images in [0, 1]
    (NCHW when ``nchw``), int64 labels of matching length, and, when given, the budget
    and the norm. Returns (y on x's device, eps as a float or (B,) tensor, norm)."""
    check_model(model)
    check_images(x, nchw=nchw)
    y = check_labels(y, x)
    if eps is not _UNSET:
        eps = check_budget(eps, x)
    if norm is not _UNSET:
        norm = check_norm(norm)
    return y, (None if eps is _UNSET else eps), (None if norm is _UNSET else norm)


def step_budget(b: Budget, x: torch.Tensor, *, round_down: bool) -> PreparedBudget:
    """A budget validated once for ``fused_step_`` (``drp_kernels.ops.pgd_step.prepare_budget``):
    eps when ``round_down``, else alpha. Validation syncs with the device once, here, not in every step."""
    return prepare_budget(b, x, name="eps" if round_down else "alpha", round_down=round_down)


def fused_step_(x_adv, x, grad, eps: PreparedBudget, alpha: PreparedBudget, norm, active=None):
    """``drp_kernels.pgd_step_`` on budgets prepared by ``step_budget`` (no validation, so no host
    sync): the per-iteration step of APGD, PGD and the paper's attack, in [0, 1]."""
    return pgd_step_prepared_(x_adv, x, grad, eps, alpha, norm=norm, active=active)


def exit_every(device) -> int:
    """How often an attack drops broken points from its working batch: every iteration on the CPU
    (a host sync costs nothing there), every 10 on an accelerator (one sync per 10)."""
    return 1 if device.type == "cpu" else 10


def subset_step_budget(b: PreparedBudget, idx) -> PreparedBudget:
    return b if b.per_sample is None else PreparedBudget(b.scalar, b.per_sample[idx])


def budget_view(b: Budget, x: torch.Tensor) -> torch.Tensor:
    """A float or (B,) budget as a tensor shaped (B, 1, ..., 1) in x's dtype."""
    shape = (x.shape[0],) + (1,) * (x.dim() - 1)
    if isinstance(b, torch.Tensor):
        return b.to(device=x.device, dtype=x.dtype).reshape(shape)
    return torch.full(shape, float(b), device=x.device, dtype=x.dtype)


def budget_vector(b: Budget, n: int, device) -> torch.Tensor:
    if isinstance(b, torch.Tensor):
        return b.to(device=device, dtype=torch.float32)
    return torch.full((n,), float(b), device=device, dtype=torch.float32)


def subset_budget(b: Budget, idx: torch.Tensor) -> Budget:
    return b[idx] if isinstance(b, torch.Tensor) else b


def make_generator(seed, device) -> Optional[torch.Generator]:
    """A generator on ``device`` seeded with ``seed``; None (global RNG) when seed is None."""
    if seed is None:
        return None
    seed = check_int("seed", seed, 0)
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def check_seed(seed) -> int:
    """An int seed; None draws one from torch's global RNG (so ``torch.manual_seed`` fixes it)."""
    if seed is None:
        return int(torch.randint(0, 2 ** 62, ()))
    return check_int("seed", seed, 0)


def check_index(index, x) -> torch.Tensor:
    """index: None (each row is its own index) or a 1-D integer tensor of length B, each row's
    identity for the keyed random draws; returned as int64 on the CPU."""
    n = x.shape[0]
    if index is None:
        return torch.arange(n)
    if not isinstance(index, torch.Tensor) or index.dtype.is_floating_point or index.dtype == torch.bool \
            or index.is_complex() or index.shape != (n,):
        got = f"{index.dtype} of shape {tuple(index.shape)}" if isinstance(index, torch.Tensor) \
            else type(index).__name__
        raise ValueError(f"index must be a 1-D integer tensor of length B={n} (each point's index in the "
                         f"dataset), got {got}")
    return index.detach().to("cpu", torch.int64)


# ------------------------------------------------------------------------- losses
def ce_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy on the logits (float32)."""
    return F.cross_entropy(logits.float(), y, reduction="none")


def _other_max(z: torch.Tensor, y: torch.Tensor):
    """(max_{i != y} z_i, z_y)."""
    z_y = z.gather(1, y[:, None])
    masked = z.scatter(1, y[:, None], float("-inf"))
    return masked.amax(dim=1), z_y.squeeze(1)


def margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """z_y - max_{i != y} z_i: positive iff the sample is classified correctly."""
    other, z_y = _other_max(logits.float(), y)
    return z_y - other


def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """DLR (Croce & Hein 2020): -(z_y - max_{i!=y} z_i) / (z_pi1 - z_pi3 + 1e-12). Needs C >= 3."""
    z = logits.float()
    zs = z.sort(dim=1, descending=True).values
    other, z_y = _other_max(z, y)
    return -(z_y - other) / (zs[:, 0] - zs[:, 2] + 1e-12)


def dlr_targeted_loss(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Targeted DLR: -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12). Needs C >= 4."""
    z = logits.float()
    zs = z.sort(dim=1, descending=True).values
    z_y = z.gather(1, y[:, None]).squeeze(1)
    z_t = z.gather(1, target[:, None]).squeeze(1)
    return -(z_y - z_t) / (zs[:, 0] - 0.5 * (zs[:, 2] + zs[:, 3]) + 1e-12)


_MIN_CLASSES = {"ce": 1, "dlr": 3, "dlr-t": 4}


def resolve_loss(loss, *, allowed=("ce", "dlr")) -> Callable:
    """A loss name in ``allowed`` or a callable ``(outputs, y) -> per-sample loss``."""
    if callable(loss):
        return loss
    if loss == "ce":
        return ce_loss
    if loss == "dlr" and "dlr" in allowed:
        return dlr_loss
    if loss == "dlr-t" and "dlr-t" in allowed:
        return dlr_targeted_loss
    raise ValueError(f"loss must be one of {allowed} or a callable (outputs, y) -> per-sample loss, got {loss!r}")


def min_classes(loss) -> int:
    return _MIN_CLASSES.get(loss, 1) if isinstance(loss, str) else 1


# ------------------------------------------------------------------ model queries
def input_grad(model, x_adv: torch.Tensor, y: torch.Tensor, loss_fn: Callable):
    """(logits, per-sample loss, d sum(loss) / d x_adv), all detached.

    Only the input is differentiated (``torch.autograd.grad``), so parameter grads are
    neither computed into ``.grad`` nor accumulated. A model whose output does not
    depend on its input (masked gradients) yields a zero gradient, not an error. A
    ``StableRows`` model runs forward and backward under its thread rule."""
    threads = model.threads(x_adv) if isinstance(model, StableRows) else contextlib.nullcontext()
    with threads, torch.enable_grad():
        xr = x_adv.detach().requires_grad_(True)
        logits = model(xr)
        loss = loss_fn(logits, y)
        if not isinstance(loss, torch.Tensor) or loss.shape != (x_adv.shape[0],):
            got = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(f"loss must return a per-sample loss of shape ({x_adv.shape[0]},), got {got}")
        if loss.requires_grad:
            (grad,) = torch.autograd.grad(loss.sum(), xr, allow_unused=True)
        else:
            grad = None
    if grad is None:
        grad = torch.zeros_like(x_adv)
    return logits.detach(), loss.detach(), grad


@torch.no_grad()
def predict(model, x: torch.Tensor, *, batch_size: Optional[int] = None) -> torch.Tensor:
    """argmax of the logits, in chunks of ``batch_size`` rows."""
    if batch_size is None or x.shape[0] <= batch_size:
        return model(x).argmax(dim=1)
    return torch.cat([model(x[i:i + batch_size]).argmax(dim=1) for i in range(0, x.shape[0], batch_size)])


# ------------------------------------------------------------- batch-invariant model calls
#: On the CPU the engine calls the model on at least this many rows: MKL's sgemm computes a
#: row differently below 8 rows (a matrix-vector path) than in a larger batch.
MIN_ROWS = 8
#: ... and single-threaded below this many rows: with 2 threads MKL splits 9-59 rows across the
#: threads in a way that changes a row's last bits (measured on the 2-core AVX2 machine, MKL
#: 2024.2; from 60 rows up 2 threads gave 1 thread's bits at every size tried, 60-420).
THREADED_ROWS = 64


def row_call(fn, x: torch.Tensor):
    """``fn(x)`` with x padded to ``MIN_ROWS`` rows on the CPU (copies of its first row, dropped
    from the output), so a row's output does not depend on how few rows share its batch."""
    k = x.shape[0]
    if k == 0 or k >= MIN_ROWS or x.device.type != "cpu":
        return fn(x)
    pad = x[:1].expand((MIN_ROWS - k,) + tuple(x.shape[1:]))
    return fn(torch.cat([x, pad]))[:k]


class StableRows:
    """A model as the evaluation engine calls it: on the CPU, each row's logits (and input
    gradient, through ``input_grad``) do not depend on which other rows share the batch, so a
    point's attack gives the same bits whatever the batch size, the order of the points or the
    shard. Batches are padded to ``MIN_ROWS`` rows and run single-threaded below
    ``THREADED_ROWS`` rows (see those constants for the measurements behind them). The model's
    own layers must compute each row independently, as every layer of a network in eval mode
    does (BatchNorm uses its running statistics). On other devices it calls the model as it is:
    cuBLAS and cuDNN may pick other kernels for other batch sizes, so there the bits (and a
    point at the decision boundary) can depend on the batch.

    Attribute reads fall through to the model (``decision``, ``net``, ``prototypes`` of a
    ``ProtoClassifier``)."""

    def __init__(self, model):
        self.model = model

    def __getattr__(self, name):
        return getattr(self.__dict__["model"], name)

    def threads(self, x: torch.Tensor):
        """A context: one thread while a batch of fewer than THREADED_ROWS rows runs on the CPU."""
        return single_thread(x.device.type == "cpu" and x.shape[0] < THREADED_ROWS)

    def __call__(self, x: torch.Tensor):
        with self.threads(x):
            return row_call(self.model, x)

    def rows(self, fn, x: torch.Tensor):
        """Any row-wise function of the model (e.g. its network body), under the same rules."""
        with self.threads(x):
            return row_call(fn, x)


def stable_rows(model):
    """``model`` wrapped in ``StableRows`` (once)."""
    return model if isinstance(model, StableRows) else StableRows(model)


def unwrap(model):
    """The module behind a ``StableRows`` wrapper and a ``torch.compile`` wrapper."""
    if isinstance(model, StableRows):
        model = model.model
    return getattr(model, "_orig_mod", model)
