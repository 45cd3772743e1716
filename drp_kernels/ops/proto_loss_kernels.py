"""Triton kernels of ProtoLoss and proto_logits (launchers and registration: ``proto_loss.py``).

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

All arithmetic runs in fp32 registers; inputs are cast at load and outputs at store. Offsets
are int64 (rows, columns and D offsets), so strided views beyond 2**31 elements are addressed
correctly. The (B, C) tile kernels use a 1-D grid (C tiles fastest), so no grid dimension
meets CUDA's 65535 limit on y and z. Atomics are relaxed (no memory fences): the partial sums
they build are only read after the kernel ends.

``DOT_PREC`` is "native" when z and P share a 16-bit dtype (the dot runs in that dtype), else the
fp32 ``input_precision`` ("ieee" or "tf32"). In native mode the backward's fp32 weights (of order
g * softmax / |P_c|, far below fp16's normal range for large C) are scaled per row by a power of
two into [1, 2), split into a hi + lo pair of the input dtype (two dots) and scaled back after
the dot, which is exact: the gradient keeps ~22 bits of each weight whatever its magnitude.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .._constants import LOG2E as _LOG2E_VALUE
from ._triton_utils import even_d_heuristic, sign

#: exp(x) == exp2(x * LOG2E); ln(x) == log2(x) * LN2.
LOG2E = tl.constexpr(_LOG2E_VALUE)
LN2 = tl.constexpr(1.0 / _LOG2E_VALUE)

# fp32 exponent field, and the exponent field of 2**127 doubled (for the power-of-two rescale)
_EXP_MASK = tl.constexpr(0x7F800000)
_EXP_254 = tl.constexpr(0x7F000000)


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
    """fp32 weights h (M, K) times x (K, N), accumulated in fp32.

    In native mode each row of h is scaled by 2**-e (e the exponent of the row's largest |h|),
    split into hi + lo of x's dtype, multiplied, and the result scaled back by 2**e. Powers of
    two are exact, so tiny weights (e.g. g * softmax / |P| ~ 1e-9) keep their precision instead
    of falling below the smallest fp16 subnormal.
    """
    if DOT_PREC == "native":
        hmax = tl.max(tl.abs(h), axis=1)
        ebits = hmax.to(tl.int32, bitcast=True) & _EXP_MASK
        ok = (ebits > 0) & (ebits < _EXP_254)
        up = tl.where(ok, (-ebits + _EXP_254).to(tl.float32, bitcast=True), 1.0)
        down = tl.where(ok, ebits.to(tl.float32, bitcast=True), 1.0)
        hs = h * up[:, None]
        hi = hs.to(x.dtype)
        lo = (hs - hi.to(tl.float32)).to(x.dtype)
        return (tl.dot(hi, x) + tl.dot(lo, x)) * down[:, None]
    else:
        return tl.dot(h, x.to(tl.float32), input_precision=DOT_PREC)


@triton.jit
def _tile_ids(C, BLOCK_C: tl.constexpr):
    """(pid_b, pid_c) of a 1-D grid over (B, C) tiles, C tiles fastest."""
    pid = tl.program_id(0).to(tl.int64)
    n_c = tl.cdiv(C, BLOCK_C)
    return pid // n_c, pid % n_c


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
        dk = (d0 + offs).to(tl.int64)
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
                    csign = tl.sum(tl.where(sel, sign(diff), 0.0), axis=2)
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


@triton.jit
def _gather_pass(z_rows, p_rows, valid, D, stride_zd, stride_pd,
                 METRIC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr):
    """One pass over D of (z_b, P[y_b]) row pairs.

    Returns (acc0, acc1, acc2, best): linf: (max |z - p|, -, -, first arg-max coordinate);
    l2: (sum (z - p)^2, -, -, -); cosine: (z . p, |z|^2, |p|^2, -).
    """
    offs = tl.arange(0, BLOCK_D)
    acc0 = tl.zeros((BLOCK_B,), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_B,), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_B,), dtype=tl.float32)
    best = tl.zeros((BLOCK_B,), dtype=tl.int32)
    if METRIC == 0:
        acc0 = acc0 - 1.0
    for d0 in range(0, D, BLOCK_D):
        dk = (d0 + offs).to(tl.int64)
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
    return acc0, acc1, acc2, best


# ------------------------------------------------------------------ loss-only kernels
@even_d_heuristic()
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
    acc0, acc1, acc2, best = _gather_pass(z_ptr + rows[:, None] * stride_zb, p_ptr + y[:, None] * stride_pc,
                                          valid, D, stride_zd, stride_pd, METRIC, BLOCK_B, BLOCK_D, EVEN_D)
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


@even_d_heuristic()
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
        w = g * sign(zk - pk)
        if HAS_GRAD_P:
            tl.atomic_add(gp_ptr + y * D + k, -w, mask=valid, sem="relaxed")
        for d0 in range(0, D, BLOCK_D):
            dk = (d0 + offs).to(tl.int64)
            m = rmask[:, None] & (dk[None, :] < D)
            out = tl.where(dk[None, :] == k[:, None], w[:, None], 0.0)
            if HAS_BASE:
                out += tl.load(base_rows + dk[None, :], mask=m, other=0.0)
            tl.store(gz_rows + dk[None, :], out.to(gz_ptr.dtype.element_ty), mask=m)
    else:
        acc0, acc1, acc2, _best = _gather_pass(z_rows, p_rows, valid, D, stride_zd, stride_pd,
                                               METRIC, BLOCK_B, BLOCK_D, EVEN_D)
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
            dk = (d0 + offs).to(tl.int64)
            m = rmask[:, None] & (dk[None, :] < D)
            mv = valid[:, None] & (dk[None, :] < D)
            zt = tl.load(z_rows + dk[None, :] * stride_zd, mask=mv, other=0.0).to(tl.float32)
            pt = tl.load(p_rows + dk[None, :] * stride_pd, mask=mv, other=0.0).to(tl.float32)
            out = a_z[:, None] * zt + a_p[:, None] * pt
            if HAS_BASE:
                out += tl.load(base_rows + dk[None, :], mask=m, other=0.0)
            tl.store(gz_rows + dk[None, :], out.to(gz_ptr.dtype.element_ty), mask=m)
            if HAS_GRAD_P:
                tl.atomic_add(gp_rows + dk[None, :], b_z[:, None] * zt + b_p[:, None] * pt, mask=mv,
                              sem="relaxed")


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


@even_d_heuristic()
@triton.jit
def _proto_logits_fwd_kernel(z_ptr, p_ptr, inv_zn_ptr, inv_pn_ptr, out_ptr, B, C, D,
                             stride_zb, stride_zd, stride_pc, stride_pd, stride_ob,
                             METRIC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
                             BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, DOT_PREC: tl.constexpr):
    """out[b, c] = logit(z_b, P_c) for one (BLOCK_B, BLOCK_C) tile."""
    pid_b, pid_c = _tile_ids(C, BLOCK_C)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    rmask = rows < B
    cmask = cols < C
    inv_zn, inv_pn = _load_inv_norms(inv_zn_ptr, inv_pn_ptr, rows, cols, rmask, cmask, METRIC, BLOCK_B, BLOCK_C)
    s, karg, ksign = _tile_logits(z_ptr, p_ptr, rows, cols, rmask, cmask, D, stride_zb, stride_zd,
                                  stride_pc, stride_pd, inv_zn, inv_pn, METRIC, False,
                                  BLOCK_B, BLOCK_C, BLOCK_D, EVEN_D, DOT_PREC)
    tl.store(out_ptr + rows[:, None] * stride_ob + cols[None, :], s, mask=rmask[:, None] & cmask[None, :])


@even_d_heuristic()
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
    scale = inv_temp * LOG2E
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
    lse = tl.where(acc > 0, (m + tl.log2(tl.where(acc > 0, acc, 1.0))) * LN2, float("-inf"))
    tl.store(part_ptr + pid_s * B + rows, lse, mask=rmask)


@even_d_heuristic()
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
    pid_b, pid_c = _tile_ids(C, BLOCK_C)
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
        h = gs[:, None] * tl.exp2((s * inv_temp - lse[:, None]) * LOG2E)
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
        tl.atomic_add(rz_ptr + rows, tl.sum(k, axis=1), mask=rmask, sem="relaxed")
        if HAS_GRAD_P:
            tl.atomic_add(rp_ptr + cols, tl.sum(k, axis=0), mask=cmask, sem="relaxed")
    else:
        hz = h * ksign
        hp = hz
    z_rows = z_ptr + rows[:, None] * stride_zb
    p_rows = p_ptr + cols[:, None] * stride_pc
    offs = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        dk = (d0 + offs).to(tl.int64)
        dmask = dk[None, :] < D
        if METRIC == 0:
            sel = dk[None, None, :] == karg[:, :, None]
            wz = tl.sum(tl.where(sel, hz[:, :, None], 0.0), axis=1)
            tl.atomic_add(uz_ptr + rows[:, None] * D + dk[None, :], -wz, mask=rmask[:, None] & dmask,
                          sem="relaxed")
            if HAS_GRAD_P:
                wp = tl.sum(tl.where(sel, hp[:, :, None], 0.0), axis=0)
                tl.atomic_add(up_ptr + cols[:, None] * D + dk[None, :], wp, mask=cmask[:, None] & dmask,
                              sem="relaxed")
        else:
            if EVEN_D:
                zm = rmask[:, None]
                pm = cmask[:, None]
            else:
                zm = rmask[:, None] & dmask
                pm = cmask[:, None] & dmask
            pt = tl.load(p_rows + dk[None, :] * stride_pd, mask=pm, other=0.0)
            u = _dot_weights(hz, pt, DOT_PREC)
            tl.atomic_add(uz_ptr + rows[:, None] * D + dk[None, :], u, mask=rmask[:, None] & dmask,
                          sem="relaxed")
            if HAS_GRAD_P:
                zt = tl.load(z_rows + dk[None, :] * stride_zd, mask=zm, other=0.0)
                v = _dot_weights(tl.trans(hp), zt, DOT_PREC)
                tl.atomic_add(up_ptr + cols[:, None] * D + dk[None, :], v, mask=cmask[:, None] & dmask,
                              sem="relaxed")
