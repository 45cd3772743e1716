"""nn.Module wrappers: they hold options and call drp_kernels.functional."""
import torch
from torch import nn

from . import functional as Fn

__all__ = ["ProtoLoss", "ProtoClassifier"]


def _as_prototypes(prototypes) -> torch.Tensor:
    p = torch.as_tensor(prototypes)
    if not p.is_floating_point():
        p = p.to(torch.float32)
    if p.dim() != 2:
        raise ValueError(f"prototypes must be 2-D (C, D), got shape {tuple(p.shape)}")
    if p.shape[0] < 1:
        raise ValueError("prototypes must have at least one row (C >= 1)")
    return p.detach().clone()


class ProtoLoss(nn.Module):
    """Loss pulling network outputs z towards their class prototype (see ``drp_kernels.proto_loss``).

    ``loss = crit(z, y)``; ``crit.logits(z)`` gives (B, C) scores (higher is closer) and
    ``crit.predict(z)`` their arg-max. The prototypes are a buffer (copied; float input
    dtypes are kept, others become float32), or an ``nn.Parameter`` that receives
    gradients when ``learnable=True``.
    """

    def __init__(self, prototypes, *, metric="linf", reduction="mean", ce_weight=0.0, temperature=1.0,
                 learnable=False):
        super().__init__()
        Fn._check_proto_options(metric=metric, reduction=reduction, ce_weight=ce_weight, temperature=temperature)
        p = _as_prototypes(prototypes)
        if learnable:
            self.prototypes = nn.Parameter(p)
        else:
            self.register_buffer("prototypes", p)
        self.metric = metric
        self.reduction = reduction
        self.ce_weight = float(ce_weight)
        self.temperature = float(temperature)
        self.learnable = bool(learnable)

    def forward(self, z, y):
        return Fn.proto_loss(z, self.prototypes, y, metric=self.metric, reduction=self.reduction,
                             ce_weight=self.ce_weight, temperature=self.temperature)

    def logits(self, z):
        return Fn.proto_logits(z, self.prototypes, metric=self.metric)

    def predict(self, z):
        return self.logits(z).argmax(dim=1)

    def extra_repr(self):
        c, d = self.prototypes.shape
        return (f"num_classes={c}, dim={d}, metric={self.metric!r}, reduction={self.reduction!r}, "
                f"ce_weight={self.ce_weight}, temperature={self.temperature}, learnable={self.learnable}")


class ProtoClassifier(nn.Module):
    """``forward(x) = proto_logits(net(x), prototypes)``: a prototype network as a plain logits model,
    so attacks (AutoAttack, torchattacks, drp_kernels.attacks) run on it unchanged."""

    def __init__(self, net, prototypes, *, metric="linf"):
        super().__init__()
        Fn._check_proto_options(metric=metric)
        self.net = net
        self.register_buffer("prototypes", _as_prototypes(prototypes))
        self.metric = metric

    def forward(self, x):
        return Fn.proto_logits(self.net(x), self.prototypes, metric=self.metric)

    def extra_repr(self):
        c, d = self.prototypes.shape
        return f"num_classes={c}, dim={d}, metric={self.metric!r}"
