"""Square Attack's fused per-query CPU ops: their ``register_fake`` and the handle the attack uses.

``csrc/square.cpp`` registers three ops under ``torch.ops.drp`` (schemas and semantics in its header):

* ``square_propose_cpu(x, x_best, eps, vh, vw, s, signs) -> x_new``: one L-inf proposal per point;
* ``square_accept_cpu_(x_best!, margin_best!, x_new, logits, y) -> broken``: the margin test, in
  place, returning how many points are broken (a 0-d int64 tensor);
* ``square_draws_cpu(keys, counter, bounds, n_signs, dtype) -> (ints, signs)``: the keyed draws of
  one query.

They are bit for bit the PyTorch formulation in ``drp_kernels/attacks/square.py`` (which runs on
other devices). This module registers their fake (meta) implementations, so ``torch.compile`` and
``torch.library.opcheck`` trace through them like every other op, and ``fused_ops()`` gives the
attack the three ops, or None when the extension (or a build with these ops) is not loaded.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from . import _extension

__all__ = ["SquareOps", "fused_ops"]


class SquareOps(NamedTuple):
    """The fused ops of one query: proposal, acceptance and draws."""

    propose: object
    accept_: object
    draws: object


def fused_ops() -> Optional[SquareOps]:
    """The three fused ops, or None when the extension (or a build with these ops) is not loaded."""
    if not _extension.available():
        return None
    try:
        return SquareOps(torch.ops.drp.square_propose_cpu, torch.ops.drp.square_accept_cpu_,
                         torch.ops.drp.square_draws_cpu)
    except (AttributeError, RuntimeError):  # an older build without the Square ops
        return None


if fused_ops() is not None:

    @torch.library.register_fake("drp::square_propose_cpu")
    def _propose_fake(x, x_best, eps, vh, vw, s, signs):
        torch._check(x.shape == x_best.shape, lambda: "x and x_best must share a shape")
        return torch.empty_like(x_best, memory_format=torch.contiguous_format)

    @torch.library.register_fake("drp::square_accept_cpu_")
    def _accept_fake(x_best, margin_best, x_new, logits, y):
        torch._check(x_best.shape == x_new.shape, lambda: "x_best and x_new must share a shape")
        return x_best.new_empty((), dtype=torch.int64)

    @torch.library.register_fake("drp::square_draws_cpu")
    def _draws_fake(keys, counter, bounds, n_signs, dtype):
        k = keys.shape[0]
        ints = keys.new_empty((len(bounds), k), dtype=torch.int64)
        return ints, keys.new_empty((k, n_signs), dtype=dtype)
