"""drp_kernels: fast kernels, a thin training layer and an honest evaluation for
Deep Repulsive Prototypes (Serban, Poll, Visser, arXiv 2105.12427)."""
from . import reference
from ._constants import DEFAULT_METRIC, HEADS, METRICS
from .ops.pgd_step import pgd_step_, random_init
from .functional import lp_dist, proto_loss, proto_logits, paper_logits, repulsion_energy
from .modules import ProtoLoss, ProtoClassifier
from .layers import LpDist
from .certified import LinfDistNet, certify, is_certifiable
from .prototypes import (PROTOTYPE_METHODS, repulsive_prototypes, separation, save_prototypes,
                         load_prototypes)
from .io import atomic_write
from . import attacks

__version__ = "0.1.0"

__all__ = [
    "pgd_step_",
    "random_init",
    "proto_loss",
    "proto_logits",
    "paper_logits",
    "repulsion_energy",
    "lp_dist",
    "LpDist",
    "LinfDistNet",
    "certify",
    "is_certifiable",
    "HEADS",
    "ProtoLoss",
    "ProtoClassifier",
    "repulsive_prototypes",
    "separation",
    "save_prototypes",
    "load_prototypes",
    "PROTOTYPE_METHODS",
    "METRICS",
    "DEFAULT_METRIC",
    "atomic_write",
    "attacks",
    "reference",
]
