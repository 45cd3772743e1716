"""Functional API of drp_kernels (keyword-only options): argument checks and backend choice, then the
ops of ``drp_kernels.ops`` or the pure-PyTorch ``drp_kernels.reference``.

``lp_dist`` runs the C++ kernels of ``drp_kernels.ops.lp_dist`` for CPU tensors and its Triton kernels
for CUDA tensors; ``proto_loss`` and ``proto_logits`` run the fused Triton kernels of ``drp_kernels.ops.proto_loss``
for CUDA tensors and the pure-PyTorch ``drp_kernels.reference`` for CPU tensors;
``repulsion_energy`` dispatches the same way to ``drp_kernels.ops.repulsion``. ``DRP_BACKEND``
overrides the choice (see ``drp_kernels._backend``).

``DRP_CHECK_TARGETS=0`` switches off the eager range check of the targets of ``proto_loss``
(one host sync on CUDA); the check is always skipped under ``torch.compile`` and during CUDA
graph capture.
"""
import numbers
import os

import torch
import torch.nn.functional as F

from . import reference
from ._backend import backend_for, lp_dist_backend
from ._constants import DEFAULT_METRIC, REDUCTIONS, REPULSION_KINDS
from ._validate import (FLOAT_DTYPES, check_choice, check_float, check_matrix, check_metric, check_p,
                        check_targets, check_tensor)
from .ops import lp_dist as _lp_ops
from .ops import proto_loss as _proto_ops
from .ops import repulsion as _repulsion_ops

__all__ = ["lp_dist", "proto_loss", "proto_logits", "paper_logits", "repulsion_energy", "target_checks_enabled"]


def target_checks_enabled() -> bool:
    """Whether ``proto_loss`` range-checks its targets eagerly.

    On by default; ``DRP_CHECK_TARGETS=0`` (or ``false``, ``no``, ``off``) switches it off, read at
    every call. The check needs one host sync on CUDA, so it is also skipped under ``torch.compile``
    and while the current CUDA stream is being captured into a graph. Without the check an
    out-of-range target gives NaN (kernels) or an indexing error (reference), never a silent read
    out of bounds.
    """
    flag = os.environ.get("DRP_CHECK_TARGETS", "1").strip().lower()
    return flag not in ("0", "false", "no", "off")


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _check_proto_options(*, metric, reduction="mean", ce_weight=0.0, temperature=1.0, ignore_index=-100,
                         label_smoothing=0.0):
    check_metric(metric)
    check_choice("reduction", reduction, REDUCTIONS)
    check_float("temperature", temperature, positive=True)
    check_float("ce_weight", ce_weight)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__} {ignore_index!r}")
    check_float("label_smoothing", label_smoothing, minimum=0.0, maximum=1.0)


def _check_proto_inputs(z, prototypes):
    check_matrix("z", z, dtypes=FLOAT_DTYPES)
    check_matrix("prototypes", prototypes, dtypes=FLOAT_DTYPES, min_rows=1)
    if prototypes.device != z.device:
        raise ValueError(f"prototypes must be on z's device {z.device}, got {prototypes.device}")
    if prototypes.shape[1] != z.shape[1]:
        raise ValueError(f"z has D={z.shape[1]} but prototypes have D={prototypes.shape[1]}: "
                         "the feature dimensions must match")


def _check_weight(weight, num_classes, device):
    if weight is None:
        return None
    check_tensor("weight", weight)
    if not weight.is_floating_point():
        raise ValueError(f"weight must be a floating-point tensor, got dtype {weight.dtype}")
    if weight.shape != (num_classes,):
        raise ValueError(f"weight must have shape ({num_classes},), one entry per prototype, "
                         f"got {tuple(weight.shape)}")
    if weight.device != device:
        raise ValueError(f"weight must be on z's device {device}, got {weight.device}")
    return weight


def _check_target_range(y, num_classes, ignore_index):
    if y.numel() == 0 or torch.compiler.is_compiling() or _capturing() or not target_checks_enabled():
        return
    bad = ((y < 0) | (y >= num_classes)) & (y != ignore_index)
    if bool(bad.any()):  # one host sync on CUDA: a clear error beats a silent NaN
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"y must hold class indices in [0, {num_classes}), got y[{i}] = {int(y[i])} "
                         f"(a target equal to ignore_index={ignore_index} skips its sample)")


def _use_kernels(z, prototypes):
    if z.dtype == torch.float64 or prototypes.dtype == torch.float64:
        return False  # the kernels compute in fp32; float64 always runs the reference
    return backend_for(z, prototypes) == "triton"


def _reduce_kept(per_sample, keep, reduction):
    """Reduce over the kept samples: ignored ones are 0 under "none" and left out of "sum" and "mean"."""
    per_sample = torch.where(keep, per_sample, torch.zeros((), dtype=per_sample.dtype, device=per_sample.device))
    if reduction == "none":
        return per_sample
    if reduction == "sum":
        return per_sample.sum()
    return per_sample.sum() / keep.sum()  # no kept sample: 0 / 0 = NaN, as F.cross_entropy


def _check_lp_inputs(x, w, p) -> float:
    check_tensor("x", x)
    check_tensor("w", w)
    p = check_p(p)
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (B, D), got shape {tuple(x.shape)}")
    if w.dim() != 2:
        raise ValueError(f"w must be 2-D (N, D), got shape {tuple(w.shape)}")
    for name, t in (("x", x), ("w", w)):
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must be float32, float16, bfloat16 or float64, got {t.dtype}")
    if w.device != x.device:
        raise ValueError(f"w must be on x's device {x.device}, got {w.device}")
    if w.shape[1] != x.shape[1]:
        raise ValueError(f"x has D={x.shape[1]} but w has D={w.shape[1]}: the feature dimensions must match")
    return p


def lp_dist(x, w, *, p):
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
    p = _check_lp_inputs(x, w, p)
    backend = lp_dist_backend(x, w, p)
    if backend == "reference":
        return reference.lp_dist(x, w, p)
    stats = torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)
    if backend == "cpp" and not stats and not torch.compiler.is_compiling():
        return _lp_ops.lp_dist_cpu_forward(x, w, p)  # nothing to differentiate or trace: no custom-op dispatch
    return _lp_ops.lp_dist_op(x, w, p, backend == "triton", stats)[0]


def proto_loss(z, prototypes, y, *, metric=DEFAULT_METRIC, reduction="mean", ce_weight=0.0, temperature=1.0,
               ignore_index=-100, weight=None, label_smoothing=0.0):
    """Prototype loss: ``d(z_b, P[y_b]) + ce_weight * CE_b``, ``CE`` the cross-entropy of ``logits / temperature``.

    Args:
        z: (B, D) float32, float16 or bfloat16 (float64 runs the reference) network outputs.
        prototypes: (C, D) class prototypes, on z's device (any float dtype).
        y: (B,) integer targets in [0, C) or equal to ``ignore_index``, on z's device. Any integer
            dtype (int64, int32, uint8, ...) is accepted; they are used as int64.
        metric: "linf" (``max_k |z_k - p_k|``; its gradient is the subgradient at the
            first arg-max coordinate), "l2" (``||z - p||``; zero gradient at z == p) or
            "cosine" (``1 - cos(z, p)``, ``F.cosine_similarity`` with eps 1e-8).
        reduction: "mean", "sum" or "none", as in torch. An empty batch (B = 0) gives
            NaN for "mean" (torch's mean of nothing), 0 for "sum" and an empty tensor for "none".
        ce_weight: weight of the cross-entropy term on the logits (see ``proto_logits``);
            0 is the paper's loss and runs the loss-only kernel that reads only P[y].
        temperature: > 0, divides the logits inside the cross-entropy.
        ignore_index: samples whose target equals it are dropped, as in ``nn.CrossEntropyLoss``:
            their loss is 0 under "none", and they are left out of "sum" and out of the count of
            "mean". A batch with every sample ignored gives NaN for "mean" and 0 for "sum", with
            zero gradients (what ``F.cross_entropy`` gives).
        weight: optional (C,) float class weights of the cross-entropy term, with the semantics of
            ``F.cross_entropy``'s ``weight``; the distance term is not weighted.
        label_smoothing: in [0, 1], the cross-entropy term's label smoothing (``F.cross_entropy``).

    Reductions: "none" gives ``d_b + ce_weight * CE_b`` per sample (0 for ignored ones), where
    ``CE_b`` is ``F.cross_entropy(..., reduction="none")``; "sum" their sum; "mean" the mean of
    ``d_b`` over the kept samples plus ``ce_weight`` times ``F.cross_entropy``'s own "mean" (with
    ``weight``, that divides by the sum of the kept samples' class weights, so it is not the mean
    of the "none" output, exactly as in torch). Without ``weight`` "mean" is the mean of the
    per-sample losses over the kept samples.

    Returns the loss in float32 (float64 for float64 inputs). Gradients flow to z and, when
    it requires grad, to ``prototypes``. CUDA tensors run the Triton kernels, CPU tensors the
    reference; ``DRP_BACKEND`` overrides this. On the kernel path the fused kernels (which never
    hold a (B, C) matrix) serve every call without ``weight`` and ``label_smoothing`` (ignored
    samples are masked around them); a cross-entropy term with ``weight`` or ``label_smoothing``
    instead applies ``F.cross_entropy`` to the (B, C) logits of ``proto_logits`` (and the loss-only
    kernel for the distances), which is exact but holds that (B, C) matrix, as
    ``nn.CrossEntropyLoss`` would.

    Targets are range-checked eagerly (one host sync on CUDA). The check is skipped under
    ``torch.compile``, during CUDA graph capture and when ``DRP_CHECK_TARGETS=0``; the kernels
    then give NaN for an out-of-range target instead of reading out of bounds.
    """
    _check_proto_options(metric=metric, reduction=reduction, ce_weight=ce_weight, temperature=temperature,
                         ignore_index=ignore_index, label_smoothing=label_smoothing)
    _check_proto_inputs(z, prototypes)
    num_classes = prototypes.shape[0]
    y = check_targets("y", y, batch=z.shape[0], device=z.device)
    weight = _check_weight(weight, num_classes, z.device)
    _check_target_range(y, num_classes, ignore_index)
    ce_weight, temperature, label_smoothing = float(ce_weight), float(temperature), float(label_smoothing)
    if not _use_kernels(z, prototypes):
        return reference.proto_loss(z, prototypes, y, metric=metric, reduction=reduction, ce_weight=ce_weight,
                                    temperature=temperature, ignore_index=ignore_index, weight=weight,
                                    label_smoothing=label_smoothing)
    keep = y != ignore_index
    y_safe = torch.where(keep, y, torch.zeros((), dtype=y.dtype, device=y.device))
    if ce_weight == 0.0 or (weight is None and label_smoothing == 0.0):
        per_sample = _proto_ops.proto_loss_op(z, prototypes, y_safe, metric, ce_weight, temperature)[0]
        return _reduce_kept(per_sample, keep, reduction)
    dist = _proto_ops.proto_loss_op(z, prototypes, y_safe, metric, 0.0, 1.0)[0]
    logits = proto_logits(z, prototypes, metric=metric) / temperature
    ce = F.cross_entropy(logits, y, weight=weight.to(logits.dtype) if weight is not None else None,
                         ignore_index=ignore_index, label_smoothing=label_smoothing, reduction=reduction)
    return _reduce_kept(dist, keep, reduction) + ce_weight * ce


def proto_logits(z, prototypes, *, metric=DEFAULT_METRIC):
    """(B, C) float32 scores, higher is closer: ``cos(z, P_c)`` for cosine, ``-d(z, P_c)`` for l2 / linf.

    linf and l2 run ``-lp_dist(z, prototypes, p=inf or 2)`` (C++ kernels on CPU tensors, Triton on
    CUDA; never B*C*D memory, forward or backward); cosine runs the tiled Triton kernel on CUDA and
    the reference on CPU. ``DRP_BACKEND`` overrides this. float64 inputs give float64.
    """
    _check_proto_options(metric=metric)
    _check_proto_inputs(z, prototypes)
    if metric in ("linf", "l2"):
        return -lp_dist(z, prototypes, p=float("inf") if metric == "linf" else 2.0)
    if not _use_kernels(z, prototypes):
        return reference.proto_logits(z, prototypes, metric=metric)
    return _proto_ops.proto_logits_op(z, prototypes, metric)


def paper_logits(z, prototypes, *, metric=DEFAULT_METRIC):
    """(B, C) scores of the paper's decision rule: ``normalise(z) @ prototypes.T``.

    The output is normalised by its L-inf norm for metric "linf" and by its L2 norm for "cosine"
    and "l2" (a zero row stays zero); the prototypes are used as they are. The arg-max is the
    class the authors predict. Computed in float32 (float64 for float64 inputs) with plain
    PyTorch ops on any device; differentiable w.r.t. z and the prototypes.
    """
    check_metric(metric)
    _check_proto_inputs(z, prototypes)
    cd = torch.float64 if torch.float64 in (z.dtype, prototypes.dtype) else torch.float32
    zf, pf = z.to(cd), prototypes.to(cd)
    if metric == "linf":
        norm = zf.abs().amax(dim=1, keepdim=True)
    else:
        norm = torch.linalg.vector_norm(zf, dim=1, keepdim=True)
    return (zf / norm.clamp_min(1e-12)) @ pf.T


def repulsion_energy(P, *, metric=DEFAULT_METRIC, kind="softmin", temperature=0.05):
    """All-pairs repulsion energy of the rows of P (C, D); differentiable w.r.t. P.

    d_ij: linf ``max_k |p_ik - p_jk|``, l2 ``||p_i - p_j||``, cosine ``1 - cos(p_i, p_j)``.
    kind="sum":     ``E = -sum_{i<j} d_ij`` (the paper's objective);
    kind="softmin": ``E = t * log sum_{i != j} exp(-d_ij / t)``, a smooth ``-min_{i != j} d_ij``.
    The default temperature 0.05 suits distances of order 1: cosine distances lie in [0, 2], and so
    do L-inf distances between points of the box [-1, 1]^D (the default metric is linf, as everywhere
    in the package).
    Minimising E pushes the prototypes apart. Returns a scalar (fp32, fp64 for fp64 input).

    Backend (``DRP_BACKEND``): the fused Triton kernels of ``drp_kernels.ops.repulsion`` (memory
    O(C*D)) or ``drp_kernels.reference`` (memory O(C*C*D)). fp64 inputs and C < 2 always use the
    reference; the kernels compute in fp32 for fp16/bf16/fp32 inputs.
    """
    check_matrix("P", P, min_cols=1)
    check_metric(metric)
    check_choice("kind", kind, REPULSION_KINDS)
    temperature = check_float("temperature", temperature, positive=(kind == "softmin"))
    if backend_for(P) == "reference" or P.dtype == torch.float64 or P.shape[0] < 2:
        return reference.repulsion_energy(P, metric=metric, kind=kind, temperature=temperature)
    return _repulsion_ops.repulsion_energy(P, metric=metric, kind=kind, temperature=temperature)
