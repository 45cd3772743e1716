"""Functional API of drp_kernels (keyword-only options).

PROVISIONAL: the ProtoLoss section and the repulsion section call the reference
until their Triton dispatch lands.
"""
from . import reference

__all__ = ["proto_loss", "proto_logits", "repulsion_energy"]


# ======================================================== ProtoLoss section (issue 3)
import math as _math

import torch as _torch

from ._backend import backend_for as _backend_for
from .ops import proto_loss as _proto_ops

PROTO_METRICS = ("linf", "cosine", "l2")
PROTO_REDUCTIONS = ("mean", "sum", "none")
_FLOAT_DTYPES = (_torch.float32, _torch.float16, _torch.bfloat16, _torch.float64)


def _check_proto_options(*, metric, reduction="mean", ce_weight=0.0, temperature=1.0):
    if metric not in PROTO_METRICS:
        raise ValueError(f"metric must be one of {PROTO_METRICS}, got {metric!r}")
    if reduction not in PROTO_REDUCTIONS:
        raise ValueError(f"reduction must be one of {PROTO_REDUCTIONS}, got {reduction!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
            _math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite float > 0, got {temperature!r}")
    if isinstance(ce_weight, bool) or not isinstance(ce_weight, (int, float)) or not _math.isfinite(ce_weight):
        raise ValueError(f"ce_weight must be a finite float, got {ce_weight!r}")


def _check_proto_inputs(z, prototypes, y=None):
    if not isinstance(z, _torch.Tensor):
        raise TypeError(f"z must be a torch.Tensor, got {type(z).__name__}")
    if not isinstance(prototypes, _torch.Tensor):
        raise TypeError(f"prototypes must be a torch.Tensor, got {type(prototypes).__name__}")
    if z.dim() != 2:
        raise ValueError(f"z must be 2-D (B, D), got shape {tuple(z.shape)}")
    if z.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"z must be float32, float16, bfloat16 or float64, got {z.dtype}")
    if prototypes.dim() != 2:
        raise ValueError(f"prototypes must be 2-D (C, D), got shape {tuple(prototypes.shape)}")
    if prototypes.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"prototypes must be float32, float16, bfloat16 or float64, got {prototypes.dtype}")
    if prototypes.shape[0] < 1:
        raise ValueError("prototypes must have at least one row (C >= 1)")
    if prototypes.device != z.device:
        raise ValueError(f"prototypes must be on z's device {z.device}, got {prototypes.device}")
    if prototypes.shape[1] != z.shape[1]:
        raise ValueError(f"z has D={z.shape[1]} but prototypes have D={prototypes.shape[1]}: "
                         "the feature dimensions must match")
    if y is None:
        return
    if not isinstance(y, _torch.Tensor):
        raise TypeError(f"y must be a torch.Tensor of int64 class indices, got {type(y).__name__}")
    if y.dtype != _torch.int64:
        raise ValueError(f"y must have dtype torch.int64, got {y.dtype}")
    if y.shape != (z.shape[0],):
        raise ValueError(f"y must have shape ({z.shape[0]},) to match z, got {tuple(y.shape)}")
    if y.device != z.device:
        raise ValueError(f"y must be on z's device {z.device}, got {y.device}")
    if y.numel() > 0 and not _torch.compiler.is_compiling():
        c = prototypes.shape[0]
        bad = (y < 0) | (y >= c)
        if bool(bad.any()):  # one host sync on CUDA: a clear error beats a silent NaN
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"y must hold class indices in [0, {c}), got y[{i}] = {int(y[i])}")


def _use_kernels(z, prototypes):
    if z.dtype == _torch.float64 or prototypes.dtype == _torch.float64:
        return False  # the kernels compute in fp32; float64 always runs the reference
    return _backend_for(z, prototypes) == "triton"


def proto_loss(z, prototypes, y, *, metric="linf", reduction="mean", ce_weight=0.0, temperature=1.0):
    """Prototype loss: ``d(z_b, P[y_b]) + ce_weight * cross_entropy(logits_b / temperature, y_b)``.

    Args:
        z: (B, D) float32, float16 or bfloat16 (float64 runs the reference) network outputs.
        prototypes: (C, D) class prototypes, on z's device (any float dtype).
        y: (B,) int64 targets in [0, C), on z's device.
        metric: "linf" (``max_k |z_k - p_k|``; its gradient is the subgradient at the
            first arg-max coordinate), "l2" (``||z - p||``; zero gradient at z == p) or
            "cosine" (``1 - cos(z, p)``, ``F.cosine_similarity`` with eps 1e-8).
        reduction: "mean", "sum" or "none", as in torch. An empty batch (B = 0) gives
            NaN for "mean" (torch's mean of nothing), 0 for "sum" and an empty tensor for "none".
        ce_weight: weight of the cross-entropy term on the logits (see ``proto_logits``);
            0 is the paper's loss and runs the loss-only kernel that reads only P[y].
        temperature: > 0, divides the logits inside the cross-entropy.

    Returns the loss in float32 (float64 for float64 inputs). Gradients flow to z and, when
    it requires grad, to ``prototypes``. Targets are range-checked eagerly (one host sync
    on CUDA); under ``torch.compile`` the check is skipped and the kernels return NaN for an
    out-of-range target instead of reading out of bounds. CUDA tensors run the fused Triton
    kernels, CPU tensors the reference; ``DRP_BACKEND`` overrides this.
    """
    _check_proto_options(metric=metric, reduction=reduction, ce_weight=ce_weight, temperature=temperature)
    _check_proto_inputs(z, prototypes, y)
    if not _use_kernels(z, prototypes):
        return reference.proto_loss(z, prototypes, y, metric=metric, reduction=reduction,
                                    ce_weight=float(ce_weight), temperature=float(temperature))
    per_sample = _proto_ops.proto_loss_op(z, prototypes, y, metric, float(ce_weight), float(temperature))[0]
    if reduction == "none":
        return per_sample
    if reduction == "sum":
        return per_sample.sum()
    return per_sample.mean()


def proto_logits(z, prototypes, *, metric="linf"):
    """(B, C) float32 scores, higher is closer: ``cos(z, P_c)`` for cosine, ``-d(z, P_c)`` for l2 / linf.

    CUDA tensors run the tiled Triton kernel (never B*C*D memory, forward or backward), CPU
    tensors the reference; ``DRP_BACKEND`` overrides this. float64 inputs run the reference
    and give float64.
    """
    _check_proto_options(metric=metric)
    _check_proto_inputs(z, prototypes)
    if not _use_kernels(z, prototypes):
        return reference.proto_logits(z, prototypes, metric=metric)
    return _proto_ops.proto_logits_op(z, prototypes, metric)
# ==================================================== end ProtoLoss section (issue 3)


# ======================================================== repulsion section (issue 4)
import math as _rmath

import torch as _rtorch

from ._backend import backend_for as _rbackend_for
from .ops import repulsion as _repulsion_ops

_REPULSION_METRICS = ("linf", "l2", "cosine")
_REPULSION_KINDS = ("sum", "softmin")


def repulsion_energy(P, *, metric="cosine", kind="softmin", temperature=0.05):
    """All-pairs repulsion energy of the rows of P (C, D); differentiable w.r.t. P.

    d_ij: linf ``max_k |p_ik - p_jk|``, l2 ``||p_i - p_j||``, cosine ``1 - cos(p_i, p_j)``.
    kind="sum":     ``E = -sum_{i<j} d_ij`` (the paper's objective);
    kind="softmin": ``E = t * log sum_{i != j} exp(-d_ij / t)``, a smooth ``-min_{i != j} d_ij``.
    The default temperature 0.05 suits distances of order 1 (cosine distances lie in [0, 2]).
    Minimising E pushes the prototypes apart. Returns a scalar (fp32, fp64 for fp64 input).

    Backend (``DRP_BACKEND``): the fused Triton kernels of ``drp_kernels.ops.repulsion`` (memory
    O(C*D)) or ``drp_kernels.reference`` (memory O(C*C*D)). fp64 inputs and C < 2 always use the
    reference; the kernels compute in fp32 for fp16/bf16/fp32 inputs.
    """
    if not isinstance(P, _rtorch.Tensor):
        raise ValueError(f"P must be a torch.Tensor, got {type(P).__name__}")
    if P.dim() != 2:
        raise ValueError(f"P must be 2-D (num_classes, dim), got shape {tuple(P.shape)}")
    if not P.is_floating_point():
        raise ValueError(f"P must be a floating-point tensor, got dtype {P.dtype}")
    if P.shape[1] < 1:
        raise ValueError(f"P must have at least one column (dim >= 1), got shape {tuple(P.shape)}")
    if metric not in _REPULSION_METRICS:
        raise ValueError(f"metric must be one of {_REPULSION_METRICS}, got {metric!r}")
    if kind not in _REPULSION_KINDS:
        raise ValueError(f"kind must be one of {_REPULSION_KINDS}, got {kind!r}")
    temperature = float(temperature)
    if kind == "softmin" and not (temperature > 0.0 and _rmath.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    if _rbackend_for(P) == "reference" or P.dtype == _rtorch.float64 or P.shape[0] < 2:
        return reference.repulsion_energy(P, metric=metric, kind=kind, temperature=temperature)
    return _repulsion_ops.repulsion_energy(P, metric=metric, kind=kind, temperature=temperature)
# ==================================================== end repulsion section (issue 4)
