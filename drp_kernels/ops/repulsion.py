"""Fused all-pairs repulsion energy and its gradient (Triton), never holding the C x C matrix.

Notation: X is (C, D); d_ij is the pairwise "distance" of rows i and j.

  metric "cosine": the launcher L2-normalises the rows in PyTorch first (differentiable, O(C*D)),
                   the kernels then see unit rows and use d_ij = 1 - x_i . x_j with ``tl.dot``;
  metric "l2":     d_ij = ||x_i - x_j||_2, broadcast-reduce over D chunks;
  metric "linf":   d_ij = max_k |x_ik - x_jk|, broadcast-reduce over D chunks.

  kind "sum":      E = -sum_{i<j} d_ij = -1/2 sum_i r_i,          r_i = sum_{j != i} d_ij
  kind "softmin":  E = t log sum_{i != j} exp(-d_ij / t) = t logsumexp_i(l_i),
                   l_i = logsumexp_{j != i}(-d_ij / t)                     (per-row log-sum-exp)

Forward (``_repulsion_fwd_kernel``): one program per block of rows i loops over all blocks of
rows j (and, inside, over D) and writes the per-row statistic r_i or l_i (C floats). The energy is
a reduction of those C numbers. Softmin keeps a running max and sum per row (flash-attention style).

Backward: the energy sums a symmetric function over ordered pairs, so with G_ij = dE/dd_ij
(the same for (i, j) and (j, i)) the gradient of row i gathers both roles:

  dE/dx_i = 2 sum_{j != i} G_ij dd(x_i, x_j)/dx_i,
  G_ij = -g / 2 (sum)    or    G_ij = -g exp(-d_ij / t - log S) (softmin, log S = E / t),

with g the incoming gradient. Each program owns a block of rows i and recomputes d_ij tile by
tile, so nothing of size C x C is stored and no atomics are needed (each pair is visited twice,
once from each side).

  cosine (``_repulsion_bwd_dot_kernel``): dE/dx_i = -sum_j coef_ij x_j, a second ``tl.dot``; the
         grid also splits the output columns so the fp32 accumulator stays in registers.
  l2 / linf (``_repulsion_bwd_diff_kernel``): the first pass over D recomputes d_ij (and, for linf,
         how many coordinates attain the max, to split the gradient between ties like
         ``torch.amax``); a second pass over D adds coef_ij * dd/dx_i into the program's own rows
         of the fp32 gradient (the arg-max coordinate for linf, (x_i - x_j) / d_ij for l2).

All math is fp32 whatever the input dtype; fp32 dot products use ``input_precision`` from
``DRP_DOT_PRECISION`` (default "tf32x3", close to full fp32 on tensor cores; "ieee" or "tf32" are
the alternatives). ``DRP_AUTOTUNE=1`` turns on autotuning of the block sizes (off by default, so
the first call is not slow).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = [
    "METRICS",
    "KINDS",
    "repulsion_forward",
    "repulsion_backward",
    "repulsion_energy",
]

METRICS = ("linf", "l2", "cosine")
KINDS = ("sum", "softmin")
_METRIC_ID = {"cosine": 0, "l2": 1, "linf": 2}
_KIND_ID = {"sum": 0, "softmin": 1}
_NORM_EPS = 1e-8  # same eps as reference.pairwise_distance (F.cosine_similarity)


def _autotune_enabled() -> bool:
    return os.environ.get("DRP_AUTOTUNE", "0").strip().lower() in ("1", "true", "yes", "on")


def _dot_precision() -> str:
    p = os.environ.get("DRP_DOT_PRECISION", "tf32x3").strip().lower()
    if p not in ("ieee", "tf32", "tf32x3"):
        raise ValueError(f"DRP_DOT_PRECISION must be 'ieee', 'tf32' or 'tf32x3', got {p!r}")
    return p


# ------------------------------------------------------------------------------ kernels
@triton.jit
def _dist_tile(X, offs_i, offs_j, mask_i, mask_j, D, stride_c, stride_d,
               METRIC: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
               BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, PRECISION: tl.constexpr):
    """(BLOCK_I, BLOCK_J) fp32 distances d_ij; also the number of arg-max ties for linf."""
    acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
    ties = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_D):
        offs_k = k0 + tl.arange(0, BLOCK_D)
        a_ptr = X + offs_i[:, None] * stride_c + offs_k[None, :] * stride_d
        b_ptr = X + offs_j[:, None] * stride_c + offs_k[None, :] * stride_d
        if EVEN_D:
            a = tl.load(a_ptr, mask=mask_i[:, None], other=0.0).to(tl.float32)
            b = tl.load(b_ptr, mask=mask_j[:, None], other=0.0).to(tl.float32)
        else:
            mk = offs_k < D
            a = tl.load(a_ptr, mask=mask_i[:, None] & mk[None, :], other=0.0).to(tl.float32)
            b = tl.load(b_ptr, mask=mask_j[:, None] & mk[None, :], other=0.0).to(tl.float32)
        if METRIC == 0:
            acc += tl.dot(a, tl.trans(b), input_precision=PRECISION)
        else:
            diff = a[:, None, :] - b[None, :, :]
            if METRIC == 1:
                acc += tl.sum(diff * diff, axis=2)
            else:
                ad = tl.abs(diff)
                cmax = tl.max(ad, axis=2)
                ccount = tl.sum((ad == cmax[:, :, None]).to(tl.float32), axis=2)
                # padded coordinates give |diff| = 0; they only count when the true max is 0
                if not EVEN_D:
                    npad = (BLOCK_D - tl.minimum(D - k0, BLOCK_D)).to(tl.float32)
                    ccount = ccount - tl.where(cmax == 0.0, npad, 0.0)
                ties = tl.where(cmax > acc, ccount, tl.where(cmax == acc, ties + ccount, ties))
                acc = tl.maximum(acc, cmax)
    if METRIC == 0:
        dist = 1.0 - acc
    elif METRIC == 1:
        dist = tl.sqrt(acc)
    else:
        dist = acc
    return dist, ties


@triton.heuristics({"EVEN_D": lambda a: a["D"] % a["BLOCK_D"] == 0})
@triton.jit
def _repulsion_fwd_kernel(
    X, ROW, C, D, stride_c, stride_d, temperature,
    METRIC: tl.constexpr, KIND: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs_i = pid * BLOCK_I + tl.arange(0, BLOCK_I)
    mask_i = offs_i < C
    t = tl.cast(temperature, tl.float32)
    m_i = tl.full((BLOCK_I,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_I,), dtype=tl.float32)
    for j0 in range(0, C, BLOCK_J):
        offs_j = (j0 + tl.arange(0, BLOCK_J)).to(tl.int64)
        mask_j = offs_j < C
        dist, _ties = _dist_tile(X, offs_i, offs_j, mask_i, mask_j, D, stride_c, stride_d,
                                 METRIC, BLOCK_I, BLOCK_J, BLOCK_D, EVEN_D, PRECISION)
        valid = mask_i[:, None] & mask_j[None, :] & (offs_i[:, None] != offs_j[None, :])
        if KIND == 0:
            l_i += tl.sum(tl.where(valid, dist, 0.0), axis=1)
        else:
            z = tl.where(valid, -dist / t, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(z, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(z - m_safe[:, None]), axis=1)
            m_i = m_new
    if KIND == 0:
        out = l_i
    else:
        out = m_i + tl.log(tl.where(mask_i, l_i, 1.0))
    tl.store(ROW + offs_i, out, mask=mask_i)


@triton.jit
def _pair_coef(dist, valid, g, log_s, t, KIND: tl.constexpr):
    """coef_ij = 2 G_ij (see the module docstring), zero off the valid pairs."""
    if KIND == 0:
        coef = tl.where(valid, -g, 0.0)
    else:
        # exponent masked first: off the valid pairs (e.g. the diagonal) it could overflow
        coef = -2.0 * g * tl.exp(tl.where(valid, -dist / t - log_s, float("-inf")))
    return coef


@triton.heuristics({"EVEN_D": lambda a: a["D"] % a["BLOCK_D"] == 0})
@triton.jit
def _repulsion_bwd_dot_kernel(
    X, SCAL, GRAD, C, D, stride_c, stride_d, stride_gc, stride_gd, temperature,
    KIND: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr,
    EVEN_D: tl.constexpr,
):
    pid_i = tl.program_id(0).to(tl.int64)
    pid_o = tl.program_id(1).to(tl.int64)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    mask_i = offs_i < C
    offs_o = pid_o * BLOCK_DO + tl.arange(0, BLOCK_DO)
    mask_o = offs_o < D
    t = tl.cast(temperature, tl.float32)
    g = tl.load(SCAL).to(tl.float32)
    log_s = tl.load(SCAL + 1).to(tl.float32)
    acc = tl.zeros((BLOCK_I, BLOCK_DO), dtype=tl.float32)
    for j0 in range(0, C, BLOCK_J):
        offs_j = (j0 + tl.arange(0, BLOCK_J)).to(tl.int64)
        mask_j = offs_j < C
        dist, _ties = _dist_tile(X, offs_i, offs_j, mask_i, mask_j, D, stride_c, stride_d,
                                 0, BLOCK_I, BLOCK_J, BLOCK_D, EVEN_D, PRECISION)
        valid = mask_i[:, None] & mask_j[None, :] & (offs_i[:, None] != offs_j[None, :])
        coef = _pair_coef(dist, valid, g, log_s, t, KIND)
        xj = tl.load(X + offs_j[:, None] * stride_c + offs_o[None, :] * stride_d,
                     mask=mask_j[:, None] & mask_o[None, :], other=0.0).to(tl.float32)
        acc += tl.dot(coef, xj, input_precision=PRECISION)
    tl.store(GRAD + offs_i[:, None] * stride_gc + offs_o[None, :] * stride_gd, -acc,
             mask=mask_i[:, None] & mask_o[None, :])


@triton.heuristics({"EVEN_D": lambda a: a["D"] % a["BLOCK_D"] == 0})
@triton.jit
def _repulsion_bwd_diff_kernel(
    X, SCAL, GRAD, C, D, stride_c, stride_d, stride_gc, stride_gd, temperature,
    METRIC: tl.constexpr, KIND: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
):
    # GRAD is fp32, zero-initialised, and only this program touches its rows.
    pid = tl.program_id(0).to(tl.int64)
    offs_i = pid * BLOCK_I + tl.arange(0, BLOCK_I)
    mask_i = offs_i < C
    t = tl.cast(temperature, tl.float32)
    g = tl.load(SCAL).to(tl.float32)
    log_s = tl.load(SCAL + 1).to(tl.float32)
    for j0 in range(0, C, BLOCK_J):
        offs_j = (j0 + tl.arange(0, BLOCK_J)).to(tl.int64)
        mask_j = offs_j < C
        # pass 1 over D: the distances (and linf arg-max tie counts) of this tile
        dist, ties = _dist_tile(X, offs_i, offs_j, mask_i, mask_j, D, stride_c, stride_d,
                                METRIC, BLOCK_I, BLOCK_J, BLOCK_D, EVEN_D, "ieee")
        valid = mask_i[:, None] & mask_j[None, :] & (offs_i[:, None] != offs_j[None, :])
        coef = _pair_coef(dist, valid, g, log_s, t, KIND)
        if METRIC == 1:
            # d ||x_i - x_j|| / d x_i = (x_i - x_j) / d_ij, taken as 0 at d_ij = 0 like torch
            coef = tl.where(dist > 0.0, coef / tl.where(dist > 0.0, dist, 1.0), 0.0)
        else:
            coef = coef / tl.maximum(ties, 1.0)
        # pass 2 over D: add this tile's contribution to rows i of the gradient
        for k0 in range(0, D, BLOCK_D):
            offs_k = k0 + tl.arange(0, BLOCK_D)
            mk = offs_k < D
            a = tl.load(X + offs_i[:, None] * stride_c + offs_k[None, :] * stride_d,
                        mask=mask_i[:, None] & mk[None, :], other=0.0).to(tl.float32)
            b = tl.load(X + offs_j[:, None] * stride_c + offs_k[None, :] * stride_d,
                        mask=mask_j[:, None] & mk[None, :], other=0.0).to(tl.float32)
            diff = a[:, None, :] - b[None, :, :]
            if METRIC == 1:
                contrib = tl.sum(coef[:, :, None] * diff, axis=1)
            else:
                hit = tl.abs(diff) == dist[:, :, None]
                sgn = tl.where(diff > 0.0, 1.0, tl.where(diff < 0.0, -1.0, 0.0))
                contrib = tl.sum(tl.where(hit, coef[:, :, None] * sgn, 0.0), axis=1)
            gptr = GRAD + offs_i[:, None] * stride_gc + offs_k[None, :] * stride_gd
            gmask = mask_i[:, None] & mk[None, :]
            cur = tl.load(gptr, mask=gmask, other=0.0)
            tl.store(gptr, cur + contrib, mask=gmask)
            # the next read of these addresses may come from other threads of the program
            tl.debug_barrier()


# ---------------------------------------------------------------------- configurations
def _fwd_configs(metric: str):
    if metric == "cosine":
        return [triton.Config({"BLOCK_I": bi, "BLOCK_J": bj, "BLOCK_D": bd}, num_warps=w, num_stages=s)
                for bi, bj, bd, w, s in [(128, 64, 32, 8, 3), (64, 64, 32, 4, 3), (128, 128, 32, 8, 3),
                                         (64, 128, 64, 4, 3), (128, 64, 64, 8, 2)]]
    return [triton.Config({"BLOCK_I": bi, "BLOCK_J": bj, "BLOCK_D": bd}, num_warps=w, num_stages=s)
            for bi, bj, bd, w, s in [(32, 32, 8, 4, 2), (64, 32, 8, 8, 2), (32, 32, 16, 8, 2),
                                     (64, 64, 4, 8, 2), (16, 16, 16, 4, 2)]]


def _bwd_dot_configs():
    return [triton.Config({"BLOCK_I": bi, "BLOCK_J": bj, "BLOCK_D": bd}, num_warps=w, num_stages=s)
            for bi, bj, bd, w, s in [(64, 64, 32, 8, 2), (64, 32, 32, 4, 2), (128, 64, 32, 8, 2),
                                     (32, 64, 32, 4, 3)]]


_DEFAULT = {
    # (BLOCK_I, BLOCK_J, BLOCK_D, num_warps, num_stages)
    "fwd_dot": (128, 64, 32, 8, 3),
    "fwd_diff": (32, 32, 8, 4, 2),
    "bwd_dot": (64, 64, 32, 8, 2),
    "bwd_diff": (32, 32, 8, 4, 2),
}
_tuned = {}


def _tuned_kernel(name: str, kernel, configs, key, reset=None):
    """The kernel wrapped in triton.autotune (built once, only when DRP_AUTOTUNE is on)."""
    if name not in _tuned:
        _tuned[name] = triton.autotune(configs=configs, key=key, reset_to_zero=reset)(kernel)
    return _tuned[name]


def _block_do(D: int) -> int:
    """Output columns per program of the cosine backward (fp32 accumulator kept in registers)."""
    return max(16, min(256, triton.next_power_of_2(D)))


# ---------------------------------------------------------------------------- launchers
def _check_x(x: torch.Tensor, metric: str, kind: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if x.dim() != 2:
        raise ValueError(f"X must be 2-D (C, D), got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"X must be float16, bfloat16 or float32 for the kernels, got {x.dtype}")


def repulsion_forward(x: torch.Tensor, *, metric: str, kind: str, temperature: float) -> torch.Tensor:
    """Per-row statistic (C,) fp32: r_i = sum_{j!=i} d_ij (sum) or l_i (softmin).

    For metric "cosine" the rows of ``x`` must already be unit vectors (see module docstring).
    """
    _check_x(x, metric, kind)
    C, D = x.shape
    row = torch.empty(C, device=x.device, dtype=torch.float32)
    args = dict(METRIC=_METRIC_ID[metric], KIND=_KIND_ID[kind], PRECISION=_dot_precision())
    dot = metric == "cosine"
    if _autotune_enabled():
        k = _tuned_kernel("fwd_dot" if dot else "fwd_diff", _repulsion_fwd_kernel, _fwd_configs(metric),
                          ["C", "D", "METRIC", "KIND"])
        grid = lambda meta: (triton.cdiv(C, meta["BLOCK_I"]),)  # noqa: E731
        k[grid](x, row, C, D, x.stride(0), x.stride(1), float(temperature), **args)
    else:
        bi, bj, bd, w, s = _DEFAULT["fwd_dot" if dot else "fwd_diff"]
        _repulsion_fwd_kernel[(triton.cdiv(C, bi),)](
            x, row, C, D, x.stride(0), x.stride(1), float(temperature), **args,
            BLOCK_I=bi, BLOCK_J=bj, BLOCK_D=bd, num_warps=w, num_stages=s)
    return row


def _log_s(row: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "softmin":
        return torch.logsumexp(row, dim=0)
    return torch.zeros((), device=row.device, dtype=torch.float32)


def repulsion_backward(grad: torch.Tensor, x: torch.Tensor, row: torch.Tensor, *, metric: str, kind: str,
                       temperature: float) -> torch.Tensor:
    """dE/dx (same dtype as x) from the incoming gradient of E and the forward's per-row statistic."""
    _check_x(x, metric, kind)
    C, D = x.shape
    scal = torch.stack([grad.reshape(()).to(torch.float32), _log_s(row, kind).to(torch.float32)])
    t = float(temperature)
    if metric == "cosine":
        gx = torch.empty(C, D, device=x.device, dtype=torch.float32)
        bdo = _block_do(D)
        args = dict(KIND=_KIND_ID[kind], PRECISION=_dot_precision(), BLOCK_DO=bdo)
        if _autotune_enabled():
            k = _tuned_kernel("bwd_dot", _repulsion_bwd_dot_kernel, _bwd_dot_configs(), ["C", "D", "KIND"])
            grid = lambda meta: (triton.cdiv(C, meta["BLOCK_I"]), triton.cdiv(D, bdo))  # noqa: E731
            k[grid](x, scal, gx, C, D, x.stride(0), x.stride(1), gx.stride(0), gx.stride(1), t, **args)
        else:
            bi, bj, bd, w, s = _DEFAULT["bwd_dot"]
            _repulsion_bwd_dot_kernel[(triton.cdiv(C, bi), triton.cdiv(D, bdo))](
                x, scal, gx, C, D, x.stride(0), x.stride(1), gx.stride(0), gx.stride(1), t, **args,
                BLOCK_I=bi, BLOCK_J=bj, BLOCK_D=bd, num_warps=w, num_stages=s)
    else:
        gx = torch.zeros(C, D, device=x.device, dtype=torch.float32)
        args = dict(METRIC=_METRIC_ID[metric], KIND=_KIND_ID[kind])
        if _autotune_enabled():
            k = _tuned_kernel("bwd_diff", _repulsion_bwd_diff_kernel, _fwd_configs(metric),
                              ["C", "D", "METRIC", "KIND"], reset=["GRAD"])
            grid = lambda meta: (triton.cdiv(C, meta["BLOCK_I"]),)  # noqa: E731
            k[grid](x, scal, gx, C, D, x.stride(0), x.stride(1), gx.stride(0), gx.stride(1), t, **args)
        else:
            bi, bj, bd, w, s = _DEFAULT["bwd_diff"]
            _repulsion_bwd_diff_kernel[(triton.cdiv(C, bi),)](
                x, scal, gx, C, D, x.stride(0), x.stride(1), gx.stride(0), gx.stride(1), t, **args,
                BLOCK_I=bi, BLOCK_J=bj, BLOCK_D=bd, num_warps=w, num_stages=s)
    return gx.to(x.dtype)


def _energy_from_rows(row: torch.Tensor, kind: str, temperature: float) -> torch.Tensor:
    if kind == "sum":
        return -0.5 * row.sum()
    return temperature * torch.logsumexp(row, dim=0)


# ------------------------------------------------------------------ torch.library registration
@torch.library.custom_op("drp::repulsion_fwd", mutates_args=())
def _repulsion_fwd_op(x: torch.Tensor, metric: str, kind: str, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(E, per-row statistic); the statistic is an auxiliary output with no gradient."""
    row = repulsion_forward(x, metric=metric, kind=kind, temperature=temperature)
    return _energy_from_rows(row, kind, temperature), row


@_repulsion_fwd_op.register_fake
def _(x, metric, kind, temperature):
    return x.new_empty((), dtype=torch.float32), x.new_empty((x.shape[0],), dtype=torch.float32)


@torch.library.custom_op("drp::repulsion_bwd", mutates_args=())
def _repulsion_bwd_op(grad: torch.Tensor, x: torch.Tensor, row: torch.Tensor, metric: str, kind: str,
                      temperature: float) -> torch.Tensor:
    return repulsion_backward(grad, x, row, metric=metric, kind=kind, temperature=temperature)


@_repulsion_bwd_op.register_fake
def _(grad, x, row, metric, kind, temperature):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    x, metric, kind, temperature = inputs
    ctx.save_for_backward(x, output[1])
    ctx.metric, ctx.kind, ctx.temperature = metric, kind, temperature


def _backward(ctx, grad_energy, grad_row):
    # grad_row is ignored: the per-row statistic is an auxiliary, non-differentiable output.
    x, row = ctx.saved_tensors
    gx = torch.ops.drp.repulsion_bwd(grad_energy, x, row, ctx.metric, ctx.kind, ctx.temperature)
    return gx, None, None, None


_repulsion_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# -------------------------------------------------------------------------- public entry
def repulsion_energy(P: torch.Tensor, *, metric: str = "cosine", kind: str = "softmin",
                     temperature: float = 0.05) -> torch.Tensor:
    """Repulsion energy of the rows of P on the Triton kernels (differentiable w.r.t. P).

    Same definition as ``drp_kernels.reference.repulsion_energy``. Returns an fp32 scalar.
    cosine normalises the rows in fp32 first (an O(C*D) copy, differentiable through autograd).
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if metric == "cosine":
        pf = P.to(torch.float32)
        x = pf / torch.linalg.vector_norm(pf, dim=1, keepdim=True).clamp_min(_NORM_EPS)
    else:
        x = P
    energy, _row = torch.ops.drp.repulsion_fwd(x, metric, kind, float(temperature))
    return energy

