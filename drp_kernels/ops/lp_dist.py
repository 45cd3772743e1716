"""All-pairs lp distance ``out[b, n] = (sum_k |x[b, k] - w[n, k]|^p)^(1/p)``, p in [1, inf].

The op behind ``drp_kernels.lp_dist``, the ``LpDist`` layer and the linf / l2 prototype logits.

Backends (one op, ``drp::lp_dist``, registered with ``torch.library.custom_op``, ``register_fake``
and ``register_autograd``; its flag ``use_triton`` is fixed per call by ``lp_dist``):

* CPU tensors: the C++ ops ``drp::lp_dist_cpu_forward`` / ``drp::lp_dist_cpu_backward`` of
  ``drp_kernels._C`` (``csrc/lp_dist.cpp``: SIMD micro-kernels blocked over (B, N) like a GEMM,
  ``at::parallel_for``, fused backward). float64 runs them in double.
* CUDA tensors (and CPU tensors with ``DRP_BACKEND=triton`` under ``TRITON_INTERPRET=1``): the
  Triton kernels below. float64 on CUDA runs them at p = inf (a float64 max) and
  ``drp_kernels.reference.lp_dist`` at finite p.

Triton layout (the shape of a GEMM, not a 3-D broadcast): ``_lp_dist_fwd_kernel`` gives each
program a (BLOCK_B, BLOCK_N) register tile of the output and walks k = 0..D-1, loading one
column of x and one of w per step (on CUDA both operands are passed transposed, (D, B) and
(D, N), so these loads are coalesced; that is one O((B + N) D) copy each). p = inf keeps the
running max and, when a gradient is needed, the first arg-max k; finite p runs two passes over k,
the max m and then ``sum (|d| * inv)^p`` with ``inv = 1 / m``, so p = 1000 neither overflows nor
underflows. The finite-p backward is ``_lp_dist_bwd_kernel``, launched twice: once with x as the
owned operand (grad_x tiles of (BLOCK_R, BLOCK_K), looping over the N rows of w) and once with w
(grad_w tiles, looping over the B rows of x), so every program owns its output tile and no
atomics are needed. Its per-pair weights are the forward's own ``inv`` and ``c = grad * r`` with
``r = s^((1 - p) / p)``, so the gradient carries exactly the forward's scaling at any p. The
p = inf backward is a scatter-add of ``sign(d) * grad`` at the saved arg-max (O(B N) torch ops).

The forward saves (when a gradient is needed) the (B, N) int64 arg-max index for p = inf, and the
(B, N) ``inv`` and ``r`` for finite p > 1; the C++ kernels save the same (``csrc/lp_dist.cpp``).
Non-finite input: a pair with a NaN has distance NaN, else one with an infinite coordinate has
distance inf; at finite p every coordinate of such a pair's rows gets a NaN gradient, at p = inf
the gradient sits at the first arg-max (NaN counting as the largest value), on every backend.
The module imports without triton; the Triton path then raises a clear error.
"""
from __future__ import annotations

import math
import os
from numbers import Real
from typing import Tuple

import torch

from . import _triton_utils as tu
from .. import reference

try:
    from .. import _C  # noqa: F401  (loading it registers torch.ops.drp.lp_dist_cpu_*)
except ImportError:  # pragma: no cover - an unbuilt checkout
    _C = None

if tu.HAS_TRITON:
    import triton
    import triton.language as tl
else:  # pragma: no cover - exercised by the no-triton import test in a subprocess
    triton = None
    tl = None

__all__ = ["lp_dist", "lp_dist_forward", "lp_dist_backward"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# power modes of the kernels: the exponent of the forward sum (p) or of the backward weight (p - 1)
_POW_ONE = 0  # t^0 (the p = 1 backward: sign only) or, in the forward, p = 1 (no scaling)
_POW_INT = -1  # a run-time integer exponent (repeated squaring)
_POW_REAL = -2  # exp2(q * log2(t))


def _pow_mode(q: float) -> Tuple[int, int]:
    """(mode, integer exponent) for t^q, q >= 0."""
    if q == 0.0:
        return _POW_ONE, 0
    if q in (1.0, 2.0, 7.0, 8.0):
        return int(q), int(q)
    if q == math.floor(q) and q <= 1.0e6:
        return _POW_INT, int(q)
    return _POW_REAL, int(math.floor(q))  # t^q = t^floor(q) * t^(q - floor(q))


# ---------------------------------------------------------------------------- kernels
if tu.HAS_TRITON:

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
        elif MODE == -1:
            r = tl.full(t.shape, 1.0, tl.float32)
            b = t
            ee = e
            while ee > 0:
                if ee % 2 == 1:
                    r = r * b
                b = b * b
                ee = ee // 2
        else:
            # t^q = t^floor(q) * t^(q - floor(q)): e = floor(q) by repeated squaring, the fraction by
            # the approximate exp2 / log2, whose error scales with the fraction (< 1), not with q
            r = tl.full(t.shape, 1.0, tl.float32)
            b = t
            ee = e
            while ee > 0:
                if ee % 2 == 1:
                    r = r * b
                b = b * b
                ee = ee // 2
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


# --------------------------------------------------------------------------- launchers
def _fwd_meta(x: torch.Tensor, b: int, n: int) -> dict:
    if tu.interpreting(x):
        return {"BLOCK_B": 32, "BLOCK_N": 32}
    # the largest tile that still gives every SM a few programs (a 10-class head or B = N = 512 would
    # leave most of a GPU idle with 64 x 128 tiles)
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    tiles = ((64, 128, 8), (64, 64, 4), (32, 64, 4), (32, 32, 4), (16, 32, 2))
    bb, bn, warps = next((t for t in tiles if tu.cdiv(b, t[0]) * tu.cdiv(n, t[1]) >= 2 * sms), tiles[-1])
    return {"BLOCK_B": bb, "BLOCK_N": bn, "num_warps": warps}


def _bwd_meta(x: torch.Tensor) -> dict:
    if tu.interpreting(x):
        return {"BLOCK_R": 32, "BLOCK_K": 32}
    return {"BLOCK_R": 64, "BLOCK_K": 64, "num_warps": 4}


def _operand(t: torch.Tensor) -> torch.Tensor:
    """t (R, D) as the forward kernel reads it: on CUDA a (D, R) contiguous copy seen as (R, D),
    so the per-k column loads are coalesced; under the interpreter t itself."""
    if t.is_cuda and not (t.stride(0) == 1 and t.stride(1) == t.shape[0]):
        buf = torch.empty((t.shape[1], t.shape[0]), device=t.device, dtype=t.dtype)
        buf.copy_(t.t())
        return buf.t()
    return t


def lp_dist_forward(x: torch.Tensor, w: torch.Tensor, p: float, stats: bool = False):
    """Triton forward: (out, idx, inv, r). out (B, N) is fp32 (fp64 for float64 inputs at p = inf);
    with ``stats`` idx (B, N) int64 for p = inf, and inv, r (B, N) fp32 for finite p > 1 (what the
    backward needs); the others are (0, 0)."""
    tu.require_triton()
    b, d = x.shape
    n = w.shape[0]
    is_inf = p == math.inf
    f64 = is_inf and torch.float64 in (x.dtype, w.dtype)
    want_idx = stats and is_inf
    want_ir = stats and not is_inf and p != 1.0
    out = torch.empty((b, n), device=x.device, dtype=torch.float64 if f64 else torch.float32)
    idx = torch.empty((b, n) if want_idx else (0, 0), device=x.device, dtype=torch.int64)
    inv = torch.empty((b, n) if want_ir else (0, 0), device=x.device, dtype=torch.float32)
    r = torch.empty_like(inv)
    if b == 0 or n == 0:
        return out, idx, inv, r
    if d == 0:
        return out.zero_(), idx.zero_(), inv.zero_(), r.zero_()
    xo, wo = _operand(x), _operand(w)
    pow_mode, e = (_POW_ONE, 1) if is_inf or p == 1.0 else _pow_mode(p)
    meta = _fwd_meta(x, b, n)
    grid = (tu.cdiv(b, meta["BLOCK_B"]), tu.cdiv(n, meta["BLOCK_N"]))
    with tu.on_device(x):
        _lp_dist_fwd_kernel[grid](xo, wo, out, idx if want_idx else out, inv if want_ir else out,
                                  r if want_ir else out, b, n, d, xo.stride(0), xo.stride(1), wo.stride(0),
                                  wo.stride(1), float(p if not is_inf else 1.0), float(1.0 / p if not is_inf else 1.0),
                                  int(e), IS_INF=is_inf, POW=pow_mode, STATS=stats, F64=f64, **meta)
    return out, idx, inv, r


def lp_dist_backward(grad: torch.Tensor, x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, idx: torch.Tensor,
                     inv: torch.Tensor, r: torch.Tensor, p: float, need_x: bool,
                     need_w: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Triton backward: (grad_x like x or (0,), grad_w like w or (0,)), from the forward's stats.

    Finite p: the weight of coordinate k is ``c * sign(d_k) |d_k * inv|^(p - 1)`` with
    ``c = grad * r``, the forward's own inv and r (so the gradient is exactly what the forward's
    scaling implies); p = 1: ``c * sign(d_k)``; p = inf: a scatter-add at the saved arg-max.
    """
    tu.require_triton()
    b, d = x.shape
    n = w.shape[0]
    acc = torch.float64 if (p == math.inf and torch.float64 in (x.dtype, w.dtype)) else torch.float32
    gx = torch.zeros((b, d), device=x.device, dtype=acc)
    gw = torch.zeros((n, d), device=x.device, dtype=acc)
    if b and n and d and (need_x or need_w):
        g = grad.to(acc)
        if p == math.inf:
            # a scatter-add of sign(d) * grad at the saved first arg-max coordinate (NaN stays NaN)
            xs = x.to(acc).gather(1, idx)
            ws = w.to(acc).gather(1, idx.t()).t()
            diff = xs - ws
            s = torch.where(diff.isnan(), diff, torch.sign(diff)) * g  # torch.sign(NaN) is 0
            if need_x:
                gx.scatter_add_(1, idx, s)
            if need_w:
                gw.scatter_add_(1, idx.t(), -s.t())
        else:
            sign_only = p == 1.0
            if sign_only:
                c = torch.where(out.isfinite(), g, math.nan).contiguous()
                iv = c
            else:
                c = (g * r).contiguous()
                iv = inv.contiguous()
            pow_mode, e = (_POW_ONE, 0) if sign_only else _pow_mode(p - 1.0)
            meta = _bwd_meta(x)
            with tu.on_device(x):
                if need_x:
                    grid = (tu.cdiv(b, meta["BLOCK_R"]), tu.cdiv(d, meta["BLOCK_K"]))
                    _lp_dist_bwd_kernel[grid](x, w, c, iv, gx, b, n, d, x.stride(0), x.stride(1), w.stride(0),
                                              w.stride(1), c.stride(0), c.stride(1), gx.stride(0),
                                              float(p - 1.0), int(e), SIGN_ONLY=sign_only, POW=pow_mode, **meta)
                if need_w:
                    grid = (tu.cdiv(n, meta["BLOCK_R"]), tu.cdiv(d, meta["BLOCK_K"]))
                    _lp_dist_bwd_kernel[grid](w, x, c, iv, gw, n, b, d, w.stride(0), w.stride(1), x.stride(0),
                                              x.stride(1), c.stride(1), c.stride(0), gw.stride(0),
                                              float(p - 1.0), int(e), SIGN_ONLY=sign_only, POW=pow_mode, **meta)
    rx = gx.to(x.dtype) if need_x else x.new_empty((0,))
    rw = gw.to(w.dtype) if need_w else w.new_empty((0,))
    return rx, rw


# ---------------------------------------------------------------------- torch.library
def _out_dtype(x: torch.Tensor, w: torch.Tensor) -> torch.dtype:
    return torch.float64 if torch.float64 in (x.dtype, w.dtype) else torch.float32


def _stats_shapes(x, w, p, stats):
    """Shapes of (idx, inv / r) the forward returns."""
    b, n = x.shape[0], w.shape[0]
    idx = (b, n) if stats and p == math.inf else (0, 0)
    ir = (b, n) if stats and p != math.inf and p != 1.0 else (0, 0)
    return idx, ir


def _fake_forward(x, w, p, stats, stats_dtype):
    idx_shape, ir_shape = _stats_shapes(x, w, p, stats)
    out = x.new_empty((x.shape[0], w.shape[0]), dtype=_out_dtype(x, w))
    return (out, x.new_empty(idx_shape, dtype=torch.int64), x.new_empty(ir_shape, dtype=stats_dtype),
            x.new_empty(ir_shape, dtype=stats_dtype))


def _require_cpu_op() -> None:
    if _C is None:
        raise RuntimeError("drp_kernels._C is not built or failed to load; build it with "
                           "`pip install --no-build-isolation -e .` (or use DRP_BACKEND=reference)")


@torch.library.custom_op("drp::lp_dist", mutates_args=())
def _lp_dist_op(x: torch.Tensor, w: torch.Tensor, p: float, use_triton: bool,
                stats: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if use_triton:
        return lp_dist_forward(x, w, p, stats)
    _require_cpu_op()
    return torch.ops.drp.lp_dist_cpu_forward(x, w, p, stats)


@_lp_dist_op.register_fake
def _(x, w, p, use_triton, stats):
    return _fake_forward(x, w, p, stats, torch.float32 if use_triton else _out_dtype(x, w))


@torch.library.custom_op("drp::lp_dist_backward", mutates_args=())
def _lp_dist_backward_op(grad: torch.Tensor, x: torch.Tensor, w: torch.Tensor, out: torch.Tensor,
                         idx: torch.Tensor, inv: torch.Tensor, r: torch.Tensor, p: float, use_triton: bool,
                         need_x: bool, need_w: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    if use_triton:
        return lp_dist_backward(grad, x, w, out, idx, inv, r, p, need_x, need_w)
    _require_cpu_op()
    return torch.ops.drp.lp_dist_cpu_backward(grad, x, w, out, idx, inv, r, p, need_x, need_w)


@_lp_dist_backward_op.register_fake
def _(grad, x, w, out, idx, inv, r, p, use_triton, need_x, need_w):
    gx = x.new_empty(x.shape if need_x else (0,))
    gw = w.new_empty(w.shape if need_w else (0,))
    return gx, gw


def _setup_context(ctx, inputs, output):
    x, w, p, use_triton, stats = inputs
    out, idx, inv, r = output
    ctx.save_for_backward(x, w, out, idx, inv, r)
    ctx.p = p
    ctx.use_triton = use_triton
    ctx.stats = stats
    ctx.mark_non_differentiable(idx, inv, r)


def _backward(ctx, grad_out, _grad_idx, _grad_inv, _grad_r):
    x, w, out, idx, inv, r = ctx.saved_tensors
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_x or need_w):
        return None, None, None, None, None
    if not ctx.stats and ctx.p != 1.0:
        raise RuntimeError("drp::lp_dist was called with stats=False, so it saved nothing to differentiate; "
                           "call drp_kernels.lp_dist (which asks for stats whenever a gradient is needed)")
    gx, gw = _lp_dist_backward_op(grad_out.contiguous(), x, w, out, idx, inv, r, ctx.p, ctx.use_triton,
                                  need_x, need_w)
    return (gx if need_x else None), (gw if need_w else None), None, None, None


_lp_dist_op.register_autograd(_backward, setup_context=_setup_context)

if _C is not None:

    @torch.library.register_fake("drp::lp_dist_cpu_forward")
    def _cpu_forward_fake(x, w, p, stats):
        return _fake_forward(x, w, p, stats, _out_dtype(x, w))

    @torch.library.register_fake("drp::lp_dist_cpu_backward")
    def _cpu_backward_fake(grad, x, w, out, idx, inv, r, p, need_x, need_w):
        return x.new_empty(x.shape if need_x else (0,)), w.new_empty(w.shape if need_w else (0,))


# ------------------------------------------------------------------------ public API
def check_p(p) -> float:
    """``p`` as a float in [1, inf] (``math.inf`` allowed); TypeError / ValueError otherwise."""
    if isinstance(p, bool) or not isinstance(p, Real):
        raise TypeError(f"p must be a float in [1, inf], got {type(p).__name__}")
    p = float(p)
    if math.isnan(p) or p < 1.0:
        raise ValueError(f"p must be a float in [1, inf] (math.inf allowed), got {p!r}")
    return p


def _check(x, w, p) -> float:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"w must be a torch.Tensor, got {type(w).__name__}")
    p = check_p(p)
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (B, D), got shape {tuple(x.shape)}")
    if w.dim() != 2:
        raise ValueError(f"w must be 2-D (N, D), got shape {tuple(w.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x must be float32, float16, bfloat16 or float64, got {x.dtype}")
    if w.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"w must be float32, float16, bfloat16 or float64, got {w.dtype}")
    if w.device != x.device:
        raise ValueError(f"w must be on x's device {x.device}, got {w.device}")
    if w.shape[1] != x.shape[1]:
        raise ValueError(f"x has D={x.shape[1]} but w has D={w.shape[1]}: the feature dimensions must match")
    return p


def _backend(x: torch.Tensor, w: torch.Tensor, p: float) -> str:
    """"reference", "triton" or "cpp" for this call (DRP_BACKEND, device, dtype). Triton runs float64
    at p = inf only (its float64 max path); other float64 work on CUDA runs the reference."""
    choice = os.environ.get("DRP_BACKEND", "auto").strip().lower() or "auto"
    if choice == "reference":
        return "reference"
    is64 = torch.float64 in (x.dtype, w.dtype) and p != math.inf
    if x.is_cuda:
        return "reference" if is64 else "triton"
    if choice == "triton" and not is64:
        from .._backend import backend_for

        return backend_for(x, w)  # raises unless TRITON_INTERPRET=1
    if x.device.type != "cpu" or _C is None:
        return "reference"
    return "cpp"


def lp_dist(x: torch.Tensor, w: torch.Tensor, *, p: float) -> torch.Tensor:
    """All-pairs lp distance: ``out[b, n] = (sum_k |x[b, k] - w[n, k]|^p)^(1/p)``.

    Args:
        x: (B, D) float32, float16, bfloat16 or float64.
        w: (N, D) float tensor on x's device.
        p: a float in [1, inf]; ``math.inf`` gives ``max_k |x[b, k] - w[n, k]|``.

    Returns (B, N) float32 (float64 when x or w is float64), computed in fp32 (fp64) registers.
    Gradients flow to x and w: ``sign(d) * |d|^(p-1) / out^(p-1)`` for finite p (zero where out is
    0); for p = inf the subgradient at the first arg-max coordinate. Finite p is scaled by the
    pair's maximum |d|, so p = 1000 neither overflows nor underflows. NaN in a row gives NaN.

    CPU tensors run the C++ kernels, CUDA tensors the Triton kernels (float64 on CUDA: the
    reference); ``DRP_BACKEND=reference`` forces ``drp_kernels.reference.lp_dist`` and
    ``DRP_BACKEND=triton`` with ``TRITON_INTERPRET=1`` runs the Triton kernels on CPU tensors.
    """
    p = _check(x, w, p)
    backend = _backend(x, w, p)
    if backend == "reference":
        return reference.lp_dist(x, w, p)
    stats = torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)
    if backend == "cpp" and not stats and not torch.compiler.is_compiling():
        # nothing to differentiate and nothing to trace: the C++ kernel directly, without the
        # Python custom op's dispatch (~30 us a call, as much as the kernel at small B and N)
        return torch.ops.drp.lp_dist_cpu_forward(x, w, p, False)[0]
    return _lp_dist_op(x, w, p, backend == "triton", stats)[0]
