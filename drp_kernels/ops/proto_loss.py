"""Fused Triton kernels for distance-to-prototype logits and the ProtoLoss.

Three paths, none of which ever holds a B x C matrix unless the caller asked for one:

* loss-only (``ce_weight == 0``): ``_proto_gather_fwd_kernel`` / ``_proto_gather_bwd_kernel``.
  One program per block of rows reads each z row and its target prototype P[y] (a gather)
  once; the other C - 1 prototypes are never touched. The forward stores the per-row
  distance and, for linf, the arg-max coordinate; the backward recomputes the rest and
  adds the prototype gradient with atomics.
* logits (``proto_logits``): ``_proto_logits_fwd_kernel`` tiles (B, C) and loops over D.
  cosine runs ``tl.dot`` on the raw rows and scales by precomputed inverse norms; l2 and
  linf use broadcast-reduce tiles (L-inf is not a matmul). ``_proto_logits_bwd_kernel``
  recomputes whatever the gradient needs tile by tile (l2 distances, the linf arg-max
  coordinate per (b, c)) and accumulates fp32 partial gradients with atomics.
* fused cross-entropy (``ce_weight > 0``): ``_proto_lse_fwd_kernel`` computes an online
  log-sum-exp of logits / temperature over C tiles (split over C for parallelism; only a
  (splits, B) partial result is stored); the backward reuses ``_proto_logits_bwd_kernel``
  with ``FROM_CE``: it recomputes each logits tile, forms ``softmax`` from the saved
  log-sum-exp and never materialises B x C.

All arithmetic runs in fp32 registers; inputs are cast at load and outputs at store.
Strides of z, P, y and of the incoming logits gradient are honoured (no hidden copies).
The fp32 cosine dot product uses ``input_precision="tf32x3"`` on CUDA (fp32-level
accuracy on tensor cores; ``DRP_FP32_DOT=ieee`` forces plain fp32) and IEEE fp32 under the
interpreter. When z and P share a 16-bit dtype the dot runs natively in that dtype, and
the backward splits its fp32 weights into a hi + lo pair of that dtype (two dots) so the
gradient keeps ~16 bits of the weight's mantissa.

``DRP_AUTOTUNE=1`` (read at import) autotunes the tile sizes; by default fixed tiles are
used so the first call is not slow.

The ops are registered with ``torch.library.custom_op`` (+ ``register_fake`` and
``register_autograd``) in the ``drp`` namespace, so ``torch.compile(fullgraph=True)``
traces through them without a graph break.
"""
from __future__ import annotations

import os
from typing import Tuple

import torch
import triton
import triton.language as tl

from .._backend import interpreter_enabled

__all__ = [
    "METRICS",
    "COSINE_EPS",
    "proto_loss_forward",
    "proto_loss_backward",
    "proto_logits_forward",
    "proto_logits_backward",
]

METRICS = {"linf": 0, "l2": 1, "cosine": 2}
COSINE_EPS = 1e-8
_LOG2E = 1.4426950408889634
_AUTOTUNE = os.environ.get("DRP_AUTOTUNE", "0").strip().lower() in ("1", "true", "yes", "on")


# ------------------------------------------------------------------------- jit helpers
@triton.jit
def _dot(a, b, DOT_PREC: tl.constexpr):
    """a @ b accumulated in fp32 (native 16-bit dot, or fp32 with the given precision)."""
    if DOT_PREC == "native":
        return tl.dot(a, b)
    else:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=DOT_PREC)


@triton.jit
def _dot_weights(h, x, DOT_PREC: tl.constexpr):
    """fp32 weights h (M, K) times x (K, N); in native mode h is split into hi + lo of x's dtype."""
    if DOT_PREC == "native":
        hi = h.to(x.dtype)
        lo = (h - hi.to(tl.float32)).to(x.dtype)
        return tl.dot(hi, x) + tl.dot(lo, x)
    else:
        return tl.dot(h, x.to(tl.float32), input_precision=DOT_PREC)


@triton.jit
def _sign(x):
    return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))


@triton.jit
def _tile_logits(z_ptr, p_ptr, rows, cols, rmask, cmask, D,
                 stride_zb, stride_zd, stride_pc, stride_pd, inv_zn, inv_pn,
                 METRIC: tl.constexpr, WANT_ARG: tl.constexpr,
                 BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                 EVEN_D: tl.constexpr, DOT_PREC: tl.constexpr):
    """Logits of a (BLOCK_B, BLOCK_C) tile, looping over D.

    Returns (logits, karg, ksign); for linf with WANT_ARG, karg is the first arg-max
    coordinate of |z - p| and ksign the sign of (z - p) there (else zeros).
    """
    acc = tl.zeros((BLOCK_B, BLOCK_C), dtype=tl.float32)
    karg = tl.zeros((BLOCK_B, BLOCK_C), dtype=tl.int32)
    ksign = tl.zeros((BLOCK_B, BLOCK_C), dtype=tl.float32)
    if METRIC == 0:
        acc = acc - 1.0  # below any |z - p|, so the first chunk always sets the arg-max
    z_rows = z_ptr + rows[:, None] * stride_zb
    p_rows = p_ptr + cols[:, None] * stride_pc
    offs = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        dk = d0 + offs
        if EVEN_D:
            zm = rmask[:, None]
            pm = cmask[:, None]
        else:
            zm = rmask[:, None] & (dk[None, :] < D)
            pm = cmask[:, None] & (dk[None, :] < D)
        zt = tl.load(z_rows + dk[None, :] * stride_zd, mask=zm, other=0.0)
        pt = tl.load(p_rows + dk[None, :] * stride_pd, mask=pm, other=0.0)
        if METRIC == 2:
            acc += _dot(zt, tl.trans(pt), DOT_PREC)
        else:
            diff = zt.to(tl.float32)[:, None, :] - pt.to(tl.float32)[None, :, :]
            if METRIC == 1:
                acc += tl.sum(diff * diff, axis=2)
            else:
                a = tl.abs(diff)
                if WANT_ARG:
                    cmax, carg = tl.max(a, axis=2, return_indices=True, return_indices_tie_break_left=True)
                    sel = offs[None, None, :] == carg[:, :, None]
                    csign = tl.sum(tl.where(sel, _sign(diff), 0.0), axis=2)
                    upd = cmax > acc
                    karg = tl.where(upd, carg.to(tl.int32) + d0, karg)
                    ksign = tl.where(upd, csign, ksign)
                    acc = tl.where(upd, cmax, acc)
                else:
                    acc = tl.maximum(acc, tl.max(a, axis=2))
    if METRIC == 2:
        s = acc * inv_zn[:, None] * inv_pn[None, :]
    elif METRIC == 1:
        s = -tl.sqrt(acc)
    else:
        s = -acc
    return s, karg, ksign


# ------------------------------------------------------------------ loss-only kernels
@triton.heuristics({"EVEN_D": lambda a: a["D"] % a["BLOCK_D"] == 0})
@triton.jit
def _proto_gather_fwd_kernel(z_ptr, p_ptr, y_ptr, dist_ptr, idx_ptr, B, C, D,
                             stride_zb, stride_zd, stride_pc, stride_pd, stride_y, eps,
                             METRIC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
                             EVEN_D: tl.constexpr):
    """dist[b] = d(z_b, P[y_b]) (NaN for a target outside [0, C)); idx[b] = linf arg-max."""
    eps = tl.cast(eps, tl.float32)
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    y = tl.load(y_ptr + rows * stride_y, mask=rmask, other=0).to(tl.int64)
    valid = rmask & (y >= 0) & (y < C)
    y = tl.where(valid, y, 0)
    z_rows = z_ptr + rows[:, None] * stride_zb
    p_rows = p_ptr + y[:, None] * stride_pc
    offs = tl.arange(0, BLOCK_D)
    acc0 = tl.zeros((BLOCK_B,), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_B,), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_B,), dtype=tl.float32)
    best = tl.zeros((BLOCK_B,), dtype=tl.int32)
    if METRIC == 0:
        acc0 = acc0 - 1.0
    for d0 in range(0, D, BLOCK_D):
        dk = d0 + offs
        if EVEN_D:
            m = valid[:, None]
        else:
            m = valid[:, None] & (dk[None, :] < D)
        zt = tl.load(z_rows + dk[None, :] * stride_zd, mask=m, other=0.0).to(tl.float32)
        pt = tl.load(p_rows + dk[None, :] * stride_pd, mask=m, other=0.0).to(tl.float32)
        if METRIC == 0:
            cmax, carg = tl.max(tl.abs(zt - pt), axis=1, return_indices=True,
                                return_indices_tie_break_left=True)
            upd = cmax > acc0
            best = tl.where(upd, carg.to(tl.int32) + d0, best)
            acc0 = tl.where(upd, cmax, acc0)
        elif METRIC == 1:
            diff = zt - pt
            acc0 += tl.sum(diff * diff, axis=1)
        else:
            acc0 += tl.sum(zt * pt, axis=1)
            acc1 += tl.sum(zt * zt, axis=1)
            acc2 += tl.sum(pt * pt, axis=1)
    if METRIC == 0:
        dist = acc0
    elif METRIC == 1:
        dist = tl.sqrt(acc0)
    else:
        zn = tl.maximum(tl.sqrt(acc1), eps)
        pn = tl.maximum(tl.sqrt(acc2), eps)
        dist = 1.0 - acc0 / (zn * pn)
    dist = tl.where(valid, dist, float("nan"))
    tl.store(dist_ptr + rows, dist, mask=rmask)
    tl.store(idx_ptr + rows, best, mask=rmask)


@triton.heuristics({"EVEN_D": lambda a: a["D"] % a["BLOCK_D"] == 0})
@triton.jit
def _proto_gather_bwd_kernel(g_ptr, z_ptr, p_ptr, y_ptr, idx_ptr, base_ptr, gz_ptr, gp_ptr,
                             B, C, D, stride_zb, stride_zd, stride_pc, stride_pd, stride_y,
                             stride_gzb, eps, coef,
                             METRIC: tl.constexpr, HAS_BASE: tl.constexpr, HAS_GRAD_P: tl.constexpr,
                             BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr):
    """grad_z[b] = coef * g[b] * dd(z_b, P[y_b])/dz_b (+ base[b]); grad_P[y_b] += the P side."""
    eps = tl.cast(eps, tl.float32)
    coef = tl.cast(coef, tl.float32)
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    y = tl.load(y_ptr + rows * stride_y, mask=rmask, other=0).to(tl.int64)
    valid = rmask & (y >= 0) & (y < C)
    y = tl.where(valid, y, 0)
    g = tl.load(g_ptr + rows, mask=rmask, other=0.0).to(tl.float32) * coef
    g = tl.where(valid, g, 0.0)
    z_rows = z_ptr + rows[:, None] * stride_zb
    p_rows = p_ptr + y[:, None] * stride_pc
    gz_rows = gz_ptr + rows[:, None] * stride_gzb
    base_rows = base_ptr + rows[:, None] * D
    gp_rows = gp_ptr + y[:, None] * D
    offs = tl.arange(0, BLOCK_D)
    if METRIC == 0:
        k = tl.load(idx_ptr + rows, mask=rmask, other=0).to(tl.int64)
        zk = tl.load(z_ptr + rows * stride_zb + k * stride_zd, mask=valid, other=0.0).to(tl.float32)
        pk = tl.load(p_ptr + y * stride_pc + k * stride_pd, mask=valid, other=0.0).to(tl.float32)
        w = g * _sign(zk - pk)
        if HAS_GRAD_P:
            tl.atomic_add(gp_ptr + y * D + k, -w, mask=valid)
        for d0 in range(0, D, BLOCK_D):
            dk = d0 + offs
            m = rmask[:, None] & (dk[None, :] < D)
            out = tl.where(dk[None, :] == k[:, None], w[:, None], 0.0)
            if HAS_BASE:
                out += tl.load(base_rows + dk[None, :], mask=m, other=0.0)
            tl.store(gz_rows + dk[None, :], out.to(gz_ptr.dtype.element_ty), mask=m)
    else:
        acc0 = tl.zeros((BLOCK_B,), dtype=tl.float32)
        acc1 = tl.zeros((BLOCK_B,), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_B,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dk = d0 + offs
            if EVEN_D:
                m = valid[:, None]
            else:
                m = valid[:, None] & (dk[None, :] < D)
            zt = tl.load(z_rows + dk[None, :] * stride_zd, mask=m, other=0.0).to(tl.float32)
            pt = tl.load(p_rows + dk[None, :] * stride_pd, mask=m, other=0.0).to(tl.float32)
            if METRIC == 1:
                diff = zt - pt
                acc0 += tl.sum(diff * diff, axis=1)
            else:
                acc0 += tl.sum(zt * pt, axis=1)
                acc1 += tl.sum(zt * zt, axis=1)
                acc2 += tl.sum(pt * pt, axis=1)
        # grad_z = a_z * z + a_p * p and grad_p = b_z * z + b_p * p, per row
        if METRIC == 1:
            n = tl.sqrt(acc0)
            cz = tl.where(n > 0, g / tl.where(n > 0, n, 1.0), 0.0)
            a_z = cz
            a_p = -cz
            b_z = -cz
            b_p = cz
        else:
            zr = tl.sqrt(acc1)
            pr = tl.sqrt(acc2)
            zn = tl.maximum(zr, eps)
            pn = tl.maximum(pr, eps)
            cos = acc0 / (zn * pn)
            inv_zr = tl.where(zr > 0, 1.0 / tl.where(zr > 0, zr, 1.0), 0.0)
            inv_pr = tl.where(pr > 0, 1.0 / tl.where(pr > 0, pr, 1.0), 0.0)
            # d = 1 - cos; d cos/dz = p / (zn pn) - cos z / (zn |z|) (torch's clamp semantics)
            a_p = -g / (zn * pn)
            a_z = g * cos * inv_zr / zn
            b_z = a_p
            b_p = g * cos * inv_pr / pn
        for d0 in range(0, D, BLOCK_D):
            dk = d0 + offs
            m = rmask[:, None] & (dk[None, :] < D)
            mv = valid[:, None] & (dk[None, :] < D)
            zt = tl.load(z_rows + dk[None, :] * stride_zd, mask=mv, other=0.0).to(tl.float32)
            pt = tl.load(p_rows + dk[None, :] * stride_pd, mask=mv, other=0.0).to(tl.float32)
            out = a_z[:, None] * zt + a_p[:, None] * pt
            if HAS_BASE:
                out += tl.load(base_rows + dk[None, :], mask=m, other=0.0)
            tl.store(gz_rows + dk[None, :], out.to(gz_ptr.dtype.element_ty), mask=m)
            if HAS_GRAD_P:
                tl.atomic_add(gp_rows + dk[None, :], b_z[:, None] * zt + b_p[:, None] * pt, mask=mv)


# ------------------------------------------------------------ logits and CE kernels
@triton.jit
def _load_inv_norms(inv_zn_ptr, inv_pn_ptr, rows, cols, rmask, cmask, METRIC: tl.constexpr,
                    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
    if METRIC == 2:
        inv_zn = tl.load(inv_zn_ptr + rows, mask=rmask, other=0.0)
        inv_pn = tl.load(inv_pn_ptr + cols, mask=cmask, other=0.0)
    else:
        inv_zn = tl.zeros((BLOCK_B,), dtype=tl.float32)
        inv_pn = tl.zeros((BLOCK_C,), dtype=tl.float32)
    return inv_zn, inv_pn


def _tile_configs():
    out = []
    for bb, bc, bd, w in [(64, 64, 32, 4), (128, 128, 32, 8), (128, 64, 64, 4), (64, 128, 64, 4),
                          (32, 32, 8, 4), (64, 32, 8, 4), (32, 64, 16, 8)]:
        out.append(triton.Config({"BLOCK_B": bb, "BLOCK_C": bc, "BLOCK_D": bd}, num_warps=w, num_stages=3))
    return out


def _prune_for_metric(configs, named_args, **kwargs):
    metric = kwargs.get("METRIC", named_args.get("METRIC"))
    if metric == 2:
        return [c for c in configs if c.kwargs["BLOCK_D"] >= 16] or configs
    return [c for c in configs if c.kwargs["BLOCK_B"] * c.kwargs["BLOCK_C"] * c.kwargs["BLOCK_D"] <= 16384] or configs


def _maybe_autotune(fn, reset_to_zero=None):
    if not _AUTOTUNE:
        return fn
    return triton.autotune(configs=_tile_configs(), key=["C", "D", "METRIC"], reset_to_zero=reset_to_zero,
                           prune_configs_by={"early_config_prune": _prune_for_metric})(fn)


@triton.heuristics({"EVEN_D": lambda a: a["D"] % a["BLOCK_D"] == 0})
@triton.jit
def _proto_logits_fwd_kernel(z_ptr, p_ptr, inv_zn_ptr, inv_pn_ptr, out_ptr, B, C, D,
                             stride_zb, stride_zd, stride_pc, stride_pd, stride_ob,
                             METRIC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
                             BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, DOT_PREC: tl.constexpr):
    """out[b, c] = logit(z_b, P_c) for one (BLOCK_B, BLOCK_C) tile."""
    pid_b = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1).to(tl.int64)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    rmask = rows < B
    cmask = cols < C
    inv_zn, inv_pn = _load_inv_norms(inv_zn_ptr, inv_pn_ptr, rows, cols, rmask, cmask, METRIC, BLOCK_B, BLOCK_C)
    s, karg, ksign = _tile_logits(z_ptr, p_ptr, rows, cols, rmask, cmask, D, stride_zb, stride_zd,
                                  stride_pc, stride_pd, inv_zn, inv_pn, METRIC, False,
                                  BLOCK_B, BLOCK_C, BLOCK_D, EVEN_D, DOT_PREC)
    tl.store(out_ptr + rows[:, None] * stride_ob + cols[None, :], s, mask=rmask[:, None] & cmask[None, :])


@triton.heuristics({"EVEN_D": lambda a: a["D"] % a["BLOCK_D"] == 0})
@triton.jit
def _proto_lse_fwd_kernel(z_ptr, p_ptr, inv_zn_ptr, inv_pn_ptr, part_ptr, B, C, D,
                          stride_zb, stride_zd, stride_pc, stride_pd, inv_temp,
                          METRIC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
                          BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, DOT_PREC: tl.constexpr):
    """part[s, b] = logsumexp over the C tiles of split s of logit(z_b, P_c) / temperature (online)."""
    inv_temp = tl.cast(inv_temp, tl.float32)
    pid_b = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    n_split = tl.num_programs(1)
    n_tiles = tl.cdiv(C, BLOCK_C)
    per_split = tl.cdiv(n_tiles, n_split)
    t0 = pid_s * per_split
    t1 = tl.minimum(t0 + per_split, n_tiles)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    m = tl.full((BLOCK_B,), float("-inf"), dtype=tl.float32)
    acc = tl.zeros((BLOCK_B,), dtype=tl.float32)
    scale = inv_temp * 1.4426950408889634
    for t in range(t0, t1):
        cols = t * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cols < C
        inv_zn, inv_pn = _load_inv_norms(inv_zn_ptr, inv_pn_ptr, rows, cols, rmask, cmask, METRIC, BLOCK_B, BLOCK_C)
        s, karg, ksign = _tile_logits(z_ptr, p_ptr, rows, cols, rmask, cmask, D, stride_zb, stride_zd,
                                      stride_pc, stride_pd, inv_zn, inv_pn, METRIC, False,
                                      BLOCK_B, BLOCK_C, BLOCK_D, EVEN_D, DOT_PREC)
        x = tl.where(cmask[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=1))
        acc = acc * tl.exp2(m - m_new) + tl.sum(tl.exp2(x - m_new[:, None]), axis=1)
        m = m_new
    # an empty split (more splits than tiles) gives -inf, which logsumexp over splits ignores
    lse = tl.where(acc > 0, (m + tl.log2(tl.where(acc > 0, acc, 1.0))) * 0.6931471805599453, float("-inf"))
    tl.store(part_ptr + pid_s * B + rows, lse, mask=rmask)


@triton.heuristics({"EVEN_D": lambda a: a["D"] % a["BLOCK_D"] == 0})
@triton.jit
def _proto_logits_bwd_kernel(g_ptr, stride_gb, stride_gc, z_ptr, p_ptr, inv_zn_ptr, inv_pn_ptr, lse_ptr,
                             uz_ptr, up_ptr, rz_ptr, rp_ptr, B, C, D,
                             stride_zb, stride_zd, stride_pc, stride_pd, inv_temp,
                             METRIC: tl.constexpr, FROM_CE: tl.constexpr, HAS_GRAD_P: tl.constexpr,
                             BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                             EVEN_D: tl.constexpr, DOT_PREC: tl.constexpr):
    """Partial gradients of sum_bc H[b, c] * logit(z_b, P_c) for one (b, c) tile, added atomically.

    H is the incoming logits gradient (logits path) or, with FROM_CE, g[b] * softmax[b, c]
    recomputed from the saved log-sum-exp. Outputs (fp32, zero-initialised):
      cosine: uz[b] += sum_c H/|P_c| P_c, up[c] += sum_b H/|z_b| z_b   (norm terms in the epilogue)
      l2:     uz[b] += sum_c K P_c, up[c] += sum_b K z_b, rz[b] += sum_c K, rp[c] += sum_b K (K = H / dist)
      linf:   uz[b, k*] -= H sign, up[c, k*] += H sign at the arg-max coordinate k* of each pair
    """
    inv_temp = tl.cast(inv_temp, tl.float32)
    pid_b = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1).to(tl.int64)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    rmask = rows < B
    cmask = cols < C
    mask2 = rmask[:, None] & cmask[None, :]
    inv_zn, inv_pn = _load_inv_norms(inv_zn_ptr, inv_pn_ptr, rows, cols, rmask, cmask, METRIC, BLOCK_B, BLOCK_C)
    if FROM_CE or METRIC != 2:
        s, karg, ksign = _tile_logits(z_ptr, p_ptr, rows, cols, rmask, cmask, D, stride_zb, stride_zd,
                                      stride_pc, stride_pd, inv_zn, inv_pn, METRIC, METRIC == 0,
                                      BLOCK_B, BLOCK_C, BLOCK_D, EVEN_D, DOT_PREC)
    else:
        s = tl.zeros((BLOCK_B, BLOCK_C), dtype=tl.float32)
        karg = tl.zeros((BLOCK_B, BLOCK_C), dtype=tl.int32)
        ksign = tl.zeros((BLOCK_B, BLOCK_C), dtype=tl.float32)
    if FROM_CE:
        lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
        gs = tl.load(g_ptr + rows, mask=rmask, other=0.0)
        h = gs[:, None] * tl.exp2((s * inv_temp - lse[:, None]) * 1.4426950408889634)
    else:
        h = tl.load(g_ptr + rows[:, None] * stride_gb + cols[None, :] * stride_gc, mask=mask2, other=0.0)
        h = h.to(tl.float32)
    h = tl.where(mask2, h, 0.0)
    if METRIC == 2:
        hz = h * inv_pn[None, :]
        hp = h * inv_zn[:, None]
    elif METRIC == 1:
        n = -s
        k = tl.where(n > 0, h / tl.where(n > 0, n, 1.0), 0.0)
        hz = k
        hp = k
        tl.atomic_add(rz_ptr + rows, tl.sum(k, axis=1), mask=rmask)
        if HAS_GRAD_P:
            tl.atomic_add(rp_ptr + cols, tl.sum(k, axis=0), mask=cmask)
    else:
        hz = h * ksign
        hp = hz
    z_rows = z_ptr + rows[:, None] * stride_zb
    p_rows = p_ptr + cols[:, None] * stride_pc
    offs = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        dk = d0 + offs
        dmask = dk[None, :] < D
        if METRIC == 0:
            sel = dk[None, None, :] == karg[:, :, None]
            wz = tl.sum(tl.where(sel, hz[:, :, None], 0.0), axis=1)
            tl.atomic_add(uz_ptr + rows[:, None] * D + dk[None, :], -wz, mask=rmask[:, None] & dmask)
            if HAS_GRAD_P:
                wp = tl.sum(tl.where(sel, hp[:, :, None], 0.0), axis=0)
                tl.atomic_add(up_ptr + cols[:, None] * D + dk[None, :], wp, mask=cmask[:, None] & dmask)
        else:
            if EVEN_D:
                zm = rmask[:, None]
                pm = cmask[:, None]
            else:
                zm = rmask[:, None] & dmask
                pm = cmask[:, None] & dmask
            pt = tl.load(p_rows + dk[None, :] * stride_pd, mask=pm, other=0.0)
            u = _dot_weights(hz, pt, DOT_PREC)
            tl.atomic_add(uz_ptr + rows[:, None] * D + dk[None, :], u, mask=rmask[:, None] & dmask)
            if HAS_GRAD_P:
                zt = tl.load(z_rows + dk[None, :] * stride_zd, mask=zm, other=0.0)
                v = _dot_weights(tl.trans(hp), zt, DOT_PREC)
                tl.atomic_add(up_ptr + cols[:, None] * D + dk[None, :], v, mask=cmask[:, None] & dmask)


_proto_logits_fwd_kernel = _maybe_autotune(_proto_logits_fwd_kernel)
_proto_lse_fwd_kernel = _maybe_autotune(_proto_lse_fwd_kernel)
_proto_logits_bwd_kernel = _maybe_autotune(_proto_logits_bwd_kernel,
                                           reset_to_zero=["uz_ptr", "up_ptr", "rz_ptr", "rp_ptr"])


# ------------------------------------------------------------------------- launchers
def _dot_precision(z: torch.Tensor, p: torch.Tensor) -> str:
    interp = interpreter_enabled() and not z.is_cuda
    half = (torch.float16, torch.bfloat16)
    # the interpreter's bf16 dot is not exact, so bf16 is upcast there
    if z.dtype == p.dtype and z.dtype in half and not (interp and z.dtype == torch.bfloat16):
        return "native"
    if interp or not z.is_cuda:
        return "ieee"
    prec = os.environ.get("DRP_FP32_DOT", "tf32x3").strip().lower()
    if prec not in ("tf32x3", "ieee", "tf32"):
        raise ValueError(f"DRP_FP32_DOT must be 'tf32x3', 'ieee' or 'tf32', got {prec!r}")
    return prec


def _tile_meta(metric: int, z: torch.Tensor, *, backward: bool = False, dot_prec: str = "native") -> dict:
    """Fixed tile sizes (ignored when DRP_AUTOTUNE=1).

    Every CUDA tile fits a block's shared memory: at most 92 KiB on sm_80 and 104 KiB on sm_90
    (tests/test_triton_compile.py compiles them for both and checks the limits).
    """
    if _AUTOTUNE:
        return {}
    if interpreter_enabled() and not z.is_cuda:
        # the interpreter runs each block op in numpy: fewer, larger programs are faster
        return {"BLOCK_B": 32, "BLOCK_C": 64, "BLOCK_D": 32}
    if metric == 2:
        if not backward:
            return {"BLOCK_B": 128, "BLOCK_C": 128, "BLOCK_D": 32, "num_warps": 8, "num_stages": 3}
        # The backward's weight dots stage (BLOCK_B, BLOCK_C) fp32 tiles in shared memory: at
        # 128 x 128 they take 144 KiB (16-bit) to 352 KiB (fp32 tf32x3), more than a block may
        # use on an A100 (163 KiB) or H100 (227 KiB).
        if dot_prec == "native":
            return {"BLOCK_B": 128, "BLOCK_C": 64, "BLOCK_D": 32, "num_warps": 8, "num_stages": 2}
        return {"BLOCK_B": 64, "BLOCK_C": 64, "BLOCK_D": 32, "num_warps": 4, "num_stages": 2}
    return {"BLOCK_B": 32, "BLOCK_C": 32, "BLOCK_D": 8, "num_warps": 4}


def _gather_meta(z: torch.Tensor) -> dict:
    d = z.shape[1]
    block_d = max(16, min(256 if z.is_cuda else 128, triton.next_power_of_2(max(d, 1))))
    block_b = 64 if (interpreter_enabled() and not z.is_cuda) else max(1, 4096 // block_d)
    return {"BLOCK_B": block_b, "BLOCK_D": block_d, "num_warps": 4}


def _inv_norms(t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(1 / max(|t_i|, eps), 1 / |t_i| or 0) per row, in fp32."""
    n = torch.linalg.vector_norm(t, dim=1, dtype=torch.float32)
    inv_clamped = 1.0 / n.clamp_min(COSINE_EPS)
    inv_raw = torch.where(n > 0, 1.0 / n.where(n > 0, torch.ones_like(n)), torch.zeros_like(n))
    return inv_clamped, inv_raw


def _gather_forward(z, p, y, metric: int):
    b, d = z.shape
    dist = torch.empty(b, device=z.device, dtype=torch.float32)
    idx = torch.zeros(b, device=z.device, dtype=torch.int32)
    if b == 0:
        return dist, idx
    meta = _gather_meta(z)
    grid = (triton.cdiv(b, meta["BLOCK_B"]),)
    _proto_gather_fwd_kernel[grid](z, p, y, dist, idx, b, p.shape[0], d, z.stride(0), z.stride(1),
                                   p.stride(0), p.stride(1), y.stride(0), COSINE_EPS, METRIC=metric, **meta)
    return dist, idx


def _gather_backward(g, z, p, y, idx, metric: int, coef: float, base, grad_p, out_dtype):
    b, d = z.shape
    grad_z = torch.empty((b, d), device=z.device, dtype=out_dtype)
    if b == 0:
        return grad_z
    meta = _gather_meta(z)
    grid = (triton.cdiv(b, meta["BLOCK_B"]),)
    _proto_gather_bwd_kernel[grid](
        g, z, p, y, idx, base if base is not None else grad_z, grad_z,
        grad_p if grad_p is not None else grad_z, b, p.shape[0], d, z.stride(0), z.stride(1),
        p.stride(0), p.stride(1), y.stride(0), grad_z.stride(0), COSINE_EPS, float(coef),
        METRIC=metric, HAS_BASE=base is not None, HAS_GRAD_P=grad_p is not None, **meta)
    return grad_z


def _tile_grid(b, c, meta):
    return lambda m: (triton.cdiv(b, m["BLOCK_B"]), triton.cdiv(c, m["BLOCK_C"]))


def proto_logits_forward(z: torch.Tensor, p: torch.Tensor, metric: str) -> torch.Tensor:
    """(B, C) fp32 logits; cosine: cos(z, P_c), l2 / linf: -d(z, P_c)."""
    m = METRICS[metric]
    b, d = z.shape
    c = p.shape[0]
    out = torch.empty((b, c), device=z.device, dtype=torch.float32)
    if b == 0 or c == 0:
        return out
    inv_zn, _ = _inv_norms(z) if m == 2 else (out, None)
    inv_pn, _ = _inv_norms(p) if m == 2 else (out, None)
    meta = _tile_meta(m, z)
    _proto_logits_fwd_kernel[_tile_grid(b, c, meta)](
        z, p, inv_zn, inv_pn, out, b, c, d, z.stride(0), z.stride(1), p.stride(0), p.stride(1),
        out.stride(0), METRIC=m, DOT_PREC=_dot_precision(z, p), **meta)
    return out


def _logits_backward_partials(g, z, p, metric: int, need_grad_p: bool, *, lse=None, inv_temp=1.0):
    """Launch _proto_logits_bwd_kernel and apply the per-metric epilogue; fp32 (grad_z, grad_p or None)."""
    b, d = z.shape
    c = p.shape[0]
    dev = z.device
    uz = torch.zeros((b, d), device=dev, dtype=torch.float32)
    up = torch.zeros((c, d), device=dev, dtype=torch.float32) if need_grad_p else uz
    rz = torch.zeros(b, device=dev, dtype=torch.float32) if metric == 1 else uz
    rp = torch.zeros(c, device=dev, dtype=torch.float32) if metric == 1 and need_grad_p else rz
    if metric == 2:
        inv_zn, inv_zr = _inv_norms(z)
        inv_pn, inv_pr = _inv_norms(p)
    else:
        inv_zn = inv_pn = uz
    if b > 0 and c > 0:
        from_ce = lse is not None
        dot_prec = _dot_precision(z, p)
        meta = _tile_meta(metric, z, backward=True, dot_prec=dot_prec)
        _proto_logits_bwd_kernel[_tile_grid(b, c, meta)](
            g, g.stride(0) if not from_ce else 0, g.stride(1) if not from_ce else 0, z, p,
            inv_zn, inv_pn, lse if from_ce else uz, uz, up, rz, rp, b, c, d,
            z.stride(0), z.stride(1), p.stride(0), p.stride(1), float(inv_temp),
            METRIC=metric, FROM_CE=from_ce, HAS_GRAD_P=need_grad_p, DOT_PREC=dot_prec, **meta)
    grad_p = None
    if metric == 0:
        grad_z = uz
        grad_p = up if need_grad_p else None
    elif metric == 1:
        grad_z = uz - z.float() * rz[:, None]
        if need_grad_p:
            grad_p = up - p.float() * rp[:, None]
    else:
        zf = z.float()
        grad_z = uz * inv_zn[:, None] - zf * ((zf * uz).sum(1) * inv_zn * inv_zn * inv_zr)[:, None]
        if need_grad_p:
            pf = p.float()
            grad_p = up * inv_pn[:, None] - pf * ((pf * up).sum(1) * inv_pn * inv_pn * inv_pr)[:, None]
    return grad_z, grad_p


def proto_logits_backward(grad: torch.Tensor, z: torch.Tensor, p: torch.Tensor, metric: str,
                          need_grad_p: bool):
    """Gradients of sum(grad * logits) wrt z (z.dtype) and P (P.dtype, or an empty tensor)."""
    gz, gp = _logits_backward_partials(grad, z, p, METRICS[metric], need_grad_p)
    gp = gp.to(p.dtype) if gp is not None else p.new_empty(0)
    return gz.to(z.dtype), gp


def proto_loss_forward(z, p, y, metric: str, ce_weight: float, temperature: float):
    """(per_sample loss fp32 (B,), lse fp32 (B,), linf arg-max int32 (B,))."""
    m = METRICS[metric]
    dist, idx = _gather_forward(z, p, y, m)
    b, c = z.shape[0], p.shape[0]
    if ce_weight == 0.0 or b == 0:
        return dist, torch.zeros_like(dist), idx
    meta = _tile_meta(m, z)
    n_b = triton.cdiv(b, meta.get("BLOCK_B", 64))
    n_c = triton.cdiv(c, meta.get("BLOCK_C", 64))
    target_programs = 4 * (torch.cuda.get_device_properties(z.device).multi_processor_count if z.is_cuda else 1)
    split = max(1, min(n_c, triton.cdiv(target_programs, n_b)))
    part = torch.empty((split, b), device=z.device, dtype=torch.float32)
    inv_zn = _inv_norms(z)[0] if m == 2 else part
    inv_pn = _inv_norms(p)[0] if m == 2 else part
    _proto_lse_fwd_kernel[lambda mt: (triton.cdiv(b, mt["BLOCK_B"]), split)](
        z, p, inv_zn, inv_pn, part, b, c, z.shape[1], z.stride(0), z.stride(1), p.stride(0), p.stride(1),
        1.0 / temperature, METRIC=m, DOT_PREC=_dot_precision(z, p), **meta)
    lse = torch.logsumexp(part, dim=0) if split > 1 else part[0]
    target_logit = 1.0 - dist if m == 2 else -dist
    per_sample = dist + ce_weight * (lse - target_logit / temperature)
    return per_sample, lse.contiguous(), idx


def proto_loss_backward(grad, z, p, y, lse, idx, metric: str, ce_weight: float, temperature: float,
                        need_grad_p: bool):
    """Gradients of sum(grad * per_sample) wrt z (z.dtype) and P (P.dtype, or an empty tensor)."""
    m = METRICS[metric]
    g = grad.to(torch.float32).contiguous()
    base = None
    grad_p = torch.zeros(p.shape, device=p.device, dtype=torch.float32) if need_grad_p else None
    coef = 1.0
    if ce_weight != 0.0:
        scale = ce_weight / temperature
        base, gp_ce = _logits_backward_partials(g * scale, z, p, m, need_grad_p, lse=lse,
                                                inv_temp=1.0 / temperature)
        base = base.contiguous()
        if need_grad_p:
            grad_p = gp_ce.contiguous()
        coef = 1.0 + scale
    grad_z = _gather_backward(g, z, p, y, idx, m, coef, base, grad_p, z.dtype)
    gp = grad_p.to(p.dtype) if need_grad_p else p.new_empty(0)
    return grad_z, gp


# ------------------------------------------------------------------ torch.library ops
@torch.library.custom_op("drp::proto_loss", mutates_args=())
def _proto_loss_op(z: torch.Tensor, prototypes: torch.Tensor, y: torch.Tensor, metric: str,
                   ce_weight: float, temperature: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return proto_loss_forward(z, prototypes, y, metric, ce_weight, temperature)


@_proto_loss_op.register_fake
def _(z, prototypes, y, metric, ce_weight, temperature):
    b = z.shape[0]
    f = z.new_empty((b,), dtype=torch.float32)
    return f, torch.empty_like(f), z.new_empty((b,), dtype=torch.int32)


@torch.library.custom_op("drp::proto_loss_backward", mutates_args=())
def _proto_loss_backward_op(grad: torch.Tensor, z: torch.Tensor, prototypes: torch.Tensor, y: torch.Tensor,
                            lse: torch.Tensor, idx: torch.Tensor, metric: str, ce_weight: float,
                            temperature: float, need_grad_p: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    return proto_loss_backward(grad, z, prototypes, y, lse, idx, metric, ce_weight, temperature, need_grad_p)


@_proto_loss_backward_op.register_fake
def _(grad, z, prototypes, y, lse, idx, metric, ce_weight, temperature, need_grad_p):
    gp = prototypes.new_empty(prototypes.shape) if need_grad_p else prototypes.new_empty(0)
    return z.new_empty(z.shape), gp


def _loss_setup_context(ctx, inputs, output):
    z, prototypes, y, metric, ce_weight, temperature = inputs
    _, lse, idx = output
    ctx.save_for_backward(z, prototypes, y, lse, idx)
    ctx.options = (metric, ce_weight, temperature)
    ctx.mark_non_differentiable(lse, idx)


def _loss_backward(ctx, grad, _grad_lse, _grad_idx):
    z, prototypes, y, lse, idx = ctx.saved_tensors
    metric, ce_weight, temperature = ctx.options
    need_p = ctx.needs_input_grad[1]
    gz, gp = _proto_loss_backward_op(grad, z, prototypes, y, lse, idx, metric, ce_weight, temperature, need_p)
    return gz, (gp if need_p else None), None, None, None, None


_proto_loss_op.register_autograd(_loss_backward, setup_context=_loss_setup_context)


@torch.library.custom_op("drp::proto_logits", mutates_args=())
def _proto_logits_op(z: torch.Tensor, prototypes: torch.Tensor, metric: str) -> torch.Tensor:
    return proto_logits_forward(z, prototypes, metric)


@_proto_logits_op.register_fake
def _(z, prototypes, metric):
    return z.new_empty((z.shape[0], prototypes.shape[0]), dtype=torch.float32)


@torch.library.custom_op("drp::proto_logits_backward", mutates_args=())
def _proto_logits_backward_op(grad: torch.Tensor, z: torch.Tensor, prototypes: torch.Tensor, metric: str,
                              need_grad_p: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    return proto_logits_backward(grad, z, prototypes, metric, need_grad_p)


@_proto_logits_backward_op.register_fake
def _(grad, z, prototypes, metric, need_grad_p):
    gp = prototypes.new_empty(prototypes.shape) if need_grad_p else prototypes.new_empty(0)
    return z.new_empty(z.shape), gp


def _logits_setup_context(ctx, inputs, output):
    z, prototypes, metric = inputs
    ctx.save_for_backward(z, prototypes)
    ctx.metric = metric


def _logits_backward(ctx, grad):
    z, prototypes = ctx.saved_tensors
    need_p = ctx.needs_input_grad[1]
    gz, gp = _proto_logits_backward_op(grad, z, prototypes, ctx.metric, need_p)
    return gz, (gp if need_p else None), None


_proto_logits_op.register_autograd(_logits_backward, setup_context=_logits_setup_context)

proto_loss_op = _proto_loss_op
proto_logits_op = _proto_logits_op
