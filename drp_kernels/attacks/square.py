"""Square Attack, L-inf (Andriushchenko, Croce, Flammarion, Hein, ECCV 2020).

A score-based black-box attack: random search over perturbations at the vertices of the
L-inf ball. It starts from vertical stripes (each column of each channel set to x +/- eps)
and then, one query per iteration, proposes to overwrite a random s x s window of every
channel with a random +/- eps, keeping the proposal when the margin loss
z_y - max_{i != y} z_i decreases. The window's area fraction p starts at p_init and is
halved at iterations 10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000 of a 10000-query run
(rescaled to the budget). Only samples still classified correctly are queried: a broken
sample leaves the working batch at once (on an accelerator within 10 queries, so that the
loop waits on the device only once per 10 queries). The search runs under
``torch.inference_mode``. On the CPU each query's proposal and acceptance run as two fused
C++ ops of ``drp_kernels._C`` (``square_propose_cpu``, ``square_accept_cpu_``), bit for bit the
PyTorch formulation used on other devices, but one pass over the working batch each instead of
a dozen small kernels (about 0.1-1 ms per query saved at 7-145 points of 28x28).
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


def _fused_ops():
    """(propose, accept) of drp_kernels._C, or None when the extension (or a build with these
    ops) is not loaded."""
    try:
        from ..ops import pgd_step as _ops  # loads drp_kernels._C, which registers torch.ops.drp.*

        if _ops._C is None:
            return None
        return torch.ops.drp.square_propose_cpu, torch.ops.drp.square_accept_cpu_
    except (AttributeError, RuntimeError):
        return None


def _exit_every(device) -> int:
    """How often broken points leave the working batch: every query on the CPU, every 10 on
    an accelerator (the check is a host sync)."""
    return 1 if device.type == "cpu" else 10


def _square(model, x, y, *, eps, queries, p_init, generator, clean_logits=None, progress=None, fused=None):
    """Square attack on validated NCHW inputs (model in eval mode). Returns (x_adv, fooled).

    Query-only, so it runs under ``torch.inference_mode``; the returned tensors are
    ordinary ones. progress: a StageProgress over ``queries`` iterations. fused: use the
    fused C++ per-query ops (default: on CPU tensors when drp_kernels._C has them); False
    forces the PyTorch formulation (same results, bit for bit)."""
    ops = _fused_ops() if (fused is None or fused) and x.device.type == "cpu" else None
    if fused and ops is None:
        raise RuntimeError("fused=True needs CPU tensors and drp_kernels._C built with the Square ops")
    with torch.inference_mode():
        x_best, fooled = _square_search(model, x, y, eps=eps, queries=queries, p_init=p_init,
                                        generator=generator, clean_logits=clean_logits, progress=progress, ops=ops)
    return x_best.clone(), fooled.clone()


def _square_search(model, x, y, *, eps, queries, p_init, generator, clean_logits, progress, ops=None):
    _, c, h, w = x.shape
    dev = x.device
    ev = C.budget_view(eps, x)
    if clean_logits is None:
        clean_logits = model(x)
    marg = C.margin(clean_logits, y)
    out = x.clone()
    # the initial point: vertical stripes, queried for the correct samples only (query 1)
    idx = (marg > 0).nonzero().squeeze(1)
    if idx.numel() > 0:
        stripes = _rand_sign((idx.numel(), c, 1, w), generator, dev).to(x.dtype)
        x_init = (x[idx] + ev[idx] * stripes).clamp(0.0, 1.0)
        out[idx] = x_init
        marg[idx] = C.margin(model(x_init), y[idx])
    # the working set: only points still classified correctly, compacted when some break
    orig = (marg > 0).nonzero().squeeze(1)
    xc, xb, ec, yc, mc = x[orig], out[orig], ev[orig], y[orig], marg[orig]
    if ops is not None:  # the fused ops want contiguous tensors and eps as a (k,) vector
        xc, xb, yc, mc = xc.contiguous(), xb.contiguous(), yc.contiguous(), mc.contiguous()
        ec = ec.reshape(-1).contiguous()
    ar_h = torch.arange(h, device=dev)
    ar_w = torch.arange(w, device=dev)
    side_max = max(min(h, w) - 1, 1)
    every = _exit_every(dev)
    for it in range(1, queries):
        k = xc.shape[0]
        if k == 0:
            if progress is not None:
                progress.update(queries - it, left=0)
            break
        p = p_schedule(p_init, it, queries)
        s = min(max(int(round(math.sqrt(p * h * w))), 1), side_max)
        vh = torch.randint(0, h - s + 1, (k,), generator=generator, device=dev)
        vw = torch.randint(0, w - s + 1, (k,), generator=generator, device=dev)
        signs = _rand_sign((k, c, 1, 1), generator, dev).to(x.dtype)
        if ops is not None:
            # the same draws and the same arithmetic, fused (csrc/square.cpp); returns the number broken
            x_new = ops[0](xc, xb, ec, vh, vw, s, signs.view(k, c))
            n_broken = ops[1](xb, mc, x_new, model(x_new).contiguous(), yc)
        else:
            rows = (ar_h[None] >= vh[:, None]) & (ar_h[None] < vh[:, None] + s)
            cols = (ar_w[None] >= vw[:, None]) & (ar_w[None] < vw[:, None] + s)
            window = (rows[:, :, None] & cols[:, None, :])[:, None]  # (k, 1, h, w)
            x_new = torch.where(window, (xc + ec * signs).clamp(0.0, 1.0), xb)
            # a proposal equal to the current point wastes the query: flip channel 0's sign there
            same = (x_new == xb).flatten(1).all(dim=1)
            if dev.type != "cpu" or bool(same.any()):
                signs[:, 0] = torch.where(same[:, None, None], -signs[:, 0], signs[:, 0])
                x_new = torch.where(window, (xc + ec * signs).clamp(0.0, 1.0), xb)
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
        if progress is not None:
            progress.update(1, left=xc.shape[0])
    out[orig] = xb
    marg[orig] = mc
    return out, marg <= 0


def square(model, x, y, *, eps, queries=5000, p_init=0.8, seed=0):
    """L-inf Square Attack. x: NCHW in [0, 1]; eps: float or length-B tensor; queries: the
    per-sample query budget (>= 1, the stripe initialisation counts as one); p_init in (0, 1].

    Samples misclassified at x are returned as x; a sample leaves the search (and stops
    using queries) as soon as it is misclassified. A sample counts as misclassified when
    its margin z_y - max_{i != y} z_i is <= 0 (ties count as errors, like AutoAttack).
    Returns the adversarial inputs.
    """
    y, eps, _ = C.validate_attack(model, x, y, eps=eps, nchw=True)
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
