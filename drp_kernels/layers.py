"""Layers built on the drp_kernels ops."""
from __future__ import annotations

import math
from numbers import Real
from typing import Optional

import torch
from torch import nn

from ._validate import check_float, check_p
from .functional import lp_dist


__all__ = ["LpDist", "SUBSET_GROUPS"]

SUBSET_GROUPS = 16  # neuron groups, each with its own random input subset (input_subset < 1)


class LpDist(nn.Module):
    """A layer of lp-distance neurons: ``y[b, n] = ||x[b] - W[n]||_p`` (then mean shift and bias).

    ``y = lp_dist(x, W, p=p)``; with ``mean_shift`` the batch mean of y over the batch is
    subtracted in training and a running mean (updated like BatchNorm's, momentum 0.1) in eval,
    i.e. BatchNorm without the scaling; with ``bias`` a learnable per-neuron offset is added last.

    Initialisation (the identity initialisation of the l-inf-distance nets, Zhang et al. 2021):
    W ~ N(0, 1), then neuron n's weight on input coordinate ``n mod in_features`` is set to
    ``-identity_val`` (10 by default, the value of the published models). For inputs well inside
    (-identity_val, identity_val) that coordinate dominates the distance, so at p = inf the neuron
    starts out as ``x[n mod in_features] + identity_val`` (and the mean shift removes the offset).
    ``identity_val=None`` keeps plain N(0, 1) weights. (The published code applies the offset only
    when in_features <= out_features; with fewer neurons than inputs each neuron copies one of a
    few inputs, which may be a poor start, e.g. background pixels.)

    ``p`` is a mutable attribute (validated on assignment) so training can anneal it, e.g. from 8
    to inf.

    Input subsets (SortNet-style, Zhang et al. 2022): with ``input_subset = q < 1`` and the layer in
    training mode, the neurons are split into ``min(N, SUBSET_GROUPS)`` contiguous groups, and each
    group sees a random subset of ``round(q * D)`` input coordinates (at least 1), drawn from
    torch's global generator at every call and shared by the whole batch: the distance runs over
    those coordinates only, and the other weights get no gradient. With the identity
    initialisation a group always keeps its neurons' identity coordinates (``n mod D``; more than
    ``round(q * D)`` columns where the group has more of them) and draws the rest. (SortNet draws
    a subset per sample; one per group and call keeps each group a single dense ``lp_dist`` call
    on gathered columns.) In eval mode, and with ``input_subset = 1`` (the default), every input
    counts. ``input_subset`` is a training setting: it is not saved with the weights.

    Lipschitz property: at p = inf every output coordinate ``||x - W[n]||_inf`` is 1-Lipschitz in
    x with respect to the l-inf norm, so ``||f(x) - f(x')||_inf <= ||x - x'||_inf``. Subtracting
    the running mean (eval mode) and adding the bias are constant shifts, so LpDist in eval mode
    at p = inf is 1-Lipschitz w.r.t. l-inf with or without mean shift and bias, and a stack of
    such layers is too. (In training mode the batch mean couples the samples of a batch.)

    Args:
        in_features: D, the size of each input row.
        out_features: N, the number of neurons.
        p: float in [1, inf], default 8.
        mean_shift: subtract the batch / running mean of the outputs.
        bias: add a learnable (N,) offset after the distance (and the mean shift).
        identity_val: the identity-initialisation offset (> 0), or None.
        momentum: running-mean momentum, as in BatchNorm.
    """

    def __init__(self, in_features: int, out_features: int, *, p: float = 8.0, mean_shift: bool = True,
                 bias: bool = False, identity_val: Optional[float] = 10.0, momentum: float = 0.1,
                 device=None, dtype=None):
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{name} must be an int, got {type(v).__name__}")
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if identity_val is not None:
            if isinstance(identity_val, bool) or not isinstance(identity_val, Real):
                raise TypeError(f"identity_val must be a float or None, got {type(identity_val).__name__}")
            if not (math.isfinite(identity_val) and identity_val > 0):
                raise ValueError(f"identity_val must be a finite float > 0 or None, got {identity_val!r}")
        if isinstance(momentum, bool) or not isinstance(momentum, Real):
            raise TypeError(f"momentum must be a float, got {type(momentum).__name__}")
        if not 0.0 <= float(momentum) <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum!r}")
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.p = p
        self.input_subset = 1.0
        self.mean_shift = bool(mean_shift)
        self.identity_val = None if identity_val is None else float(identity_val)
        self.momentum = float(momentum)
        self.weight = nn.Parameter(torch.empty((out_features, in_features), **factory))
        self.bias = nn.Parameter(torch.zeros(out_features, **factory)) if bias else None
        if self.mean_shift:
            self.register_buffer("running_mean", torch.zeros(out_features, **factory))
        else:
            self.register_buffer("running_mean", None)
        self.reset_parameters()

    @property
    def p(self) -> float:
        return self._p

    @p.setter
    def p(self, value) -> None:
        self._p = check_p(value)

    @property
    def input_subset(self) -> float:
        return self._input_subset

    @input_subset.setter
    def input_subset(self, value) -> None:
        self._input_subset = check_float("input_subset", value, positive=True, maximum=1.0)

    def get_extra_state(self):
        # p is saved with the weights, so a checkpoint of an annealed (p = inf) layer reloads as one
        return {"p": self._p}

    def set_extra_state(self, state):
        if not isinstance(state, dict) or "p" not in state:
            raise RuntimeError("LpDist: the state holds no p")
        self.p = state["p"]

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.normal_(0.0, 1.0)
            if self.identity_val is not None:
                rows = torch.arange(self.out_features, device=self.weight.device)
                self.weight[rows, rows % self.in_features] = -self.identity_val
            if self.bias is not None:
                self.bias.zero_()
            if self.running_mean is not None:
                self.running_mean.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"x must have shape (B, {self.in_features}), got {tuple(x.shape)}")
        if self.training and self._input_subset < 1.0:
            y = self._subset_dist(x)
        else:
            y = lp_dist(x, self.weight, p=self._p)
        if self.mean_shift:
            if self.training:
                if y.shape[0] == 0:
                    raise ValueError("x must hold at least one row in training mode (the batch mean)")
                mean = y.mean(dim=0)
                with torch.no_grad():
                    self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), self.momentum)
                y = y - mean
            else:
                y = y - self.running_mean.to(y.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def _subset_dist(self, x: torch.Tensor) -> torch.Tensor:
        """``lp_dist`` with each neuron group over its own random subset of the inputs."""
        n, d = self.out_features, self.in_features
        k = max(1, int(round(self._input_subset * d)))
        groups = min(n, SUBSET_GROUPS)
        bounds = [(g * n) // groups for g in range(groups + 1)]
        outs = []
        for g in range(groups):
            cols = torch.randperm(d, device=x.device)[:k]  # drawn on both paths: the committed ablation's stream
            if self.identity_val is not None:
                # a group keeps its neurons' identity coordinates (n mod D): dropping the one that
                # dominates a neuron would swap its signal for another, not thin it
                keep = (torch.arange(bounds[g], bounds[g + 1], device=x.device) % d).unique()
                rest = torch.ones(d, dtype=torch.bool, device=x.device)
                rest[keep] = False
                pool = rest.nonzero().squeeze(1)
                extra = max(0, k - keep.numel())
                cols = torch.cat([keep, pool[torch.randperm(pool.numel(), device=x.device)[:extra]]])
            cols = cols.sort().values
            w = self.weight[bounds[g]:bounds[g + 1]].index_select(1, cols)
            outs.append(lp_dist(x.index_select(1, cols), w, p=self._p))
        return torch.cat(outs, dim=1)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, p={self._p}, "
                f"mean_shift={self.mean_shift}, bias={self.bias is not None}, identity_val={self.identity_val}")
