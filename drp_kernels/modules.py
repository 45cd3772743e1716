"""nn.Module wrappers: they hold options and call drp_kernels.functional."""
from typing import Optional

import numpy as np
import torch
from torch import nn

from . import functional as Fn
from ._constants import DEFAULT_METRIC
from ._validate import check_choice, check_metric

__all__ = ["ProtoLoss", "ProtoClassifier", "DECISIONS"]

#: Decision rules of ``ProtoClassifier``.
DECISIONS = ("nearest", "paper")


def _as_prototypes(prototypes) -> torch.Tensor:
    if not isinstance(prototypes, (torch.Tensor, np.ndarray, list, tuple)):
        raise TypeError(f"prototypes must be a torch.Tensor (or a ProtoLoss for ProtoClassifier), "
                        f"got {type(prototypes).__name__}")
    p = torch.as_tensor(prototypes)
    if not p.is_floating_point():
        p = p.to(torch.float32)
    if p.dim() != 2:
        raise ValueError(f"prototypes must be 2-D (C, D), got shape {tuple(p.shape)}")
    if p.shape[0] < 1:
        raise ValueError("prototypes must have at least one row (C >= 1)")
    return p.detach().clone()


def _as_weight(weight, num_classes: int) -> Optional[torch.Tensor]:
    if weight is None:
        return None
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor of {num_classes} class weights or None, "
                        f"got {type(weight).__name__}")
    if not weight.is_floating_point() or weight.shape != (num_classes,):
        raise ValueError(f"weight must be a floating-point tensor of shape ({num_classes},), one entry per "
                         f"prototype, got dtype {weight.dtype} and shape {tuple(weight.shape)}")
    return weight.detach().clone()


class ProtoLoss(nn.Module):
    """Loss pulling network outputs z towards their class prototype (see ``drp_kernels.proto_loss``).

    ``loss = crit(z, y)``; ``crit.logits(z)`` gives (B, C) scores (higher is closer) and
    ``crit.predict(z)`` their arg-max. The prototypes are a buffer (copied; float input
    dtypes are kept, others become float32), or an ``nn.Parameter`` that receives
    gradients when ``learnable=True``. ``ignore_index``, ``weight`` (a buffer) and
    ``label_smoothing`` behave as in ``nn.CrossEntropyLoss``: ``ignore_index`` drops samples
    from the whole loss, ``weight`` and ``label_smoothing`` act on the cross-entropy term only
    (which exists when ``ce_weight != 0``).
    """

    def __init__(self, prototypes, *, metric=DEFAULT_METRIC, reduction="mean", ce_weight=0.0, temperature=1.0,
                 learnable=False, ignore_index=-100, weight=None, label_smoothing=0.0):
        super().__init__()
        Fn._check_proto_options(metric=metric, reduction=reduction, ce_weight=ce_weight, temperature=temperature,
                                ignore_index=ignore_index, label_smoothing=label_smoothing)
        p = _as_prototypes(prototypes)
        if learnable:
            self.prototypes = nn.Parameter(p)
        else:
            self.register_buffer("prototypes", p)
        self.register_buffer("weight", _as_weight(weight, p.shape[0]))
        self.metric = metric
        self.reduction = reduction
        self.ce_weight = float(ce_weight)
        self.temperature = float(temperature)
        self.learnable = bool(learnable)
        self.ignore_index = int(ignore_index)
        self.label_smoothing = float(label_smoothing)

    def forward(self, z, y):
        """The loss of outputs ``z`` (B, D) for targets ``y`` (B,), reduced by ``self.reduction``.

        ``y`` holds class indices in [0, C) or ``ignore_index``, in any integer dtype (int64,
        int32, uint8, ...). Returns float32 (float64 for float64 z); see ``drp_kernels.proto_loss``.
        """
        return Fn.proto_loss(z, self.prototypes, y, metric=self.metric, reduction=self.reduction,
                             ce_weight=self.ce_weight, temperature=self.temperature,
                             ignore_index=self.ignore_index, weight=self.weight,
                             label_smoothing=self.label_smoothing)

    def logits(self, z):
        """(B, C) float32 scores of outputs ``z``, higher is closer: ``-d(z, P_c)`` for linf and l2,
        ``cos(z, P_c)`` for cosine (``drp_kernels.proto_logits``). Differentiable."""
        return Fn.proto_logits(z, self.prototypes, metric=self.metric)

    def predict(self, z):
        """(B,) int64 index of the nearest prototype in ``self.metric`` (the arg-max of ``logits``)."""
        return self.logits(z).argmax(dim=1)

    def extra_repr(self):
        c, d = self.prototypes.shape
        out = (f"num_classes={c}, dim={d}, metric={self.metric!r}, reduction={self.reduction!r}, "
               f"ce_weight={self.ce_weight}, temperature={self.temperature}, learnable={self.learnable}")
        if self.ignore_index != -100:
            out += f", ignore_index={self.ignore_index}"
        if self.weight is not None:
            out += ", weight=(C,)"
        if self.label_smoothing:
            out += f", label_smoothing={self.label_smoothing}"
        return out


class ProtoClassifier(nn.Module):
    """A prototype network as a plain logits model, so attacks (AutoAttack, torchattacks,
    drp_kernels.attacks) run on it unchanged.

    ``ProtoClassifier(net, proto_loss)`` takes the ``ProtoLoss`` used in training and shares
    its prototypes and metric: it holds the loss as the submodule ``proto_loss`` and reads
    ``proto_loss.prototypes`` at every call, so learnable prototypes never go stale (they also
    appear in ``parameters()``). ``ProtoClassifier(net, prototypes, metric=...)`` holds its own
    copy of a (C, D) tensor as the buffer ``prototypes``. Either way ``clf.prototypes`` and
    ``clf.metric`` give the current ones.

    ``decision`` picks what ``forward`` returns and so which class wins the arg-max:

    * ``"nearest"`` (default): ``proto_logits(net(x), prototypes, metric=metric)``, the scores of
      the training metric (``-d(z, P_c)``, or ``cos(z, P_c)`` for cosine); its arg-max is the
      nearest prototype.
    * ``"paper"``: the authors' rule, ``paper_logits(net(x), prototypes, metric=metric)``: the
      output normalised (L-inf norm for linf, L2 norm for cosine and l2) dotted with each
      prototype; its arg-max is the paper's prediction. These logits are differentiable, so
      attacks can target this rule too.
    """

    def __init__(self, net, prototypes, *, metric=None, decision="nearest"):
        super().__init__()
        check_choice("decision", decision, DECISIONS)
        if not callable(net):
            raise TypeError(f"net must be an nn.Module (or a callable), got {type(net).__name__}")
        self.net = net
        if isinstance(prototypes, ProtoLoss):
            if metric is not None and check_metric(metric) != prototypes.metric:
                raise ValueError(f"metric={metric!r} disagrees with the ProtoLoss's metric {prototypes.metric!r}; "
                                 "leave metric unset to share the loss's")
            self.proto_loss = prototypes
        else:
            metric = check_metric(DEFAULT_METRIC if metric is None else metric)
            self.register_buffer("prototypes", _as_prototypes(prototypes))
            self.metric = metric
        self.decision = decision

    def __getattr__(self, name):
        # prototypes and metric of a shared ProtoLoss are read from it, never copied
        if name in ("prototypes", "metric"):
            loss = self.__dict__["_modules"].get("proto_loss")
            if loss is not None:
                return getattr(loss, name)
        return super().__getattr__(name)

    def _prototypes_and_metric(self):
        loss = self._modules.get("proto_loss")
        if loss is not None:
            return loss.prototypes, loss.metric
        return self._buffers["prototypes"], self.__dict__["metric"]

    def forward(self, x):
        """(B, C) float32 logits of inputs ``x`` under ``self.decision`` (see the class docstring)."""
        prototypes, metric = self._prototypes_and_metric()
        z = self.net(x)
        if self.decision == "paper":
            return Fn.paper_logits(z, prototypes, metric=metric)
        return Fn.proto_logits(z, prototypes, metric=metric)

    def predict(self, x):
        """(B,) int64 predicted classes: the arg-max of ``forward(x)``."""
        return self.forward(x).argmax(dim=1)

    def extra_repr(self):
        prototypes, metric = self._prototypes_and_metric()
        c, d = prototypes.shape
        shared = ", shared with proto_loss" if "proto_loss" in self._modules else ""
        return f"num_classes={c}, dim={d}, metric={metric!r}, decision={self.decision!r}{shared}"
