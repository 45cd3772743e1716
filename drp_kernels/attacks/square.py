"""Square Attack (Andriushchenko, Croce, Flammarion, Hein, ECCV 2020), L-inf and L2.

A score-based black-box attack: a random search that proposes one localised change per
query and keeps it when the margin loss z_y - max_{i != y} z_i decreases. The window's area
fraction (the paper's p; ``window_fraction``) starts at p_init and is halved at iterations 10, 50,
200, 500, 1000, 2000, 4000, 6000, 8000 of a 10000-query run (rescaled to the budget).

L-inf: the search starts from vertical stripes (each column of each channel set to x +/- eps)
and proposes to overwrite a random s x s window (s = round(sqrt(p h w))) of every channel with
x +/- eps, one random sign per channel.

L2 (the paper's Algorithm 3): the perturbation delta = x_best - x is rescaled to the sphere
of radius eps (clipped to [0, 1]). It starts from a grid of 5 x 5 tiles, each holding the
pattern eta with a random sign per channel. eta is two pseudo-Gaussian bumps of opposite sign
side by side (a bump weighs a pixel on ring r around its centre by sum_{k >= r} 1/(k+1)^2),
transposed with probability 1/2. A proposal draws two s x s windows W1, W2 (s odd, >= 3); per
channel it gathers the mass of delta on W1 u W2 plus an equal share of the unused budget
eps^2 - ||delta||^2, empties W2 and writes into W1 the direction
sign * eta / ||eta|| + delta_W1 / ||delta_W1|| scaled to that mass; the new delta is rescaled to
norm eps and clipped.

Every random draw is keyed per point (``_keys.py``): point i's stripes or tiles come from
block 0 of the splitmix64 stream seeded with key_i and its draws at query t from block t
(``_keys.bits``), so its search, and whether it breaks, does not depend on the other points in
its batch. Only samples still classified
correctly are queried: a broken sample leaves the working batch at once (on an accelerator
within 10 queries, so that the loop waits on the device only once per 10 queries). The search
runs under ``torch.inference_mode``. On the CPU each query's draws and, for L-inf, proposal and
acceptance run as fused C++ ops (``drp_kernels.ops.square``: ``square_draws_cpu``,
``square_propose_cpu``, ``square_accept_cpu_``; L2 uses the draws and the acceptance), bit for bit
the PyTorch formulation used on other devices.
"""
from __future__ import annotations

import functools
import math
import warnings

import torch

from ..ops.square import fused_ops
from . import _common as C
from . import _keys as R

__all__ = ["square", "window_fraction", "l2_pattern", "l2_window"]

_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
_L2_TILES = 5  # the L2 start: a grid of 5 x 5 tiles


def window_fraction(p_init: float, it: int, queries: int) -> float:
    """The window's area fraction (the paper's p) at iteration ``it`` of a ``queries``-query run."""
    t = int(it / queries * 10000)
    halvings = sum(1 for h in _HALVINGS if t > h)
    return p_init / (2 ** halvings)


def p_schedule(p_init: float, it: int, queries: int) -> float:
    """Deprecated name of :func:`window_fraction` (kept so older code keeps working; the certified
    training's p schedule is ``drp_train.methods.p_schedule``)."""
    warnings.warn("drp_kernels.attacks.square.p_schedule is window_fraction", DeprecationWarning, stacklevel=2)
    return window_fraction(p_init, it, queries)


# ------------------------------------------------------------------------------ draws
def _draws(keys, counter, bounds, n_signs, dtype, ops):
    """Per point, integers uniform in [0, bounds[j]) (int64 (len(bounds), k)) and n_signs random
    signs ((k, n_signs) of dtype), keyed by (key, counter): the C++ op on the CPU, else the same
    bits from ``_keys``."""
    if ops is not None:
        return ops.draws(keys, counter, list(bounds), n_signs, dtype)
    nb = len(bounds)
    b = R.bits(keys, counter, nb + n_signs)
    if nb:
        ints = R.below(b[:, :nb], torch.tensor(bounds, dtype=torch.int64, device=keys.device)).t()
    else:
        ints = torch.empty((0, keys.shape[0]), dtype=torch.int64, device=keys.device)
    return ints, R.signs(b[:, nb:]).to(dtype)


# ---------------------------------------------------------------------------- L-inf
def _init_linf(x, ev, keys, ops):
    """Vertical stripes: every column of every channel at x + eps or x - eps."""
    k, c, _, w = x.shape
    _, sg = _draws(keys, 0, (), c * w, x.dtype, ops)
    return (x + ev * sg.view(k, c, 1, w).to(x.device)).clamp(0.0, 1.0)


def _window(vh, vw, s, h, w):
    """(k, 1, h, w) bool: each point's s x s window at (vh, vw)."""
    ar_h = torch.arange(h, device=vh.device)
    ar_w = torch.arange(w, device=vw.device)
    rows = (ar_h[None] >= vh[:, None]) & (ar_h[None] < vh[:, None] + s)
    cols = (ar_w[None] >= vw[:, None]) & (ar_w[None] < vw[:, None] + s)
    return (rows[:, :, None] & cols[:, None, :])[:, None]


def _propose_linf(xc, xb, ec, vh, vw, s, signs):
    """The PyTorch formulation of ``square_propose_cpu``."""
    _, _, h, w = xc.shape
    window = _window(vh, vw, s, h, w)
    signs = signs.view(-1, xc.shape[1], 1, 1)
    x_new = torch.where(window, (xc + ec * signs).clamp(0.0, 1.0), xb)
    # a proposal equal to the current point wastes the query: flip channel 0's sign there
    same = (x_new == xb).flatten(1).all(dim=1)
    if xc.device.type != "cpu" or bool(same.any()):
        signs = signs.clone()
        signs[:, 0] = torch.where(same[:, None, None], -signs[:, 0], signs[:, 0])
        x_new = torch.where(window, (xc + ec * signs).clamp(0.0, 1.0), xb)
    return x_new


# ------------------------------------------------------------------------------- L2
def _bump(a: int, b: int) -> torch.Tensor:
    """(a, b) float64: the pseudo-Gaussian bump. A pixel on the ring r = Chebyshev distance from
    the centre (a // 2, b // 2) weighs sum_{k=r}^{K} 1 / (k + 1)^2, K = max(a // 2, b // 2)."""
    r = torch.maximum((torch.arange(a)[:, None] - a // 2).abs(), (torch.arange(b)[None, :] - b // 2).abs())
    big = max(a // 2, b // 2)
    tail = torch.tensor([sum(1.0 / (j + 1) ** 2 for j in range(i, big + 1)) for i in range(big + 1)],
                        dtype=torch.float64)
    return tail[r]


@functools.lru_cache(maxsize=64)
def l2_pattern(s: int) -> torch.Tensor:
    """(s, s) float64 with unit L2 norm: the L2 Square Attack's eta, a bump on the top s // 2 rows
    and the negative of a bump on the other rows (a single bump when s < 2)."""
    if s < 2:
        eta = _bump(s, s)
    else:
        top = s // 2
        eta = torch.cat([_bump(top, s), -_bump(s - top, s)])
    return eta / eta.pow(2).sum().sqrt()


def l2_window(p: float, h: int, w: int) -> int:
    """The side of L2 Square's windows at area fraction p: round(sqrt(p h w)), at least 3, odd,
    at most min(h, w) - 1 (or the image side for images under 3 pixels)."""
    cap = max(min(h, w) - 1, 1)
    s = max(int(round(math.sqrt(p * h * w))), 3)
    if s % 2 == 0:
        s += 1
    s = min(s, cap)
    if s % 2 == 0 and s > 1:
        s -= 1
    return s


def _compute_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _to_sphere(x, delta, ev):
    """clamp(x + delta * eps / ||delta||, 0, 1), per point (in delta's dtype, cast to x's)."""
    n = delta.flatten(1).pow(2).sum(dim=1).sqrt().clamp_min(1e-12)
    scale = (ev.reshape(-1).to(delta.dtype) / n).view((-1,) + (1,) * (x.dim() - 1))
    return (x.to(delta.dtype) + delta * scale).clamp(0.0, 1.0).to(x.dtype)


def _init_l2(x, ev, keys, ops):
    """A grid of tiles, each holding eta (transposed for half of them) with a random sign per
    channel, rescaled to norm eps."""
    k, c, h, w = x.shape
    t = max(h // _L2_TILES, 1)
    nh, nw = max(h // t, 1), max(w // t, 1)
    tiles = nh * nw
    ints, sg = _draws(keys, 0, (2,) * tiles, tiles * c, _compute_dtype(x), ops)
    ints, sg = ints.to(x.device), sg.to(x.device).view(k, tiles, c)
    eta = l2_pattern(t).to(x.device, sg.dtype)
    delta = torch.zeros((k, c, h, w), dtype=sg.dtype, device=x.device)
    oh, ow = (h - nh * t) // 2, (w - nw * t) // 2
    for i in range(nh):
        for j in range(nw):
            n = i * nw + j
            patch = torch.where(ints[n].bool()[:, None, None], eta.T, eta)[:, None]  # (k, 1, t, t)
            delta[:, :, oh + i * t:oh + (i + 1) * t, ow + j * t:ow + (j + 1) * t] = patch * sg[:, n, :, None, None]
    return _to_sphere(x, delta, ev)


def _flat_window(vh, vw, s, w, c):
    """(k, c, s*s) int64: the flat (row * w + col) positions of each point's s x s window."""
    ar = torch.arange(s, device=vh.device)
    flat = (vh[:, None] + ar)[:, :, None] * w + (vw[:, None] + ar)[:, None, :]
    return flat.reshape(-1, 1, s * s).expand(-1, c, s * s)


def _propose_l2(xc, xb, ec, ints, signs, s):
    """One L2 proposal per point (see the module docstring); ints = (vh1, vw1, vh2, vw2, transpose)."""
    k, c, h, w = xc.shape
    cd = _compute_dtype(xc)
    d = (xb.to(cd) - xc.to(cd)).reshape(k, c, h * w)
    f1 = _flat_window(ints[0], ints[1], s, w, c)
    f2 = _flat_window(ints[2], ints[3], s, w, c)
    win1 = d.gather(2, f1)
    m1 = torch.zeros((k, h * w), dtype=cd, device=xc.device).scatter_(1, f1[:, 0], 1.0)
    m2 = torch.zeros((k, h * w), dtype=cd, device=xc.device).scatter_(1, f2[:, 0], 1.0)
    d2 = d * d
    unused = (ec.reshape(-1).to(cd).pow(2) - d2.sum(dim=(1, 2))).clamp_min(0.0)  # eps^2 - ||delta||^2
    mass = (unused[:, None] / c + (d2 * torch.maximum(m1, m2)[:, None]).sum(dim=2)).sqrt()  # (k, c)
    eta = l2_pattern(s).to(xc.device, cd)
    eta = torch.where(ints[4].bool()[:, None, None], eta.T, eta).reshape(k, 1, s * s)
    v = eta * signs.to(cd)[:, :, None] + win1 / (win1.pow(2).sum(dim=2, keepdim=True).sqrt() + 1e-10)
    v = v / v.pow(2).sum(dim=2, keepdim=True).sqrt().clamp_min(1e-12) * mass[:, :, None]
    new = (d * (1.0 - m2)[:, None]).scatter_(2, f1, v)
    return _to_sphere(xc, new.view(k, c, h, w), ec)


# ----------------------------------------------------------------------------- search
def _square(model, x, y, *, eps, queries, p_init, keys, norm="linf", clean_logits=None, progress=None, fused=None):
    """Square attack on validated NCHW inputs (model in eval mode). Returns (x_adv, fooled).

    keys: (B,) int64 CPU tensor, each point's key (``_keys``). Query-only, so it runs under
    ``torch.inference_mode``; the returned tensors are ordinary ones. progress: a
    StageProgress over ``queries`` iterations. fused: use the fused C++ per-query ops (default:
    on CPU tensors when the extension has them); False forces the PyTorch formulation (same
    results, bit for bit)."""
    ops = fused_ops() if (fused is None or fused) and x.device.type == "cpu" else None
    if fused and ops is None:
        raise RuntimeError("fused=True needs CPU tensors and drp_kernels.ops._C built with the Square ops")
    with torch.inference_mode():
        x_best, fooled = _square_search(model, x, y, eps=eps, queries=queries, p_init=p_init, keys=keys, norm=norm,
                                        clean_logits=clean_logits, progress=progress, ops=ops)
    return x_best.clone(), fooled.clone()


def _square_search(model, x, y, *, eps, queries, p_init, keys, norm, clean_logits, progress, ops=None):
    _, c, h, w = x.shape
    dev = x.device
    keys = keys.to("cpu" if ops is not None else dev)
    ev = C.budget_view(eps, x)
    if clean_logits is None:
        clean_logits = model(x)
    marg = C.margin(clean_logits, y)
    out = x.clone()
    # the start (query 1), for the correct samples only
    idx = (marg > 0).nonzero().squeeze(1)
    if idx.numel() > 0:
        init = _init_linf if norm == "linf" else _init_l2
        x_init = init(x[idx], ev[idx], keys[idx.to(keys.device)], ops)
        out[idx] = x_init
        marg[idx] = C.margin(model(x_init), y[idx])
    # the working set: only points still classified correctly, compacted when some break
    orig = (marg > 0).nonzero().squeeze(1)
    xc, xb, ec, yc, mc, kc = x[orig], out[orig], ev[orig], y[orig], marg[orig], keys[orig.to(keys.device)]
    if ops is not None:  # the fused ops want contiguous tensors and eps as a (k,) vector
        xc, xb, yc, mc = xc.contiguous(), xb.contiguous(), yc.contiguous(), mc.contiguous()
        ec = ec.reshape(-1).contiguous()
    side_max = max(min(h, w) - 1, 1)
    every = C.exit_every(dev)
    for it in range(1, queries):
        k = xc.shape[0]
        if k == 0:
            if progress is not None:
                progress.update(queries - it, left=0)
            break
        p = window_fraction(p_init, it, queries)
        if norm == "linf":
            s = min(max(int(round(math.sqrt(p * h * w))), 1), side_max)
            ints, signs = _draws(kc, it, (h - s + 1, w - s + 1), c, x.dtype, ops)
            if ops is not None:
                # the same arithmetic, fused (csrc/square.cpp)
                x_new = ops.propose(xc, xb, ec, ints[0], ints[1], s, signs)
            else:
                x_new = _propose_linf(xc, xb, ec, ints[0], ints[1], s, signs)
        else:
            s = l2_window(p, h, w)
            ints, signs = _draws(kc, it, (h - s + 1, w - s + 1) * 2 + (2,), c, x.dtype, ops)
            x_new = _propose_l2(xc, xb, ec, ints.to(dev), signs.to(dev), s)
        if ops is not None:
            n_broken = int(ops.accept_(xb, mc, x_new, model(x_new).contiguous(), yc))  # the number broken
        else:
            m_new = C.margin(model(x_new), yc)
            improved = m_new < mc
            xb = torch.where(improved.view(-1, 1, 1, 1), x_new, xb)
            mc = torch.where(improved, m_new, mc)
            n_broken = None  # known only after a look at the device
        if (it % every == 0 or it + 1 == queries) and n_broken != 0:
            broken = mc <= 0
            if n_broken is not None or bool(broken.any()):
                out[orig[broken]] = xb[broken]
                marg[orig[broken]] = mc[broken]
                keep = (~broken).nonzero().squeeze(1)
                orig, xc, xb, ec, yc, mc = orig[keep], xc[keep], xb[keep], ec[keep], yc[keep], mc[keep]
                kc = kc[keep.to(kc.device)]
        if progress is not None:
            progress.update(1, left=xc.shape[0])
    out[orig] = xb
    marg[orig] = mc
    return out, marg <= 0


def square(model, x, y, *, eps, queries=5000, p_init=0.8, seed=0, norm="linf", index=None):
    """Square Attack, L-inf or L2. x: NCHW in [0, 1]; eps: float or length-B tensor; queries: the
    per-sample query budget (>= 1, the start counts as one); p_init in (0, 1]; norm: "linf" or
    "l2"; seed: seeds the search (None: a seed drawn from torch's global RNG); index: (B,)
    int64, each sample's identity for its draws (default: its row), so a sample with the same
    index, seed and inputs gets the same result in any batch.

    Samples misclassified at x are returned as x; a sample leaves the search (and stops
    using queries) as soon as it is misclassified. A sample counts as misclassified when
    its margin z_y - max_{i != y} z_i is <= 0 (ties count as errors, like AutoAttack).
    Returns the adversarial inputs.
    """
    y, eps, norm = C.validate_attack(model, x, y, eps=eps, norm=norm, nchw=True)
    queries = C.check_positive_int(queries, name="queries")
    if isinstance(p_init, bool) or not isinstance(p_init, (int, float)) or not 0.0 < p_init <= 1.0:
        raise ValueError(f"p_init must be a float in (0, 1], got {p_init!r}")
    keys = R.point_keys(C.check_seed(seed), C.check_index(index, x), R.PUBLIC_IDS["square"])
    if x.shape[0] == 0:
        return x.detach().clone()
    with C.eval_mode(model):
        with torch.no_grad():
            logits = model(x.detach())
        C.check_logits(logits, y, min_classes=2, what="square")
        x_adv, _ = _square(model, x.detach(), y, eps=eps, queries=queries, p_init=float(p_init), keys=keys,
                           norm=norm, clean_logits=logits)
    return x_adv
