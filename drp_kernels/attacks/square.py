"""Square Attack, L-inf (Andriushchenko, Croce, Flammarion, Hein, ECCV 2020).

A score-based black-box attack: random search over perturbations at the vertices of the
L-inf ball. It starts from vertical stripes (each column of each channel set to x +/- eps)
and then, one query per iteration, proposes to overwrite a random s x s window of every
channel with a random +/- eps, keeping the proposal when the margin loss
z_y - max_{i != y} z_i decreases. The window's area fraction p starts at p_init and is
halved at iterations 10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000 of a 10000-query run
(rescaled to the budget). Only samples still classified correctly are queried.
"""
from __future__ import annotations

import math

import torch

from . import _common as C

__all__ = ["square", "p_schedule"]

_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def p_schedule(p_init: float, it: int, queries: int) -> float:
    """The window's area fraction at iteration ``it`` of a ``queries``-query run."""
    t = int(it / queries * 10000)
    halvings = sum(1 for h in _HALVINGS if t > h)
    return p_init / (2 ** halvings)


def _rand_sign(shape, generator, device):
    return torch.randint(0, 2, shape, generator=generator, device=device).mul_(2).sub_(1)


@torch.no_grad()
def _square(model, x, y, *, eps, queries, p_init, generator, clean_logits=None):
    """Square attack on validated NCHW inputs (model in eval mode). Returns (x_adv, fooled)."""
    n, c, h, w = x.shape
    dev = x.device
    ev = C.budget_view(eps, x)
    if clean_logits is None:
        clean_logits = model(x)
    marg = C.margin(clean_logits, y)
    x_best = x.clone()
    # the initial point: vertical stripes, queried for the correct samples only (query 1)
    idx = (marg > 0).nonzero().squeeze(1)
    if idx.numel() > 0:
        stripes = _rand_sign((idx.numel(), c, 1, w), generator, dev).to(x.dtype)
        x_init = (x[idx] + ev[idx] * stripes).clamp(0.0, 1.0)
        m_init = C.margin(model(x_init), y[idx])
        x_best[idx] = x_init
        marg[idx] = m_init
    ar_h = torch.arange(h, device=dev)
    ar_w = torch.arange(w, device=dev)
    side_max = max(min(h, w) - 1, 1)
    for it in range(1, queries):
        idx = (marg > 0).nonzero().squeeze(1)  # one host sync per query: the active set
        k = idx.numel()
        if k == 0:
            break
        xc, xb, ec = x[idx], x_best[idx], ev[idx]
        p = p_schedule(p_init, it, queries)
        s = min(max(int(round(math.sqrt(p * h * w))), 1), side_max)
        vh = torch.randint(0, h - s + 1, (k,), generator=generator, device=dev)
        vw = torch.randint(0, w - s + 1, (k,), generator=generator, device=dev)
        rows = (ar_h[None] >= vh[:, None]) & (ar_h[None] < vh[:, None] + s)
        cols = (ar_w[None] >= vw[:, None]) & (ar_w[None] < vw[:, None] + s)
        window = (rows[:, :, None] & cols[:, None, :])[:, None]  # (k, 1, h, w)
        signs = _rand_sign((k, c, 1, 1), generator, dev).to(x.dtype)
        x_new = torch.where(window, (xc + ec * signs).clamp(0.0, 1.0), xb)
        # a proposal equal to the current point wastes the query: flip channel 0's sign there
        same = (x_new == xb).flatten(1).all(dim=1)
        signs[:, 0] = torch.where(same[:, None, None], -signs[:, 0], signs[:, 0])
        x_new = torch.where(window, (xc + ec * signs).clamp(0.0, 1.0), xb)
        m_new = C.margin(model(x_new), y[idx])
        improved = m_new < marg[idx]
        x_best[idx] = torch.where(improved.view(-1, 1, 1, 1), x_new, xb)
        marg[idx] = torch.where(improved, m_new, marg[idx])
    return x_best, marg <= 0


def square(model, x, y, *, eps, queries=5000, p_init=0.8, seed=0):
    """L-inf Square Attack. x: NCHW in [0, 1]; eps: float or length-B tensor; queries: the
    per-sample query budget (>= 1, the stripe initialisation counts as one); p_init in (0, 1].

    Samples misclassified at x are returned as x; a sample leaves the search (and stops
    using queries) as soon as it is misclassified. A sample counts as misclassified when
    its margin z_y - max_{i != y} z_i is <= 0 (ties count as errors, like AutoAttack).
    Returns the adversarial inputs.
    """
    C.check_model(model)
    C.check_images(x, nchw=True)
    y = C.check_labels(y, x)
    eps = C.check_budget(eps, x)
    queries = C.check_positive_int(queries, name="queries")
    if isinstance(p_init, bool) or not isinstance(p_init, (int, float)) or not 0.0 < p_init <= 1.0:
        raise ValueError(f"p_init must be a float in (0, 1], got {p_init!r}")
    gen = C.make_generator(seed, x.device)
    if x.shape[0] == 0:
        return x.detach().clone()
    with C.eval_mode(model):
        with torch.no_grad():
            logits = model(x.detach())
        C.check_logits(logits, y, min_classes=2, what="square")
        x_adv, _ = _square(model, x.detach(), y, eps=eps, queries=queries, p_init=float(p_init),
                           generator=gen, clean_logits=logits)
    return x_adv
