"""Batched PGD step and random start: Python side of the ``drp_kernels.ops._C`` ops.

The compiled extension registers two ops (``csrc/pgd_step.cpp``):

* ``drp::pgd_step_(x_adv!, x, grad, eps, alpha, eps_per_sample?, alpha_per_sample?,
  active?, norm, lower, upper) -> ()`` updates ``x_adv`` in place;
* ``drp::ball_init(x, noise, radius_u?, eps, eps_per_sample?, norm, lower, upper) -> Tensor``
  turns noise drawn by torch (in exactly ``reference.random_init``'s order) into a
  point of the eps ball clipped to [lower, upper].

Both have a CPU kernel (``at::parallel_for``) and, when built with CUDA, a CUDA kernel.
This module validates arguments before anything is written, registers the fake
(meta) implementations so ``torch.compile`` traces through the ops, and never falls
back to another implementation silently: a missing extension, or CUDA tensors with an
extension built without CUDA, raise a ``RuntimeError`` that says how to rebuild.

Exactness rule (shared with ``drp_kernels.reference``): results lie inside the eps
ball and inside [lower, upper] exactly, in real arithmetic. eps is rounded down,
lower up and upper down to the compute dtype (float32; float64 for float64 inputs);
``x + d`` is rounded toward ``x`` (one ulp back when rounding overshot the real sum,
found exactly with TwoSum); float16/bfloat16 results are rounded toward ``x`` too.
linf steps match the reference bit for bit; l2 steps match it up to the order of the
per-sample norm sums.

Layout: contiguous and channels_last inputs give identical results. ``x`` and
``grad`` whose strides differ from ``x_adv``'s are copied once into its layout; an
``x_adv`` that is not dense per sample (a strided view) is processed in a contiguous
copy that is written back.
"""
from __future__ import annotations

import math
from numbers import Real
from typing import NamedTuple, Optional, Union

import torch

from .._constants import FLOAT_DTYPES, NORMS
from . import _extension

__all__ = ["pgd_step_", "random_init", "prepare_budget", "pgd_step_prepared_", "PreparedBudget"]

Budget = Union[float, torch.Tensor]


class PreparedBudget(NamedTuple):
    """A budget validated once (``prepare_budget``): a scalar, or 0.0 and a (B,) tensor in the
    step's compute dtype on x's device."""

    scalar: float
    per_sample: Optional[torch.Tensor]


# ------------------------------------------------------------------ validation
def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_tensor(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, float64, float16 or bfloat16, got {t.dtype}")


def _check_like(t: torch.Tensor, x: torch.Tensor, name: str) -> None:
    _check_tensor(t, name)
    if t.shape != x.shape:
        raise ValueError(f"{name} must have the shape of x {tuple(x.shape)}, got {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{name} must be on x's device {x.device}, got {t.device}")
    if t.dtype != x.dtype:
        raise ValueError(f"{name} must have x's dtype {x.dtype}, got {t.dtype}")


def _check_norm(norm) -> None:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def _check_bounds(lower, upper) -> None:
    for name, v in (("lower", lower), ("upper", upper)):
        if isinstance(v, bool) or not isinstance(v, Real) or math.isnan(float(v)):
            raise ValueError(f"{name} must be a real number, got {v!r}")
    if float(lower) > float(upper):
        raise ValueError(f"lower must be <= upper, got lower={lower}, upper={upper}")


def prepare_budget(v: Budget, x: torch.Tensor, *, name: str = "eps", round_down: bool = True) -> PreparedBudget:
    """``v`` (a float or a (B,) tensor, >= 0) validated once for steps on ``x``: attacks prepare eps
    (``round_down``: rounded down to the compute dtype, so the ball never exceeds the caller's
    budget) and alpha before their loop and call ``pgd_step_prepared_`` in it, without a host sync
    per step. Raises ValueError naming ``name``."""
    batch = x.shape[0]
    if isinstance(v, torch.Tensor):
        numeric = v.is_floating_point() or v.dtype.is_signed or v.dtype == torch.uint8
        if v.dtype == torch.bool or v.is_complex() or not numeric:
            raise ValueError(f"{name} must be a real-valued tensor, got dtype {v.dtype}")
        if v.dim() == 0:
            v = v.expand(batch)
        if v.dim() != 1 or v.shape[0] != batch:
            raise ValueError(f"{name} must be a float or a 1-D tensor of length B={batch}, got shape {tuple(v.shape)}")
        if v.device != x.device and v.device.type != "cpu":
            raise ValueError(f"{name} must be on x's device {x.device} (or the CPU), got {v.device}")
        if not torch.compiler.is_compiling() and v.numel() > 0:
            # One host sync on CUDA; skipped while tracing (data-dependent), where the
            # CPU kernel still checks and the caller owns the CUDA values.
            bad = ~(v >= 0)
            if bool(bad.any()):
                i = int(bad.nonzero()[0, 0])
                raise ValueError(f"{name} must be >= 0 (and not NaN) for every sample, got {name}[{i}]={v[i].item()}")
        cd = _compute_dtype(x)
        t = v.to(device=x.device, dtype=cd)
        if round_down and v.dtype == torch.float64 and cd == torch.float32:
            # Round down so the ball never exceeds the caller's budget.
            t = torch.where(t.double() > v.to(x.device), torch.nextafter(t, torch.full_like(t, -math.inf)), t)
        return PreparedBudget(0.0, t.contiguous())
    if isinstance(v, bool) or not isinstance(v, Real):
        raise ValueError(f"{name} must be a float or a 1-D tensor of length B={batch}, got {type(v).__name__}")
    v = float(v)
    if not v >= 0.0:
        raise ValueError(f"{name} must be >= 0, got {v}")
    return PreparedBudget(v, None)


def _check_active(active, x: torch.Tensor):
    if active is None:
        return None
    if not isinstance(active, torch.Tensor) or active.dtype != torch.bool:
        raise ValueError(f"active must be a bool tensor of length B={x.shape[0]}, got "
                         f"{getattr(active, 'dtype', type(active).__name__)}")
    if active.dim() != 1 or active.shape[0] != x.shape[0]:
        raise ValueError(f"active must be a 1-D bool tensor of length B={x.shape[0]}, got shape {tuple(active.shape)}")
    if active.device != x.device and active.device.type != "cpu":
        raise ValueError(f"active must be on x's device {x.device} (or the CPU), got {active.device}")
    return active.to(x.device).contiguous()


# ------------------------------------------------------------------ public API
def pgd_step_(
    x_adv: torch.Tensor,
    x: torch.Tensor,
    grad: torch.Tensor,
    eps: Budget,
    alpha: Budget,
    *,
    norm: str = "linf",
    lower: float = 0.0,
    upper: float = 1.0,
    active: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """One projected gradient-ascent step on a batch, in place; returns ``x_adv``.

    linf: ``x_adv <- clip(clip(x_adv + alpha*sign(grad), x - eps, x + eps), lower, upper)``, sign(0) = 0
          (and sign(NaN) = 0, like torch.sign).
    l2:   ``g = grad / max(||grad_b||, 1e-12)``; ``delta = x_adv + alpha*g - x``;
          ``delta *= min(1, eps / ||delta_b||)``; ``x_adv <- clip(x + delta, lower, upper)``;
          norms over all non-batch dimensions.

    eps, alpha: a float or a 1-D tensor of length B (per-sample budgets), >= 0.
    active: optional bool tensor of length B; samples where it is False are untouched.
    Every argument is validated before ``x_adv`` is written; on error it is unchanged.
    """
    _check_tensor(x, "x")
    if x.dim() < 1:
        raise ValueError("x must have a batch dimension, got a 0-d tensor")
    _check_like(x_adv, x, "x_adv")
    _check_like(grad, x, "grad")
    _check_norm(norm)
    _check_bounds(lower, upper)
    eps_b = prepare_budget(eps, x, name="eps", round_down=True)
    alpha_b = prepare_budget(alpha, x, name="alpha", round_down=False)
    act = _check_active(active, x)
    _extension.require(x.device)
    return pgd_step_prepared_(x_adv, x, grad, eps_b, alpha_b, norm=norm, active=act, lower=float(lower),
                              upper=float(upper))


def pgd_step_prepared_(x_adv: torch.Tensor, x: torch.Tensor, grad: torch.Tensor, eps: PreparedBudget,
                       alpha: PreparedBudget, *, norm: str, active: Optional[torch.Tensor] = None,
                       lower: float = 0.0, upper: float = 1.0) -> torch.Tensor:
    """``pgd_step_`` on budgets from ``prepare_budget`` (and ``active`` a bool tensor on x's device, or
    None), with no validation of its own and so no host sync: the per-iteration step of the attacks.
    The op still checks shapes and values in C++ (``TORCH_CHECK``)."""
    torch.ops.drp.pgd_step_(x_adv.detach(), x.detach(), grad.detach(), eps.scalar, alpha.scalar, eps.per_sample,
                            alpha.per_sample, active, norm, lower, upper)
    return x_adv


def random_init(
    x: torch.Tensor,
    eps: Budget,
    *,
    norm: str = "linf",
    lower: float = 0.0,
    upper: float = 1.0,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """A uniform draw from the eps ball around x (linf or l2), clipped to [lower, upper].

    The noise is drawn with torch in exactly ``reference.random_init``'s order and
    shapes (so the same generator state gives the same point); the kernel then forms
    ``x + noise`` under the exactness rule. Returns a new tensor in x's layout.
    """
    _check_tensor(x, "x")
    if x.dim() < 1:
        raise ValueError("x must have a batch dimension, got a 0-d tensor")
    _check_norm(norm)
    _check_bounds(lower, upper)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    eps_s, eps_t = prepare_budget(eps, x, name="eps", round_down=True)
    _extension.require(x.device)
    radius_u = None
    if norm == "linf":
        noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float32)
    else:
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
        radius_u = torch.rand((x.shape[0],), generator=generator, device=x.device, dtype=torch.float32)
    return torch.ops.drp.ball_init(x.detach(), noise, radius_u, eps_s, eps_t, norm, float(lower), float(upper))


# ------------------------------------------------------------ fake (meta) kernels
if _extension.available():

    @torch.library.register_fake("drp::pgd_step_")
    def _pgd_step_fake(x_adv, x, grad, eps, alpha, eps_per_sample, alpha_per_sample, active, norm, lower, upper):
        torch._check(x_adv.shape == x.shape and grad.shape == x.shape, lambda: "x_adv, x and grad must share a shape")
        return None

    @torch.library.register_fake("drp::ball_init")
    def _ball_init_fake(x, noise, radius_u, eps, eps_per_sample, norm, lower, upper):
        torch._check(noise.shape == x.shape, lambda: "noise must have x's shape")
        return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_init_layout(x))


def _init_layout(x: torch.Tensor) -> torch.memory_format:
    """Layout of random_init's output: x's when it is channels_last(_3d), else contiguous."""
    if not x.is_contiguous():
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
            return torch.channels_last
        if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
            return torch.channels_last_3d
    return torch.contiguous_format
