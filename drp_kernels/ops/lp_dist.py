"""All-pairs lp distance ``out[b, n] = (sum_k |x[b, k] - w[n, k]|^p)^(1/p)``, p in [1, inf]:
launchers and ``torch.library`` registration (the public op is ``drp_kernels.functional.lp_dist``).

One op, ``drp::lp_dist``, registered with ``torch.library.custom_op``, ``register_fake`` and
``register_autograd``; its flag ``use_triton`` is fixed per call by ``functional.lp_dist``:

* CPU tensors: the C++ ops ``drp::lp_dist_cpu_forward`` / ``drp::lp_dist_cpu_backward`` of the
  extension (``csrc/lp_dist.cpp``: SIMD micro-kernels blocked over (B, N) like a GEMM,
  ``at::parallel_for``, fused backward), whose fakes are registered here too. float64 runs them in
  double.
* CUDA tensors (and CPU tensors with ``DRP_BACKEND=triton`` under ``TRITON_INTERPRET=1``): the
  Triton kernels of ``lp_dist_kernels.py``, launched by ``lp_dist_forward`` / ``lp_dist_backward``.
  On CUDA both operands are passed transposed, (D, B) and (D, N), so the kernels' per-k loads are
  coalesced (one O((B + N) D) copy each). The p = inf backward is a scatter-add of
  ``sign(d) * grad`` at the saved arg-max (O(B N) torch ops).

The forward saves (when a gradient is needed) the (B, N) int64 arg-max index for p = inf, and the
(B, N) ``inv`` and ``r`` for finite p > 1; the C++ kernels save the same. Non-finite input: a pair
with a NaN has distance NaN, else one with an infinite coordinate has distance inf; at finite p
every coordinate of such a pair's rows gets a NaN gradient, at p = inf the gradient sits at the
first arg-max (NaN counting as the largest value), on every backend.
The module imports without triton; the Triton path then raises a clear error.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch

from . import _extension
from . import _triton_utils as tu

if tu.HAS_TRITON:
    from . import lp_dist_kernels as kernels
else:  # pragma: no cover - exercised by the no-triton import test in a subprocess
    kernels = None

__all__ = ["lp_dist_forward", "lp_dist_backward", "lp_dist_op", "lp_dist_cpu_forward"]

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
        kernels._lp_dist_fwd_kernel[grid](
            xo, wo, out, idx if want_idx else out, inv if want_ir else out, r if want_ir else out, b, n, d,
            xo.stride(0), xo.stride(1), wo.stride(0), wo.stride(1), float(p if not is_inf else 1.0),
            float(1.0 / p if not is_inf else 1.0), int(e), IS_INF=is_inf, POW=pow_mode, STATS=stats, F64=f64, **meta)
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
                    kernels._lp_dist_bwd_kernel[grid](
                        x, w, c, iv, gx, b, n, d, x.stride(0), x.stride(1), w.stride(0), w.stride(1), c.stride(0),
                        c.stride(1), gx.stride(0), float(p - 1.0), int(e), SIGN_ONLY=sign_only, POW=pow_mode, **meta)
                if need_w:
                    grid = (tu.cdiv(n, meta["BLOCK_R"]), tu.cdiv(d, meta["BLOCK_K"]))
                    kernels._lp_dist_bwd_kernel[grid](
                        w, x, c, iv, gw, n, b, d, w.stride(0), w.stride(1), x.stride(0), x.stride(1), c.stride(1),
                        c.stride(0), gw.stride(0), float(p - 1.0), int(e), SIGN_ONLY=sign_only, POW=pow_mode, **meta)
    rx = gx.to(x.dtype) if need_x else x.new_empty((0,))
    rw = gw.to(w.dtype) if need_w else w.new_empty((0,))
    return rx, rw


# ---------------------------------------------------------------------- torch.library
def _out_dtype(x: torch.Tensor, w: torch.Tensor) -> torch.dtype:
    return torch.float64 if torch.float64 in (x.dtype, w.dtype) else torch.float32


# The C++ forward's sparse scheme (csrc/lp_dist.cpp, sparse_p / map_words): above this p, with
# stats, its idx is a chunk map of one bit per 8 coordinates, (B, N, W) int64.
_CPU_SPARSE_MIN_P = 24.0


def _stats_shapes(x, w, p, stats, cpu):
    """Shapes of (idx, inv / r) the forward returns (cpu: the C++ ops, else Triton)."""
    b, n = x.shape[0], w.shape[0]
    idx = (b, n) if stats and p == math.inf else (0, 0)
    if cpu and stats and _CPU_SPARSE_MIN_P < p < math.inf:
        idx = (b, n, ((x.shape[1] + 7) // 8 + 63) // 64)
    ir = (b, n) if stats and p != math.inf and p != 1.0 else (0, 0)
    return idx, ir


def _fake_forward(x, w, p, stats, stats_dtype, cpu):
    idx_shape, ir_shape = _stats_shapes(x, w, p, stats, cpu)
    out = x.new_empty((x.shape[0], w.shape[0]), dtype=_out_dtype(x, w))
    return (out, x.new_empty(idx_shape, dtype=torch.int64), x.new_empty(ir_shape, dtype=stats_dtype),
            x.new_empty(ir_shape, dtype=stats_dtype))


@torch.library.custom_op("drp::lp_dist", mutates_args=())
def lp_dist_op(x: torch.Tensor, w: torch.Tensor, p: float, use_triton: bool,
                stats: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if use_triton:
        return lp_dist_forward(x, w, p, stats)
    _extension.require()
    return torch.ops.drp.lp_dist_cpu_forward(x, w, p, stats)


@lp_dist_op.register_fake
def _(x, w, p, use_triton, stats):
    return _fake_forward(x, w, p, stats, torch.float32 if use_triton else _out_dtype(x, w), not use_triton)


@torch.library.custom_op("drp::lp_dist_backward", mutates_args=())
def _lp_dist_backward_op(grad: torch.Tensor, x: torch.Tensor, w: torch.Tensor, out: torch.Tensor,
                         idx: torch.Tensor, inv: torch.Tensor, r: torch.Tensor, p: float, use_triton: bool,
                         need_x: bool, need_w: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    if use_triton:
        return lp_dist_backward(grad, x, w, out, idx, inv, r, p, need_x, need_w)
    _extension.require()
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


lp_dist_op.register_autograd(_backward, setup_context=_setup_context)

if _extension.available():

    @torch.library.register_fake("drp::lp_dist_cpu_forward")
    def _cpu_forward_fake(x, w, p, stats):
        return _fake_forward(x, w, p, stats, _out_dtype(x, w), True)

    @torch.library.register_fake("drp::lp_dist_cpu_backward")
    def _cpu_backward_fake(grad, x, w, out, idx, inv, r, p, need_x, need_w):
        return x.new_empty(x.shape if need_x else (0,)), w.new_empty(w.shape if need_w else (0,))


def lp_dist_cpu_forward(x: torch.Tensor, w: torch.Tensor, p: float) -> torch.Tensor:
    """The C++ forward alone, for calls that need no gradient and are not traced: it skips the
    Python custom op's dispatch (~30 us a call, as much as the kernel at small B and N)."""
    return torch.ops.drp.lp_dist_cpu_forward(x, w, p, False)[0]
