"""Facts shared by the whole package: metric names, kernel ids and numeric constants.

Every module that names a metric, maps a metric to a Triton ``tl.constexpr`` id or needs
one of these numbers imports it from here, so the kernels and the Python layer can never
disagree.
"""
import math

import torch

__all__ = [
    "METRICS",
    "DEFAULT_METRIC",
    "METRIC_ID",
    "NORMS",
    "FLOAT_DTYPES",
    "HEADS",
    "REDUCTIONS",
    "REPULSION_KINDS",
    "KIND_ID",
    "COSINE_EPS",
    "LOG2E",
]

#: Distances between a network output (or a prototype) and a prototype.
METRICS = ("linf", "cosine", "l2")

#: The one default metric of the public API, the CLI and the training layer.
DEFAULT_METRIC = "linf"

#: The compile-time id each Triton kernel receives for a metric (one map for all kernels).
METRIC_ID = {"linf": 0, "l2": 1, "cosine": 2}

#: Threat-model norms of the PGD step and the attacks.
NORMS = ("linf", "l2")

#: The floating-point dtypes every op accepts.
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

#: Prototype heads of ``LinfDistNet``: learnable prototypes with offsets, or fixed DRP prototypes.
HEADS = ("learnable", "drp")

#: Loss reductions, as in torch.
REDUCTIONS = ("mean", "sum", "none")

#: Repulsion energies: the paper's sum of distances, or a smooth minimum.
REPULSION_KINDS = ("sum", "softmin")
KIND_ID = {"sum": 0, "softmin": 1}

#: The eps of ``F.cosine_similarity`` that every cosine distance uses.
COSINE_EPS = 1e-8

#: log2(e): exp(x) == exp2(x * LOG2E) inside the kernels.
LOG2E = 1.4426950408889634
assert abs(LOG2E - 1.0 / math.log(2.0)) < 1e-15
