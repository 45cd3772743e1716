"""Readable pure-PyTorch ground truth for every drp_kernels op.

Tests and benchmarks import these functions, so the kernels and their checks can
never drift apart. Nothing here is tuned for speed: clarity wins. All math runs
in float32 (or float64 when the inputs are float64) and results are cast back.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F

from ._constants import DEFAULT_METRIC

__all__ = [
    "pgd_step",
    "random_init",
    "proto_distance",
    "proto_logits",
    "proto_loss",
    "pairwise_distance",
    "repulsion_energy",
    "lp_dist",
    "scaled_pnorm",
]

Budget = Union[float, torch.Tensor]


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _per_sample(v: Budget, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A scalar or length-B budget, shaped (B, 1, ..., 1) to broadcast over x."""
    shape = (x.shape[0],) + (1,) * (x.dim() - 1)
    if isinstance(v, torch.Tensor):
        return v.to(device=x.device, dtype=dtype).reshape(shape)
    return torch.full(shape, float(v), device=x.device, dtype=dtype)


def _sample_norm(t: torch.Tensor) -> torch.Tensor:
    """L2 norm over all non-batch dims, shaped (B, 1, ..., 1)."""
    shape = (t.shape[0],) + (1,) * (t.dim() - 1)
    return torch.linalg.vector_norm(t.reshape(t.shape[0], -1), dim=1).reshape(shape)


# --------------------------------------------------------------------------- PGD step
# Exactness rule (the kernels in csrc/ follow it bit for bit where the math is
# element-wise): outputs stay inside the eps ball and inside [lower, upper]
# exactly, in real arithmetic, not just up to rounding.
#  * eps is rounded down, lower up and upper down to the compute dtype.
#  * x + d is rounded "toward x" (_add_toward): to nearest, then one ulp back
#    toward x when rounding carried it past the real sum, so |result - x| <= |d|.
#  * float16/bfloat16 results are rounded the same way (_round_toward): to
#    nearest, then one ulp back toward x if rounding moved them away from x past
#    the fp32 value; a value left outside [lower, upper] (possible only when x
#    itself is outside) is moved one ulp inside.
def _scalar_toward(v: float, dtype: torch.dtype, *, down: bool) -> float:
    """v as the nearest dtype value at or below (down) / at or above it."""
    t = torch.tensor(float(v), dtype=dtype)
    if down and t.item() > v:
        t = torch.nextafter(t, torch.tensor(-math.inf, dtype=dtype))
    if not down and t.item() < v:
        t = torch.nextafter(t, torch.tensor(math.inf, dtype=dtype))
    return t.item()


def _eps_per_sample(eps: Budget, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """eps shaped like _per_sample, every value rounded down to dtype."""
    if isinstance(eps, torch.Tensor):
        exact = eps.to(device=x.device, dtype=torch.float64)
        e = exact.to(dtype)
        e = torch.where(e.to(torch.float64) > exact, torch.nextafter(e, torch.full_like(e, -math.inf)), e)
        return _per_sample(e, x, dtype)
    return _per_sample(_scalar_toward(float(eps), dtype, down=True), x, dtype)


def _add_toward(x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """x + d rounded to nearest, moved one ulp back toward x if it overshot (|result - x| <= |d|)."""
    s = x + d
    bp = s - x
    err = (x - (s - bp)) + (d - bp)  # (x + d) - s exactly (Knuth's TwoSum)
    over = ((d > 0) & (err < 0)) | ((d < 0) & (err > 0))
    return torch.where(over, torch.nextafter(s, x), s)


def _round_toward(v: torch.Tensor, x: torch.Tensor, lo: float, hi: float, dtype: torch.dtype) -> torch.Tensor:
    """v (compute dtype) cast to dtype, rounding toward x, then kept in [lo, hi]."""
    if dtype not in (torch.float16, torch.bfloat16):
        return v.to(dtype)
    r = v.to(dtype)
    rf = r.to(v.dtype)
    over = ((v > x) & (rf > v)) | ((v < x) & (rf < v))
    r = torch.where(over, torch.nextafter(r, x.to(dtype)), r)
    rf = r.to(v.dtype)
    r = torch.where(rf > hi, torch.nextafter(r, torch.full_like(r, -math.inf)), r)
    r = torch.where(rf < lo, torch.nextafter(r, torch.full_like(r, math.inf)), r)
    return r


def pgd_step(
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
    """One projected gradient-ascent step; returns a new tensor (x_adv is not modified).

    linf: clip(x_adv + alpha * sign(grad), x - eps, x + eps), then clip to [lower, upper].
    l2:   g = grad / max(||grad||, 1e-12); delta = x_adv + alpha * g - x;
          delta *= min(1, eps / ||delta||); clip(x + delta, lower, upper).
    Samples where ``active`` is False are returned unchanged. Rounding follows the
    exactness rule above, so the result is inside the ball and [lower, upper] exactly.
    """
    cd = _compute_dtype(x)
    xf, xa, g = x.to(cd), x_adv.to(cd), grad.to(cd)
    e = _eps_per_sample(eps, x, cd)
    a = _per_sample(alpha, x, cd)
    lo = _scalar_toward(lower, cd, down=False)
    hi = _scalar_toward(upper, cd, down=True)
    if norm == "linf":
        new = xa + a * torch.sign(g)
        new = torch.minimum(torch.maximum(new, _add_toward(xf, -e)), _add_toward(xf, e))
        new = new.clamp(lo, hi)
    elif norm == "l2":
        g = g / _sample_norm(g).clamp_min(1e-12)
        delta = xa + a * g - xf
        dn = _sample_norm(delta)
        factor = torch.where(dn > e, e / dn, torch.ones_like(dn))
        new = _add_toward(xf, delta * factor).clamp(lo, hi)
    else:
        raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
    new = _round_toward(new, xf, lo, hi, x_adv.dtype)
    if active is not None:
        mask = active.to(device=x.device, dtype=torch.bool).reshape(e.shape)
        new = torch.where(mask, new, x_adv)
    return new


def random_init(
    x: torch.Tensor,
    eps: Budget,
    *,
    norm: str = "linf",
    lower: float = 0.0,
    upper: float = 1.0,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """A uniform draw from the eps ball around x, clipped to [lower, upper].

    linf: x + U(-eps, eps) per element (noise drawn with ``torch.rand`` in float32).
    l2:   x + r * u, with u a uniform direction (normalised ``torch.randn``) and
          r = eps * U(0, 1) ** (1 / n), n the number of elements per sample.
    The random draws are made in this order and these shapes, so a kernel that draws
    the same way with the same generator gives the same point. Rounding follows the
    exactness rule above.
    """
    cd = _compute_dtype(x)
    e = _eps_per_sample(eps, x, cd)
    lo = _scalar_toward(lower, cd, down=False)
    hi = _scalar_toward(upper, cd, down=True)
    if norm == "linf":
        u = torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float32)
        noise = (2.0 * u.to(cd) - 1.0) * e
    elif norm == "l2":
        n = x[0].numel() if x.shape[0] > 0 else 1
        direction = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32).to(cd)
        direction = direction / _sample_norm(direction).clamp_min(1e-12)
        r = torch.rand((x.shape[0],), generator=generator, device=x.device, dtype=torch.float32).to(cd)
        radius = r.pow(1.0 / n).reshape(e.shape) * e
        noise = direction * radius
    else:
        raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
    xf = x.to(cd)
    return _round_toward(_add_toward(xf, noise).clamp(lo, hi), xf, lo, hi, x.dtype)


# --------------------------------------------------------------------- prototype loss
def proto_distance(z: torch.Tensor, prototypes: torch.Tensor, *, metric: str) -> torch.Tensor:
    """(B, C) distances d(z_b, P_c).

    linf: max_k |z_k - p_k|, its gradient the subgradient at the first arg-max coordinate;
    l2: ||z - p||_2 (zero gradient at z == p); cosine: 1 - cos(z, p) (eps 1e-8).
    """
    cd = _compute_dtype(z)
    zf = z.to(cd)[:, None, :]
    pf = prototypes.to(cd)[None, :, :]
    if metric == "linf":
        # gather at the first arg-max coordinate: the gradient is the subgradient there
        # (amax would split it evenly between tied coordinates)
        a = (zf - pf).abs()
        return a.gather(-1, a.argmax(dim=-1, keepdim=True)).squeeze(-1)
    if metric == "l2":
        return torch.linalg.vector_norm(zf - pf, dim=-1)
    if metric == "cosine":
        return 1.0 - F.cosine_similarity(zf, pf, dim=-1, eps=1e-8)
    raise ValueError(f"metric must be one of 'linf', 'cosine', 'l2', got {metric!r}")


def proto_logits(z: torch.Tensor, prototypes: torch.Tensor, *, metric: str) -> torch.Tensor:
    """(B, C) scores, higher is closer: cos(z, P_c) for cosine, -d(z, P_c) otherwise."""
    d = proto_distance(z, prototypes, metric=metric)
    return 1.0 - d if metric == "cosine" else -d


def proto_loss(
    z: torch.Tensor,
    prototypes: torch.Tensor,
    y: torch.Tensor,
    *,
    metric: str = DEFAULT_METRIC,
    reduction: str = "mean",
    ce_weight: float = 0.0,
    temperature: float = 1.0,
    ignore_index: int = -100,
    weight: Optional[torch.Tensor] = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """d(z_b, P[y_b]) + ce_weight * CE_b, reduced like torch.

    CE is ``F.cross_entropy(logits / temperature, y, weight=weight, ignore_index=ignore_index,
    label_smoothing=label_smoothing)``. Samples with ``y == ignore_index`` are dropped: 0 under
    "none", left out of "sum" and of the count of "mean". "mean" is the mean distance over the
    kept samples plus ce_weight times F.cross_entropy's own "mean" (weighted by ``weight``).
    """
    y = y.long()
    keep = y != ignore_index
    d = proto_distance(z, prototypes, metric=metric)
    dist = d.gather(1, torch.where(keep, y, 0).view(-1, 1)).squeeze(1)
    dist = torch.where(keep, dist, torch.zeros((), dtype=dist.dtype, device=dist.device))
    if reduction == "none":
        out = dist
    elif reduction == "sum":
        out = dist.sum()
    elif reduction == "mean":
        out = dist.sum() / keep.sum()
    else:
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if ce_weight != 0.0:
        logits = (1.0 - d if metric == "cosine" else -d) / temperature
        w = None if weight is None else weight.to(logits.dtype)
        out = out + ce_weight * F.cross_entropy(logits, y, weight=w, ignore_index=ignore_index,
                                                label_smoothing=label_smoothing, reduction=reduction)
    return out


# ---------------------------------------------------------------- prototype repulsion
def pairwise_distance(prototypes: torch.Tensor, *, metric: str) -> torch.Tensor:
    """(C, C) pairwise distances between the rows of P (zero on the diagonal)."""
    cd = _compute_dtype(prototypes)
    p = prototypes.to(cd)
    if metric == "linf":
        return (p[:, None, :] - p[None, :, :]).abs().amax(dim=-1)
    if metric == "l2":
        return torch.linalg.vector_norm(p[:, None, :] - p[None, :, :], dim=-1)
    if metric == "cosine":
        return 1.0 - F.cosine_similarity(p[:, None, :], p[None, :, :], dim=-1, eps=1e-8)
    raise ValueError(f"metric must be one of 'linf', 'cosine', 'l2', got {metric!r}")


def repulsion_energy(
    prototypes: torch.Tensor, *, metric: str = DEFAULT_METRIC, kind: str = "softmin", temperature: float = 0.05
) -> torch.Tensor:
    """All-pairs repulsion energy (a scalar); minimising it pushes prototypes apart.

    sum:     E = -sum_{i<j} d_ij                       (the paper's objective)
    softmin: E = t * log sum_{i != j} exp(-d_ij / t)   (smooth max of the minimum distance)
    """
    d = pairwise_distance(prototypes, metric=metric)
    c = d.shape[0]
    if kind == "sum":
        iu = torch.triu_indices(c, c, offset=1, device=d.device)
        return -d[iu[0], iu[1]].sum()
    if kind == "softmin":
        off = ~torch.eye(c, dtype=torch.bool, device=d.device)
        if c < 2:
            return d.sum() * 0.0 - math.inf
        return temperature * torch.logsumexp(-d[off] / temperature, dim=0)
    raise ValueError(f"kind must be 'sum' or 'softmin', got {kind!r}")


# ------------------------------------------------------------------ lp distance layer
def lp_dist(x: torch.Tensor, w: torch.Tensor, p: float) -> torch.Tensor:
    """(B, N) ``(sum_k |x[b, k] - w[n, k]|^p)^(1/p)`` by explicit broadcast (O(B N D) memory).

    p = inf: ``max_k |d_k|``, its gradient the subgradient at the first arg-max coordinate.
    Finite p: ``m * (sum_k (|d_k| / m)^p)^(1/p)`` with m the pair's largest |d_k| (the same value,
    but p = 1000 neither overflows nor underflows); the gradient ``sign(d_k) (|d_k| / out)^(p - 1)``
    is zero where the distance is 0.
    Non-finite input: a pair with a NaN has distance NaN, else one with an infinite coordinate has
    distance inf. Finite p: every coordinate of such a pair's rows gets a NaN gradient. p = inf: the
    arg-max counts NaN as the largest value, so the gradient is NaN there (sign(d) * grad for an
    infinite coordinate).
    float32 for 16-bit inputs, float64 when x or w is float64.
    """
    cd = torch.float64 if torch.float64 in (x.dtype, w.dtype) else torch.float32
    d = x.to(cd)[:, None, :] - w.to(cd)[None, :, :]
    if d.shape[-1] == 0:
        return d.abs().sum(dim=-1)
    if p == math.inf:
        return _LinfOfLastDim.apply(d)
    return _PnormOfLastDim.apply(d, float(p))


def scaled_pnorm(a: torch.Tensor, p: float) -> torch.Tensor:
    """The p-norm over the last dimension of magnitudes ``a >= 0`` (non-empty), computed as
    ``m * (sum_k (a_k / m)^p)^(1/p)`` with m the largest a_k, so p = 1000 neither overflows nor
    underflows; 0 where every a_k is 0, NaN where some a_k is NaN, else inf where some a_k is inf.
    p = inf: the maximum."""
    if p == math.inf:
        return a.amax(dim=-1)
    m = a.amax(dim=-1, keepdim=True)  # NaN if any a_k is NaN
    ok = (m > 0) & m.isfinite()
    m_safe = torch.where(ok, m, torch.ones_like(m))
    s = ((a / m_safe) ** p).sum(dim=-1, keepdim=True)
    s_safe = torch.where(ok, s, torch.ones_like(s))
    return torch.where(ok, m_safe * s_safe ** (1.0 / p), m).squeeze(-1)


class _PnormOfLastDim(torch.autograd.Function):
    """scaled_pnorm(|d|, p) with the gradient written out: ``sign(d_k) (|d_k| / out)^(p - 1)``,
    0 where out is 0 and NaN where out is not finite."""

    @staticmethod
    def forward(ctx, d, p):
        out = scaled_pnorm(d.abs(), p)
        ctx.save_for_backward(d, out)
        ctx.p = p
        return out

    @staticmethod
    def backward(ctx, g):
        d, out = ctx.saved_tensors
        o = out[..., None]
        ok = (o > 0) & o.isfinite()
        o_safe = torch.where(ok, o, torch.ones_like(o))
        weight = torch.sign(d) * (d.abs() / o_safe) ** (ctx.p - 1.0)  # |d_k| / out <= 1: no overflow
        weight = torch.where(ok, weight, torch.where(o == 0, 0.0, math.nan))
        return g[..., None] * weight, None


class _LinfOfLastDim(torch.autograd.Function):
    """max_k |d_k| over the last dimension, its gradient ``sign(d_k) * grad`` at the first arg-max
    k, where NaN counts as the largest value (and its sign is NaN)."""

    @staticmethod
    def forward(ctx, d):
        a = d.abs()
        nan = a.isnan()
        k = torch.where(nan.any(dim=-1), nan.to(torch.uint8).argmax(dim=-1), a.argmax(dim=-1))[..., None]
        ctx.save_for_backward(d, k)
        return a.gather(-1, k).squeeze(-1)

    @staticmethod
    def backward(ctx, g):
        d, k = ctx.saved_tensors
        dk = d.gather(-1, k)
        sign = torch.where(dk.isnan(), dk, torch.sign(dk))
        return torch.zeros_like(d).scatter_(-1, k, g[..., None] * sign)
