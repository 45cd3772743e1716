"""Functional API of drp_kernels (keyword-only options).

PROVISIONAL: the ProtoLoss section and the repulsion section call the reference
until their Triton dispatch lands.
"""
from . import reference

__all__ = ["proto_loss", "proto_logits", "repulsion_energy"]


# ======================================================== ProtoLoss section (issue 3)
def proto_loss(z, prototypes, y, *, metric="linf", reduction="mean", ce_weight=0.0, temperature=1.0):
    return reference.proto_loss(z, prototypes, y, metric=metric, reduction=reduction,
                                ce_weight=ce_weight, temperature=temperature)


def proto_logits(z, prototypes, *, metric="linf"):
    return reference.proto_logits(z, prototypes, metric=metric)
# ==================================================== end ProtoLoss section (issue 3)


# ======================================================== repulsion section (issue 4)
def repulsion_energy(P, *, metric="cosine", kind="softmin", temperature=0.05):
    return reference.repulsion_energy(P, metric=metric, kind=kind, temperature=temperature)
# ==================================================== end repulsion section (issue 4)
