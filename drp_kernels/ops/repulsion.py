"""Fused all-pairs repulsion energy and its gradient (Triton), never holding the C x C matrix.

Notation: X is (C, D); d_ij is the pairwise "distance" of rows i and j.

  metric "cosine": the launcher L2-normalises the rows in PyTorch first (float64, differentiable, O(C*D)),
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

All math is fp32 whatever the input dtype. fp32 dot products follow
``torch.get_float32_matmul_precision()`` ("highest": IEEE fp32, "high"/"medium": TF32) on CUDA and
use IEEE fp32 under the interpreter. ``DRP_AUTOTUNE=1`` turns on autotuning of the block sizes (off
by default, so the first call is not slow). The kernels are in ``repulsion_kernels.py``; this
module holds the launchers and the ``torch.library`` registration, and imports without triton.
"""
from __future__ import annotations

import torch

from .._constants import COSINE_EPS, DEFAULT_METRIC, KIND_ID, METRIC_ID, METRICS, REPULSION_KINDS
from . import _triton_utils as tu

if tu.HAS_TRITON:
    from . import repulsion_kernels as kernels
else:  # pragma: no cover - exercised by the no-triton import test in a subprocess
    kernels = None

__all__ = ["repulsion_forward", "repulsion_backward", "repulsion_energy"]

# (BLOCK_I, BLOCK_J, BLOCK_D, num_warps, num_stages)
_FWD_DOT_CONFIGS = [(128, 64, 32, 8, 3), (64, 64, 32, 4, 3), (128, 128, 32, 8, 3), (64, 128, 64, 4, 3),
                    (128, 64, 64, 8, 2)]
_DIFF_CONFIGS = [(32, 32, 8, 4, 2), (64, 32, 8, 8, 2), (32, 32, 16, 8, 2), (64, 64, 4, 8, 2), (16, 16, 16, 4, 2)]
_BWD_DOT_CONFIGS = [(64, 64, 32, 8, 2), (64, 32, 32, 4, 2), (128, 64, 32, 8, 2), (32, 64, 32, 4, 3)]
_BLOCKS = ("BLOCK_I", "BLOCK_J", "BLOCK_D")
_DEFAULT = {
    "fwd_dot": _FWD_DOT_CONFIGS[0],
    "fwd_diff": _DIFF_CONFIGS[0],
    "bwd_dot": _BWD_DOT_CONFIGS[0],
    "bwd_diff": _DIFF_CONFIGS[0],
}


def _block_do(D: int) -> int:
    """Output columns per program of the cosine backward (fp32 accumulator kept in registers)."""
    return max(16, min(256, tu.next_power_of_2(D)))


def _launch(kernel, name: str, configs, key, grid, args, kwargs, *, reset=None):
    """Launch with the fixed tiles of ``name``, or autotuned over ``configs`` with DRP_AUTOTUNE=1."""
    if tu.autotune_enabled():
        tu.tuned(kernel, tu.make_configs(configs, _BLOCKS), key, reset_to_zero=reset)[grid](*args, **kwargs)
    else:
        bi, bj, bd, w, s = _DEFAULT[name]
        meta = {"BLOCK_I": bi, "BLOCK_J": bj, "BLOCK_D": bd}
        kernel[grid(meta)](*args, **kwargs, **meta, num_warps=w, num_stages=s)


# ---------------------------------------------------------------------------- launchers
def _check_x(x: torch.Tensor, metric: str, kind: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if kind not in REPULSION_KINDS:
        raise ValueError(f"kind must be one of {REPULSION_KINDS}, got {kind!r}")
    if x.dim() != 2:
        raise ValueError(f"X must be 2-D (C, D), got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"X must be float16, bfloat16 or float32 for the kernels, got {x.dtype}")


def repulsion_forward(x: torch.Tensor, *, metric: str, kind: str, temperature: float) -> torch.Tensor:
    """Per-row statistic (C,) fp32: r_i = sum_{j!=i} d_ij (sum) or l_i (softmin).

    For metric "cosine" the rows of ``x`` must already be unit vectors (see module docstring).
    """
    _check_x(x, metric, kind)
    tu.require_triton()
    C, D = x.shape
    row = torch.empty(C, device=x.device, dtype=torch.float32)
    dot = metric == "cosine"
    with tu.on_device(x):
        _launch(kernels._repulsion_fwd_kernel, "fwd_dot" if dot else "fwd_diff",
                _FWD_DOT_CONFIGS if dot else _DIFF_CONFIGS, ["C", "D", "METRIC", "KIND"],
                lambda meta: (tu.cdiv(C, meta["BLOCK_I"]),),
                (x, row, C, D, x.stride(0), x.stride(1), float(temperature)),
                dict(METRIC=METRIC_ID[metric], KIND=KIND_ID[kind], PRECISION=tu.dot_precision_for(x)))
    return row


def _log_s(row: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "softmin":
        return torch.logsumexp(row, dim=0)
    return torch.zeros((), device=row.device, dtype=torch.float32)


def repulsion_backward(grad: torch.Tensor, x: torch.Tensor, row: torch.Tensor, *, metric: str, kind: str,
                       temperature: float) -> torch.Tensor:
    """dE/dx (same dtype as x) from the incoming gradient of E and the forward's per-row statistic."""
    _check_x(x, metric, kind)
    tu.require_triton()
    C, D = x.shape
    scal = torch.stack([grad.reshape(()).to(device=x.device, dtype=torch.float32),
                        _log_s(row, kind).to(torch.float32)])
    t = float(temperature)
    with tu.on_device(x):
        if metric == "cosine":
            gx = torch.empty(C, D, device=x.device, dtype=torch.float32)
            bdo = _block_do(D)
            _launch(kernels._repulsion_bwd_dot_kernel, "bwd_dot", _BWD_DOT_CONFIGS, ["C", "D", "KIND"],
                    lambda meta: (tu.cdiv(C, meta["BLOCK_I"]), tu.cdiv(D, bdo)),
                    (x, scal, gx, C, D, x.stride(0), x.stride(1), gx.stride(0), gx.stride(1), t),
                    dict(KIND=KIND_ID[kind], PRECISION=tu.dot_precision_for(x), BLOCK_DO=bdo))
        else:
            gx = torch.zeros(C, D, device=x.device, dtype=torch.float32)
            _launch(kernels._repulsion_bwd_diff_kernel, "bwd_diff", _DIFF_CONFIGS, ["C", "D", "METRIC", "KIND"],
                    lambda meta: (tu.cdiv(C, meta["BLOCK_I"]),),
                    (x, scal, gx, C, D, x.stride(0), x.stride(1), gx.stride(0), gx.stride(1), t),
                    dict(METRIC=METRIC_ID[metric], KIND=KIND_ID[kind]), reset=["GRAD"])
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
def repulsion_energy(P: torch.Tensor, *, metric: str = DEFAULT_METRIC, kind: str = "softmin",
                     temperature: float = 0.05) -> torch.Tensor:
    """Repulsion energy of the rows of P on the Triton kernels (differentiable w.r.t. P).

    Same definition as ``drp_kernels.reference.repulsion_energy``. Returns an fp32 scalar.
    cosine normalises the rows in float64 first (O(C*D) copies, differentiable through autograd).
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if kind not in REPULSION_KINDS:
        raise ValueError(f"kind must be one of {REPULSION_KINDS}, got {kind!r}")
    if metric == "cosine":
        # unit rows computed in float64 (O(C*D)), then rounded to fp32: the kernel's rows are the
        # correctly rounded unit vectors, and the gradient's projection onto the sphere (autograd
        # through this line) runs in float64, so it cancels what it should: at D = 1 the energy
        # is constant and the gradient exactly 0, where an fp32 projection left ~1e-7 / |p_i|.
        p64 = P.to(torch.float64)
        x = (p64 / torch.linalg.vector_norm(p64, dim=1, keepdim=True).clamp_min(COSINE_EPS)).to(torch.float32)
    else:
        x = P
    energy, _row = torch.ops.drp.repulsion_fwd(x, metric, kind, float(temperature))
    return energy

