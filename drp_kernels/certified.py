"""Certified prototype networks: l-inf-distance layers with an L-inf prototype head, and ``certify``.

``LinfDistNet`` maps inputs in [0, 1] to logits ``-(||z - P_c||_p + b_c)``:

* the input is flattened and standardised, ``(x - mean) / std`` (per input coordinate);
* ``depth`` hidden ``LpDist`` layers of ``width`` neurons, each with mean shift;
* the head is the distance from the last hidden output z to the class prototypes P (C, width),
  plus a per-class offset b: fixed DRP prototypes (a buffer, b = 0) or learnable prototypes with
  a learnable offset.

At p = inf every layer is 1-Lipschitz in l-inf and the standardisation multiplies distances by at
most ``max(1 / std)``, so each head distance ``d_c(x)`` is L-Lipschitz with
``L = max(1 / std)`` (``lipschitz()``). A perturbation of l-inf size eps therefore moves every
logit by at most L * eps, and a margin ``min_{c != y} (d_c + b_c) - (d_y + b_y) > 2 L eps`` proves
that the prediction y cannot change (the margin rule). At finite p a layer of fan-in n is
``n^(1/p)``-Lipschitz in l-inf instead, and ``lipschitz()`` multiplies those factors in.

``certify(net, x, y, eps)`` combines that rule with interval bounds: the input box
``[max(x - eps, 0), min(x + eps, 1)]`` (the ball intersected with the image domain) is pushed
through each distance layer exactly coordinate-wise (the range of ``|h_k - w_k|`` over an interval)
and, at every layer, intersected with the Lipschitz ball around the clean activations. The radius
carried to the next layer is the largest deviation the intersected box allows, so every step is
sound and the result is never looser than either bound alone. A point is certified when the clean
prediction is y and the lower bound of every other class's margin is positive (with a small
floating-point allowance; the bounds are computed in float64).
"""
from __future__ import annotations

import copy
import math
from typing import Optional

import torch
from torch import nn

from ._constants import HEADS
from ._contexts import eval_mode
from ._validate import check_float, check_int, check_p, check_tensor
from .functional import lp_dist
from .layers import LpDist
from .reference import scaled_pnorm

__all__ = ["LinfDistNet", "certify", "is_certifiable", "HEADS"]

# certify() demands margins above this fraction of the clean distances' magnitude (plus the same
# absolute amount), so that float32 rounding in the attacked forward pass cannot flip a certified
# prediction: float64 bounds, float32 evaluation (relative error ~1e-6 through a few layers).
_REL_SLACK = 2e-5


class LinfDistNet(nn.Module):
    """A certifiable prototype network (see the module docstring).

    Args:
        in_features: the number of input coordinates (inputs of any shape (B, ...) are flattened).
        num_classes: C, the number of prototypes.
        depth: hidden ``LpDist`` layers (>= 1), each with ``width`` neurons and mean shift.
        width: neurons per hidden layer; also the prototype dimension.
        first_width: neurons of the first hidden layer if other than ``width`` (with
            ``first_width >= in_features`` the identity initialisation reaches the first layer too).
        head: ``"learnable"`` (prototypes and a per-class offset are trained) or ``"drp"``
            (fixed prototypes, no offset).
        prototypes: (C, width) initial (learnable) or fixed (drp) prototypes; zeros if None
            (set them before training, e.g. from ``repulsive_prototypes``).
        mean, std: standardisation of the inputs, a float or one value per input coordinate
            (``std > 0``); counted in ``lipschitz()``.
        p: the initial p of every distance layer (``set_p`` changes all of them).

    ``forward(x)`` returns (B, C) float32 logits ``-(d_c + b_c)``; the arg-max is the nearest
    prototype (offset included). ``ce_scale`` is a learnable temperature used only by the
    training loss's cross-entropy term; it does not change predictions or certificates.
    """

    def __init__(self, in_features: int, num_classes: int, *, depth: int, width: int, head: str = "learnable",
                 prototypes: Optional[torch.Tensor] = None, mean=0.0, std=1.0, p: float = 8.0,
                 first_width: Optional[int] = None):
        super().__init__()
        check_int("in_features", in_features, 1)
        check_int("num_classes", num_classes, 2)
        check_int("depth", depth, 1)
        check_int("width", width, 1)
        if first_width is not None:
            check_int("first_width", first_width, 1)
            if depth == 1 and first_width != width:
                raise ValueError(f"first_width ({first_width}) differs from width ({width}) with depth 1, where the "
                                 "first layer is the last one, whose width is the prototype dimension")
        first_width = width if first_width is None else first_width
        if head not in HEADS:
            raise ValueError(f"head must be one of {', '.join(HEADS)}, got {head!r}")
        mean_t = torch.as_tensor(mean, dtype=torch.float32).flatten()
        std_t = torch.as_tensor(std, dtype=torch.float32).flatten()
        for name, t in (("mean", mean_t), ("std", std_t)):
            if t.numel() not in (1, in_features):
                raise ValueError(f"{name} must be a float or hold {in_features} values, got {t.numel()}")
            if not torch.isfinite(t).all():
                raise ValueError(f"{name} must be finite")
        if (std_t <= 0).any():
            raise ValueError(f"std must be > 0, got min {float(std_t.min())}")
        self.in_features, self.num_classes, self.depth, self.width, self.head = (
            in_features, num_classes, depth, width, head)
        self.first_width = first_width
        self.register_buffer("mean", mean_t.expand(in_features).clone())
        self.register_buffer("std", std_t.expand(in_features).clone())
        layers, fan_in = [], in_features
        for i in range(depth):
            out = first_width if i == 0 else width
            # identity initialisation only where every input gets its own neuron (in <= out)
            ident = 10.0 if fan_in <= out else None
            layers.append(LpDist(fan_in, out, p=p, mean_shift=True, bias=False, identity_val=ident))
            fan_in = out
        self.layers = nn.ModuleList(layers)
        if prototypes is None:
            protos = torch.zeros(num_classes, width)
        else:
            protos = torch.as_tensor(prototypes, dtype=torch.float32)
            if protos.shape != (num_classes, width):
                raise ValueError(f"prototypes must have shape ({num_classes}, {width}), got {tuple(protos.shape)}")
            protos = protos.detach().clone()
        if head == "learnable":
            self.prototypes = nn.Parameter(protos)
            self.offset = nn.Parameter(torch.zeros(num_classes))
        else:
            self.register_buffer("prototypes", protos)
            self.register_buffer("offset", torch.zeros(num_classes))
        self.ce_scale = nn.Parameter(torch.tensor(1.0))
        self._head_p = check_p(p)

    # ------------------------------------------------------------------ p
    @property
    def p(self) -> float:
        """The p of the head (``set_p`` sets every layer's)."""
        return self._head_p

    @p.setter
    def p(self, value) -> None:
        self.set_p(value)

    def set_p(self, value) -> None:
        value = check_p(value)
        for layer in self.layers:
            layer.p = value
        self._head_p = value

    def set_input_subset(self, q) -> None:
        """Every hidden layer's ``LpDist.input_subset`` (a training setting; 1 = all inputs)."""
        for layer in self.layers:
            layer.input_subset = q

    def get_extra_state(self):
        return {"head_p": self._head_p}

    def set_extra_state(self, state):
        if not isinstance(state, dict) or "head_p" not in state:
            raise RuntimeError("LinfDistNet: the state holds no head p")
        self._head_p = check_p(state["head_p"])

    # ------------------------------------------------------------------ forward
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The last hidden layer's output z (B, width)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        h = x.reshape(x.shape[0], -1)
        if h.shape[1] != self.in_features:
            raise ValueError(f"x must hold {self.in_features} values per sample, got shape {tuple(x.shape)}")
        h = (h - self.mean.to(h.dtype)) / self.std.to(h.dtype)
        for layer in self.layers:
            h = layer(h)
        return h

    def distances(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C) ``d_c + b_c``: the head distances plus offsets (smaller is closer)."""
        z = self.features(x)
        return lp_dist(z, self.prototypes.to(z.dtype), p=self._head_p) + self.offset.to(z.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -self.distances(x)

    def lipschitz(self, p: Optional[float] = None) -> float:
        """An l-inf Lipschitz constant of every head distance d_c(x) (eval mode), at the layers'
        current p (or at ``p`` if given; ``p=math.inf`` gives ``max(1 / std)``)."""
        const = float((1.0 / self.std).max())
        fan_ins = [layer.in_features for layer in self.layers] + [self.width]
        ps = [layer.p for layer in self.layers] + [self._head_p]
        for n, q in zip(fan_ins, ps):
            q = q if p is None else check_p(p)
            if q != math.inf:
                const *= n ** (1.0 / q)
        return const

    def extra_repr(self):
        first = f", first_width={self.first_width}" if self.first_width != self.width else ""
        return (f"in_features={self.in_features}, num_classes={self.num_classes}, depth={self.depth}, "
                f"width={self.width}{first}, head={self.head!r}, p={self._head_p}")


# ----------------------------------------------------------------------------- certification
def _unwrap(classifier):
    inner = getattr(classifier, "_orig_mod", None)  # torch.compile's wrapper
    return inner if isinstance(inner, nn.Module) else classifier


def is_certifiable(classifier) -> bool:
    """Whether ``certify`` applies to ``classifier``: a ``LinfDistNet``, or ``torch.compile`` of one."""
    return isinstance(_unwrap(classifier), LinfDistNet)


def _interval_dist(lo, hi, w, p, chunk_elems=1 << 23):
    """Bounds of ``||h - w_n||_p`` over the box lo <= h <= hi: (lower, upper), each (B, N).

    Per coordinate, ``|h_k - w_k|`` ranges over [dist(w_k, [lo_k, hi_k]), max(|lo_k - w_k|, |hi_k - w_k|)]
    and the p-norm is monotone in each coordinate's magnitude. At p = inf the bounds are max-plus
    products, computed by ``lp_dist`` itself (``_linf_max_plus``); at finite p by explicit
    broadcast, ``chunk_elems`` elements at a time."""
    if p == math.inf:
        # upper_k = max(hi_k - w_k, w_k - lo_k); lower_k = max(lo_k - w_k, w_k - hi_k, 0)
        upper = torch.maximum(_linf_max_plus(hi, w), _linf_max_plus(-lo, -w))
        lower = torch.maximum(_linf_max_plus(lo, w), _linf_max_plus(-hi, -w)).clamp_min(0.0)
        return lower, upper
    b, d = lo.shape
    n = w.shape[0]
    out_lo = torch.empty(b, n, dtype=lo.dtype, device=lo.device)
    out_hi = torch.empty_like(out_lo)
    step = max(1, chunk_elems // max(1, n * d))
    for i in range(0, b, step):
        lo_c, hi_c = lo[i:i + step, None, :], hi[i:i + step, None, :]
        far = torch.maximum((lo_c - w).abs(), (hi_c - w).abs())
        near = (lo_c - w).clamp_min(0) + (w - hi_c).clamp_min(0)
        out_lo[i:i + step] = scaled_pnorm(near, p)
        out_hi[i:i + step] = scaled_pnorm(far, p)
    return out_lo, out_hi


def _linf_max_plus(a, w):
    """(B, N) ``max_k (a[b, k] - w[n, k])`` as ``lp_dist(a + t, w, p=inf) - t`` with t large enough
    that every difference is positive (float64: the shift costs ~1e-16 relative)."""
    if a.shape[1] == 0:
        return torch.full((a.shape[0], w.shape[0]), -math.inf, dtype=a.dtype, device=a.device)
    t = float((w.max() - a.min()).clamp_min(0.0)) + 1.0
    return lp_dist(a + t, w, p=math.inf) - t


@torch.no_grad()
def certify(classifier: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """(B,) bool: True where ``classifier`` predicts ``y`` at ``x`` and provably at every point of the
    l-inf ball of radius ``eps`` around x intersected with [0, 1] (see the module docstring).

    ``classifier`` must be a ``LinfDistNet`` (or ``torch.compile`` of one); it is evaluated in eval
    mode (running means) whatever its mode, and left in its own mode.
    """
    net = _unwrap(classifier)
    if not isinstance(net, LinfDistNet):
        raise TypeError(f"certify needs a drp_kernels.LinfDistNet (l-inf-distance layers with an L-inf prototype "
                        f"head, whose Lipschitz constant is known); a {type(net).__name__} has no certificate")
    check_tensor("x", x)
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point torch.Tensor, got {x.dtype}")
    if x.dim() < 2 or math.prod(x.shape[1:]) != net.in_features:
        raise ValueError(f"x must have shape (B, ...) with {net.in_features} values per sample, got {tuple(x.shape)}")
    check_tensor("y", y)
    if y.dtype.is_floating_point or y.dtype == torch.bool or y.is_complex():
        raise TypeError(f"y must be an integer torch.Tensor of class indices, got {y.dtype}")
    if y.shape != (x.shape[0],):
        raise ValueError(f"y must have shape ({x.shape[0]},) to match x, got {tuple(y.shape)}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= net.num_classes):
        raise ValueError(f"y must hold class indices in [0, {net.num_classes}), got values in "
                         f"[{int(y.min())}, {int(y.max())}]")
    eps = check_float("eps", eps, minimum=0.0)
    dev = net.std.device
    if x.device != dev or y.device != dev:
        raise ValueError(f"x and y must be on the classifier's device {dev}, got {x.device} and {y.device}")
    b = x.shape[0]
    if b == 0:
        return torch.zeros(0, dtype=torch.bool, device=dev)

    with eval_mode(net):
        pred = classifier(x).argmax(dim=1)  # the model as it will be attacked (its own dtype)
    net64 = copy.deepcopy(net).double().eval()

    x64 = x.reshape(b, -1).double()
    mean, std = net64.mean, net64.std
    c = (x64 - mean) / std
    lo = ((x64 - eps).clamp(0.0, 1.0) - mean) / std
    hi = ((x64 + eps).clamp(0.0, 1.0) - mean) / std
    # the deviation from the clean activations allowed by the box, per coordinate
    dev_vec = torch.maximum(hi - c, c - lo)
    for layer in net64.layers:
        p = layer.p
        w = layer.weight
        center = lp_dist(c, w, p=p)
        d_lo, d_hi = _interval_dist(lo, hi, w, p)
        radius = scaled_pnorm(dev_vec, p)[:, None]  # | ||h - w|| - ||c - w|| | <= ||h - c||_p
        d_lo = torch.maximum(d_lo, center - radius)
        d_hi = torch.minimum(d_hi, center + radius)
        shift = layer.running_mean if layer.mean_shift else torch.zeros_like(center[0])
        bias = layer.bias if layer.bias is not None else torch.zeros_like(center[0])
        c, lo, hi = center - shift + bias, d_lo - shift + bias, d_hi - shift + bias
        dev_vec = torch.maximum(hi - c, c - lo)
    p = net64.p
    protos, offset = net64.prototypes, net64.offset
    dist = lp_dist(c, protos, p=p) + offset
    d_lo, d_hi = _interval_dist(lo, hi, protos, p)
    d_lo, d_hi = d_lo + offset, d_hi + offset
    radius = scaled_pnorm(dev_vec, p)[:, None]
    rows = torch.arange(b, device=dev)
    yl = y.long()
    dist_y = dist[rows, yl][:, None]
    # lower bounds of each margin (d_c + b_c) - (d_y + b_y), c != y: the margin rule and the intervals
    margin_rule = dist - dist_y - 2.0 * radius
    interval = d_lo - d_hi[rows, yl][:, None]
    lower = torch.maximum(margin_rule, interval)
    slack = _REL_SLACK * (1.0 + dist.abs().amax(dim=1, keepdim=True))
    ok = lower > slack
    ok[rows, yl] = True
    return ok.all(dim=1) & (pred == yl) & torch.isfinite(dist).all(dim=1)
