"""Triton kernels of the all-pairs lp distance (launchers and registration: ``lp_dist.py``).

Layout (the shape of a GEMM, not a 3-D broadcast): ``_lp_dist_fwd_kernel`` gives each program a
(BLOCK_B, BLOCK_N) register tile of the output and walks k = 0..D-1, loading one column of x and one
of w per step (on CUDA the launcher passes both operands transposed, (D, B) and (D, N), so these
loads are coalesced). p = inf keeps the running max and, when a gradient is needed, the first
arg-max k; finite p runs two passes over k, the max m and then ``sum (|d| * inv)^p`` with
``inv = 1 / m``, so p = 1000 neither overflows nor underflows.

The finite-p backward is ``_lp_dist_bwd_kernel``, launched twice: once with x as the owned operand
(grad_x tiles of (BLOCK_R, BLOCK_K), looping over the N rows of w) and once with w (grad_w tiles,
looping over the B rows of x), so every program owns its output tile and no atomics are needed. Its
per-pair weights are the forward's own ``inv`` and ``c = grad * r`` with ``r = s^((1 - p) / p)``, so
the gradient carries exactly the forward's scaling at any p.

``_pow`` raises t >= 0 to q in one of the power modes the launcher picks (``POW``: 0 gives t^0, 1, 2,
7 and 8 fixed chains, -1 a run-time integer exponent by repeated squaring, -2 t^floor(q) times the
fraction through exp2 / log2). All arithmetic is fp32 (float64 loads and max at p = inf for float64
inputs); program ids and offsets are int64.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _pow(t, e, q, MODE: tl.constexpr):
    """t^q for t >= 0 in fp32 (0^q = 0 for q > 0)."""
    if MODE == 0:
        r = tl.full(t.shape, 1.0, tl.float32)
    elif MODE == 1:
        r = t
    elif MODE == 2:
        r = t * t
    elif MODE == 7:
        t2 = t * t
        t3 = t2 * t
        t6 = t3 * t3
        r = t6 * t
    elif MODE == 8:
        t2 = t * t
        t4 = t2 * t2
        r = t4 * t4
    else:
        # MODE -1: t^e for a run-time integer e; MODE -2: t^q = t^floor(q) * t^(q - floor(q)). Both
        # raise t to e = floor(q) by repeated squaring; -2 adds the fraction by the approximate
        # exp2 / log2, whose error scales with the fraction (< 1), not with q
        r = tl.full(t.shape, 1.0, tl.float32)
        b = t
        ee = e
        while ee > 0:
            if ee % 2 == 1:
                r = r * b
            b = b * b
            ee = ee // 2
        if MODE == -2:
            qf = q - e
            r = r * tl.where(t > 0, tl.exp2(qf * tl.log2(tl.where(t > 0, t, 1.0))), 0.0)
    return r

@triton.jit
def _lp_dist_fwd_kernel(x_ptr, w_ptr, out_ptr, idx_ptr, inv_ptr, r_ptr, B, N, D, stride_xb, stride_xk,
                        stride_wn, stride_wk, p, inv_p, e_fwd, IS_INF: tl.constexpr, POW: tl.constexpr,
                        STATS: tl.constexpr, F64: tl.constexpr, BLOCK_B: tl.constexpr,
                        BLOCK_N: tl.constexpr):
    """out of a (BLOCK_B, BLOCK_N) tile; with STATS also idx (p = inf) or, for finite p > 1, the
    backward's per-pair inv = 1 / m (the very value pass 2 scaled by) and r = s^((1 - p) / p).
    F64 (p = inf only): float64 loads and maximum, for float64 inputs."""
    pid_b = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    p = tl.cast(p, tl.float32)
    inv_p = tl.cast(inv_p, tl.float32)
    acc_t = tl.float64 if F64 else tl.float32
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < B
    cmask = cols < N
    x_row = x_ptr + rows * stride_xb
    w_row = w_ptr + cols * stride_wn
    m = tl.zeros((BLOCK_B, BLOCK_N), dtype=acc_t)
    if IS_INF:
        idx = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.int32)
        for k in range(0, D):
            k64 = tl.cast(k, tl.int64)
            xk = tl.load(x_row + k64 * stride_xk, mask=rmask, other=0.0).to(acc_t)
            wk = tl.load(w_row + k64 * stride_wk, mask=cmask, other=0.0).to(acc_t)
            a = tl.abs(xk[:, None] - wk[None, :])
            if STATS:
                # the first arg-max, NaN counting as the largest value (as torch.argmax)
                idx = tl.where((a > m) | ((a != a) & (m == m)), k, idx)
            m = tl.maximum(m, a, propagate_nan=tl.PropagateNan.ALL)  # NaN in, NaN out
        res = m
    else:
        if POW == 0:  # p = 1: a plain sum, no scaling needed
            s = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
            for k in range(0, D):
                k64 = tl.cast(k, tl.int64)
                xk = tl.load(x_row + k64 * stride_xk, mask=rmask, other=0.0).to(tl.float32)
                wk = tl.load(w_row + k64 * stride_wk, mask=cmask, other=0.0).to(tl.float32)
                s += tl.abs(xk[:, None] - wk[None, :])
            res = s
        else:
            for k in range(0, D):
                k64 = tl.cast(k, tl.int64)
                xk = tl.load(x_row + k64 * stride_xk, mask=rmask, other=0.0).to(tl.float32)
                wk = tl.load(w_row + k64 * stride_wk, mask=cmask, other=0.0).to(tl.float32)
                m = tl.maximum(m, tl.abs(xk[:, None] - wk[None, :]), propagate_nan=tl.PropagateNan.ALL)
            finite = (m > 0) & (m < float("inf"))
            inv = tl.where(finite, 1.0 / tl.where(finite, m, 1.0), 0.0)
            s = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
            for k in range(0, D):
                k64 = tl.cast(k, tl.int64)
                xk = tl.load(x_row + k64 * stride_xk, mask=rmask, other=0.0).to(tl.float32)
                wk = tl.load(w_row + k64 * stride_wk, mask=cmask, other=0.0).to(tl.float32)
                s += _pow(tl.abs(xk[:, None] - wk[None, :]) * inv, e_fwd, p, POW)
            # s >= (m * inv)^p, which is 1 up to the rounding of inv; the guard keeps log2 finite
            # for p beyond ~1e9 (where that rounding alone can underflow the largest term)
            s = tl.maximum(s, 1e-30)
            root = tl.exp2(tl.log2(s) * inv_p)
            res = tl.where(finite, m * root, tl.where(m == 0, 0.0, tl.where(m != m, m, float("inf"))))
    omask = rmask[:, None] & cmask[None, :]
    offs = rows[:, None] * N + cols[None, :]
    tl.store(out_ptr + offs, res, mask=omask)
    if STATS:
        if IS_INF:
            tl.store(idx_ptr + offs, idx.to(tl.int64), mask=omask)
        elif POW != 0:
            r = tl.where(finite, root / s, tl.where(m == 0, 0.0, float("nan")))
            tl.store(inv_ptr + offs, inv, mask=omask)
            tl.store(r_ptr + offs, r, mask=omask)

@triton.jit
def _lp_dist_bwd_kernel(a_ptr, o_ptr, c_ptr, inv_ptr, ga_ptr, R, M, D, stride_ar, stride_ak, stride_om,
                        stride_ok, stride_cr, stride_cm, stride_gar, q, e_bwd,
                        SIGN_ONLY: tl.constexpr, POW: tl.constexpr, BLOCK_R: tl.constexpr,
                        BLOCK_K: tl.constexpr):
    """ga[r, k] = sum_m c[r, m] * sign(a[r, k] - o[m, k]) * (|a[r, k] - o[m, k]| * inv[r, m])^(p - 1).

    c and inv are per-pair fp32 weights (see ``lp_dist_backward``) whose (r, m) entries sit at
    r * stride_cr + m * stride_cm: (x, w, c, inv) gives grad_x, (w, x, c^T, inv^T) gives grad_w.
    """
    pid_r = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1).to(tl.int64)
    q = tl.cast(q, tl.float32)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rmask = rows < R
    kmask = ks < D
    a = tl.load(a_ptr + rows[:, None] * stride_ar + ks[None, :] * stride_ak,
                mask=rmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    c_row = c_ptr + rows * stride_cr
    inv_row = inv_ptr + rows * stride_cr
    for mi in range(0, M):
        m64 = tl.cast(mi, tl.int64)
        o = tl.load(o_ptr + m64 * stride_om + ks * stride_ok, mask=kmask, other=0.0).to(tl.float32)
        c = tl.load(c_row + m64 * stride_cm, mask=rmask, other=0.0)
        d = a - o[None, :]
        sg = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
        if SIGN_ONLY:
            acc += sg * c[:, None]
        else:
            inv = tl.load(inv_row + m64 * stride_cm, mask=rmask, other=0.0)
            acc += sg * _pow(tl.abs(d) * inv[:, None], e_bwd, q, POW) * c[:, None]
    tl.store(ga_ptr + rows[:, None] * stride_gar + ks[None, :], acc, mask=rmask[:, None] & kmask[None, :])
