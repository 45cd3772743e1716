"""drp_kernels: fast kernels, a thin training layer and an honest evaluation for
Deep Repulsive Prototypes (Serban, Poll, Visser, arXiv 2105.12427)."""
from . import reference
from .ops.pgd_step import pgd_step_, random_init
from .functional import proto_loss, proto_logits, paper_logits, repulsion_energy
from .modules import ProtoLoss, ProtoClassifier
from .ops.lp_dist import lp_dist
from .layers import LpDist
from .certified import LinfDistNet, certify
from .prototypes import repulsive_prototypes, separation, save_prototypes, load_prototypes
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
    "ProtoLoss",
    "ProtoClassifier",
    "repulsive_prototypes",
    "separation",
    "save_prototypes",
    "load_prototypes",
    "attacks",
    "reference",
]
