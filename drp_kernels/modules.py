"""nn.Module wrappers: they hold options and call drp_kernels.functional. PROVISIONAL."""
import torch
from torch import nn

from . import functional as Fn

__all__ = ["ProtoLoss", "ProtoClassifier"]


class ProtoLoss(nn.Module):
    def __init__(self, prototypes, *, metric="linf", reduction="mean", ce_weight=0.0, temperature=1.0, learnable=False):
        super().__init__()
        p = torch.as_tensor(prototypes, dtype=torch.float32).detach().clone()
        if learnable:
            self.prototypes = nn.Parameter(p)
        else:
            self.register_buffer("prototypes", p)
        self.metric, self.reduction, self.ce_weight, self.temperature = metric, reduction, ce_weight, temperature

    def forward(self, z, y):
        return Fn.proto_loss(z, self.prototypes, y, metric=self.metric, reduction=self.reduction,
                             ce_weight=self.ce_weight, temperature=self.temperature)

    def logits(self, z):
        return Fn.proto_logits(z, self.prototypes, metric=self.metric)

    def predict(self, z):
        return self.logits(z).argmax(dim=1)


class ProtoClassifier(nn.Module):
    def __init__(self, net, prototypes, *, metric="linf"):
        super().__init__()
        self.net = net
        self.register_buffer("prototypes", torch.as_tensor(prototypes, dtype=torch.float32).detach().clone())
        self.metric = metric

    def forward(self, x):
        return Fn.proto_logits(self.net(x), self.prototypes, metric=self.metric)
