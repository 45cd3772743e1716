"""ProtoLoss and proto_logits on the Triton kernels: launchers and ``torch.library`` registration.

The kernels live in ``proto_loss_kernels.py`` (their docstring explains the three paths: loss-only
gather, tiled logits, fused cross-entropy). This module picks tile sizes and grids, computes the
O((B + C) D) epilogues in PyTorch, and registers the ops ``drp::proto_loss``,
``drp::proto_loss_backward``, ``drp::proto_logits`` and ``drp::proto_logits_backward`` with
``register_fake`` and ``register_autograd``, so ``torch.compile(fullgraph=True)`` traces through
them without a graph break. Strides of z, P, y and of the incoming logits gradient are honoured
(no hidden copies). Launches happen on the inputs' device.

Precision (see ``_triton_utils``): z and P of one 16-bit dtype run the dots natively in that dtype;
otherwise fp32 dots follow ``torch.get_float32_matmul_precision()`` ("highest": IEEE fp32,
"high"/"medium": TF32) on CUDA and IEEE fp32 under the interpreter. ``DRP_AUTOTUNE=1`` autotunes
the tile sizes.

The module imports without triton (a CPU-only install); launching a kernel then raises.
"""
from __future__ import annotations

from typing import Tuple

import torch

from .._constants import COSINE_EPS, METRIC_ID, METRICS
from . import _triton_utils as tu

if tu.HAS_TRITON:
    from . import proto_loss_kernels as kernels
else:  # pragma: no cover - exercised by the no-triton import test in a subprocess
    kernels = None

__all__ = [
    "proto_loss_forward",
    "proto_loss_backward",
    "proto_logits_forward",
    "proto_logits_backward",
    "proto_loss_op",
    "proto_logits_op",
]

_COSINE = METRIC_ID["cosine"]
_L2 = METRIC_ID["l2"]
_LINF = METRIC_ID["linf"]

# (BLOCK_B, BLOCK_C, BLOCK_D, num_warps, num_stages) tried by DRP_AUTOTUNE=1
_TILE_CONFIGS = [(64, 64, 32, 4, 3), (128, 128, 32, 8, 3), (128, 64, 64, 4, 3), (64, 128, 64, 4, 3),
                 (32, 32, 8, 4, 3), (64, 32, 8, 4, 3), (32, 64, 16, 8, 3)]


def _prune_for_metric(configs, named_args, **kwargs):
    metric = kwargs.get("METRIC", named_args.get("METRIC"))
    if metric == _COSINE:
        return [c for c in configs if c.kwargs["BLOCK_D"] >= 16] or configs
    return [c for c in configs if c.kwargs["BLOCK_B"] * c.kwargs["BLOCK_C"] * c.kwargs["BLOCK_D"] <= 16384] or configs


def _tile_kernel(kernel, *, reset_to_zero=None):
    """The kernel as launched: autotuned over _TILE_CONFIGS with DRP_AUTOTUNE=1, else itself."""
    if not tu.autotune_enabled():
        return kernel
    return tu.tuned(kernel, tu.make_configs(_TILE_CONFIGS, ("BLOCK_B", "BLOCK_C", "BLOCK_D")),
                    ["C", "D", "METRIC"], reset_to_zero=reset_to_zero, prune=_prune_for_metric)


def _metric_id(metric: str) -> int:
    if metric not in METRIC_ID:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    return METRIC_ID[metric]


# ------------------------------------------------------------------------- launchers
def _dot_precision(z: torch.Tensor, p: torch.Tensor) -> str:
    half = (torch.float16, torch.bfloat16)
    # the interpreter's bf16 dot is not exact, so bf16 is upcast there
    if z.dtype == p.dtype and z.dtype in half and not (tu.interpreting(z) and z.dtype == torch.bfloat16):
        return "native"
    return tu.dot_precision_for(z)


def _tile_meta(metric: int, z: torch.Tensor, *, backward: bool = False, dot_prec: str = "native") -> dict:
    """Fixed tile sizes (ignored when DRP_AUTOTUNE=1).

    Every CUDA tile fits a block's shared memory: at most 92 KiB on sm_80 and 104 KiB on sm_90
    (tests/kernels/test_triton_compile.py compiles them for both and checks the limits).
    """
    if tu.autotune_enabled():
        return {}
    if tu.interpreting(z):
        # the interpreter runs each block op in numpy: fewer, larger programs are faster
        if metric == _COSINE:
            return {"BLOCK_B": 64, "BLOCK_C": 128, "BLOCK_D": 32}
        return {"BLOCK_B": 32, "BLOCK_C": 64, "BLOCK_D": 32}
    if metric == _COSINE:
        if not backward:
            return {"BLOCK_B": 128, "BLOCK_C": 128, "BLOCK_D": 32, "num_warps": 8, "num_stages": 3}
        # The backward's weight dots stage (BLOCK_B, BLOCK_C) fp32 tiles in shared memory: at
        # 128 x 128 they take 144 KiB (16-bit) to 352 KiB (fp32), more than a block may use on an
        # A100 (163 KiB) or H100 (227 KiB).
        if dot_prec == "native":
            return {"BLOCK_B": 128, "BLOCK_C": 64, "BLOCK_D": 32, "num_warps": 8, "num_stages": 2}
        return {"BLOCK_B": 64, "BLOCK_C": 64, "BLOCK_D": 32, "num_warps": 4, "num_stages": 2}
    return {"BLOCK_B": 32, "BLOCK_C": 32, "BLOCK_D": 8, "num_warps": 4}


def _gather_meta(z: torch.Tensor) -> dict:
    d = z.shape[1]
    block_d = max(16, min(256 if z.is_cuda else 128, tu.next_power_of_2(max(d, 1))))
    block_b = 64 if tu.interpreting(z) else max(1, 4096 // block_d)
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
    grid = (tu.cdiv(b, meta["BLOCK_B"]),)
    kernels._proto_gather_fwd_kernel[grid](z, p, y, dist, idx, b, p.shape[0], d, z.stride(0), z.stride(1),
                                           p.stride(0), p.stride(1), y.stride(0), COSINE_EPS, METRIC=metric, **meta)
    return dist, idx


def _gather_backward(g, z, p, y, idx, metric: int, coef: float, base, grad_p, out_dtype):
    b, d = z.shape
    grad_z = torch.empty((b, d), device=z.device, dtype=out_dtype)
    if b == 0:
        return grad_z
    meta = _gather_meta(z)
    grid = (tu.cdiv(b, meta["BLOCK_B"]),)
    kernels._proto_gather_bwd_kernel[grid](
        g, z, p, y, idx, base if base is not None else grad_z, grad_z,
        grad_p if grad_p is not None else grad_z, b, p.shape[0], d, z.stride(0), z.stride(1),
        p.stride(0), p.stride(1), y.stride(0), grad_z.stride(0), COSINE_EPS, float(coef),
        METRIC=metric, HAS_BASE=base is not None, HAS_GRAD_P=grad_p is not None, **meta)
    return grad_z


def _tile_grid(b, c):
    """1-D grid over the (B, C) tiles (C tiles fastest; see proto_loss_kernels._tile_ids)."""
    return lambda m: (tu.cdiv(b, m["BLOCK_B"]) * tu.cdiv(c, m["BLOCK_C"]),)


def proto_logits_forward(z: torch.Tensor, p: torch.Tensor, metric: str) -> torch.Tensor:
    """(B, C) fp32 logits; cosine: cos(z, P_c), l2 / linf: -d(z, P_c)."""
    m = _metric_id(metric)
    b, d = z.shape
    c = p.shape[0]
    out = torch.empty((b, c), device=z.device, dtype=torch.float32)
    if b == 0 or c == 0:
        return out
    tu.require_triton()
    inv_zn, _ = _inv_norms(z) if m == _COSINE else (out, None)
    inv_pn, _ = _inv_norms(p) if m == _COSINE else (out, None)
    meta = _tile_meta(m, z)
    with tu.on_device(z):
        _tile_kernel(kernels._proto_logits_fwd_kernel)[_tile_grid(b, c)](
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
    rz = torch.zeros(b, device=dev, dtype=torch.float32) if metric == _L2 else uz
    rp = torch.zeros(c, device=dev, dtype=torch.float32) if metric == _L2 and need_grad_p else rz
    if metric == _COSINE:
        inv_zn, inv_zr = _inv_norms(z)
        inv_pn, inv_pr = _inv_norms(p)
    else:
        inv_zn = inv_pn = uz
    if b > 0 and c > 0:
        from_ce = lse is not None
        dot_prec = _dot_precision(z, p)
        meta = _tile_meta(metric, z, backward=True, dot_prec=dot_prec)
        kernel = _tile_kernel(kernels._proto_logits_bwd_kernel, reset_to_zero=["uz_ptr", "up_ptr", "rz_ptr", "rp_ptr"])
        kernel[_tile_grid(b, c)](
            g, g.stride(0) if not from_ce else 0, g.stride(1) if not from_ce else 0, z, p,
            inv_zn, inv_pn, lse if from_ce else uz, uz, up, rz, rp, b, c, d,
            z.stride(0), z.stride(1), p.stride(0), p.stride(1), float(inv_temp),
            METRIC=metric, FROM_CE=from_ce, HAS_GRAD_P=need_grad_p, DOT_PREC=dot_prec, **meta)
    grad_p = None
    if metric == _LINF:
        grad_z = uz
        grad_p = up if need_grad_p else None
    elif metric == _L2:
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
    m = _metric_id(metric)
    if z.shape[0] > 0 and p.shape[0] > 0:
        tu.require_triton()
    with tu.on_device(z):
        gz, gp = _logits_backward_partials(grad, z, p, m, need_grad_p)
    gp = gp.to(p.dtype) if gp is not None else p.new_empty(0)
    return gz.to(z.dtype), gp


def proto_loss_forward(z, p, y, metric: str, ce_weight: float, temperature: float):
    """(per_sample loss fp32 (B,), lse fp32 (B,), linf arg-max int32 (B,))."""
    m = _metric_id(metric)
    b, c = z.shape[0], p.shape[0]
    if b > 0:
        tu.require_triton()
    with tu.on_device(z):
        dist, idx = _gather_forward(z, p, y, m)
        if ce_weight == 0.0 or b == 0:
            return dist, torch.zeros_like(dist), idx
        meta = _tile_meta(m, z)
        n_b = tu.cdiv(b, meta.get("BLOCK_B", 64))
        n_c = tu.cdiv(c, meta.get("BLOCK_C", 64))
        target_programs = 4 * (torch.cuda.get_device_properties(z.device).multi_processor_count if z.is_cuda else 1)
        split = max(1, min(n_c, tu.cdiv(target_programs, n_b), 65535))
        part = torch.empty((split, b), device=z.device, dtype=torch.float32)
        inv_zn = _inv_norms(z)[0] if m == _COSINE else part
        inv_pn = _inv_norms(p)[0] if m == _COSINE else part
        _tile_kernel(kernels._proto_lse_fwd_kernel)[lambda mt: (tu.cdiv(b, mt["BLOCK_B"]), split)](
            z, p, inv_zn, inv_pn, part, b, c, z.shape[1], z.stride(0), z.stride(1), p.stride(0), p.stride(1),
            1.0 / temperature, METRIC=m, DOT_PREC=_dot_precision(z, p), **meta)
        lse = torch.logsumexp(part, dim=0) if split > 1 else part[0]
    target_logit = 1.0 - dist if m == _COSINE else -dist
    per_sample = dist + ce_weight * (lse - target_logit / temperature)
    return per_sample, lse.contiguous(), idx


def proto_loss_backward(grad, z, p, y, lse, idx, metric: str, ce_weight: float, temperature: float,
                        need_grad_p: bool):
    """Gradients of sum(grad * per_sample) wrt z (z.dtype) and P (P.dtype, or an empty tensor)."""
    m = _metric_id(metric)
    if z.shape[0] > 0:
        tu.require_triton()
    g = grad.to(torch.float32).contiguous()
    base = None
    grad_p = torch.zeros(p.shape, device=p.device, dtype=torch.float32) if need_grad_p else None
    coef = 1.0
    with tu.on_device(z):
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
