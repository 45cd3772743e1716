"""FGSM and PGD built on the fused ``drp_kernels.pgd_step_`` and ``random_init``."""
from __future__ import annotations

from typing import Optional

import torch

from ..ops.pgd_step import pgd_step_, random_init
from . import _common as C

__all__ = ["fgsm", "pgd"]


def fgsm(model, x, y, *, eps, norm="linf"):
    """Fast Gradient (Sign) Method: one step of size eps on the cross-entropy.

    linf: x + eps * sign(grad); l2: x + eps * grad / ||grad||; clipped to [0, 1].
    eps: a float or a length-B tensor. Returns the adversarial inputs (detached).
    """
    y, eps, norm = C.validate_attack(model, x, y, eps=eps, norm=norm)
    if x.shape[0] == 0:
        return x.detach().clone()
    with C.eval_mode(model):
        x = x.detach()
        logits, _, grad = C.input_grad(model, x, y, C.ce_loss)
        C.check_logits(logits, y)
        x_adv = x.clone()
        pgd_step_(x_adv, x, grad, eps, eps, norm=norm)
    return x_adv


def _pgd_run(model, x, y, *, eps, alpha, steps, norm, loss_fn, x_start, score=True):
    """One PGD run from ``x_start`` (updated in place); samples misclassified at the current
    iterate are frozen. Returns (x_adv, fooled, final_loss), the last two None unless
    ``score`` (one more forward pass). The budgets are validated once, before the loop, so
    the loop never waits on the device."""
    x_adv = x_start
    eps_b = C.step_budget(eps, x, round_down=True)
    alpha_b = C.step_budget(alpha, x, round_down=False)
    for _ in range(steps):
        logits, _, grad = C.input_grad(model, x_adv, y, loss_fn)
        active = logits.argmax(dim=1) == y
        C.fused_step_(x_adv, x, grad, eps_b, alpha_b, norm, active=active)
    if not score:
        return x_adv, None, None
    with torch.no_grad():
        out = model(x_adv)
        fooled = out.argmax(dim=1) != y
        final = loss_fn(out, y).detach().float()
    return x_adv, fooled, final


def _pgd(model, x, y, *, eps, alpha, steps, norm, loss_fn, restarts, random_start, generator):
    """PGD on validated inputs, the model already in eval mode. Returns (x_adv, fooled or None)."""
    x = x.detach()
    best = x.clone()
    best_fooled = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    best_loss = torch.full((x.shape[0],), float("-inf"), device=x.device)
    idx = torch.arange(x.shape[0], device=x.device)
    for r in range(restarts):
        if r > 0:
            idx = (~best_fooled).nonzero().squeeze(1)  # later restarts only on the unbroken samples
            if idx.numel() == 0:
                break
        if r == 0:
            xs, ys, es, als = x, y, eps, alpha
        else:
            xs, ys = x[idx], y[idx]
            es, als = C.subset_budget(eps, idx), C.subset_budget(alpha, idx)
        start = random_init(xs, es, norm=norm, generator=generator) if random_start else xs.clone()
        x_adv, fooled, final = _pgd_run(model, xs, ys, eps=es, alpha=als, steps=steps, norm=norm,
                                        loss_fn=loss_fn, x_start=start, score=restarts > 1)
        if restarts == 1:  # nothing to compare with: no bookkeeping forward pass
            return x_adv, None
        # worst case per sample: a fooling point beats any other; otherwise the higher loss wins
        better = fooled | (~best_fooled[idx] & (final > best_loss[idx]))
        view = better.view((-1,) + (1,) * (x.dim() - 1))
        best[idx] = torch.where(view, x_adv, best[idx])
        best_loss[idx] = torch.where(better, final, best_loss[idx])
        best_fooled[idx] |= fooled
    return best, best_fooled


def pgd(model, x, y, *, eps, alpha, steps, norm="linf", loss="ce", restarts=1, random_start=True,
        seed: Optional[int] = None):
    """Projected gradient ascent (Madry et al. 2018) with the fused ``pgd_step_``.

    Args:
        model: maps inputs in [0, 1] to logits (B, C).
        x: inputs (B, ...) in [0, 1]; y: int64 labels (B,).
        eps, alpha: budget and step size, floats or length-B tensors (per sample).
        steps: gradient steps per restart (>= 1).
        norm: "linf" or "l2".
        loss: "ce", "dlr" (needs C >= 3) or a callable ``(outputs, y) -> per-sample loss``
            to ascend (e.g. a DRP model's own prototype distance).
        restarts: independent runs; the later ones only on samples not yet fooled.
        random_start: start from ``random_init`` (uniform in the ball) instead of x.
        seed: seeds the random starts (None: the global RNG).

    Samples already misclassified at the current iterate are frozen through the step's
    ``active`` mask (misclassification is judged by the argmax of the outputs).
    Per sample the worst case over restarts is kept: a misclassified point if any run
    found one, else the point of highest final loss. Returns the adversarial inputs.
    """
    y, eps, norm = C.validate_attack(model, x, y, eps=eps, norm=norm)
    alpha = C.check_budget(alpha, x, name="alpha")
    steps = C.check_positive_int(steps, name="steps")
    restarts = C.check_positive_int(restarts, name="restarts")
    loss_fn = C.resolve_loss(loss)
    gen = C.make_generator(seed, x.device)
    if x.shape[0] == 0:
        return x.detach().clone()
    with C.eval_mode(model):
        with torch.no_grad():
            C.check_logits(model(x[:1]), y, rows=1, min_classes=C.min_classes(loss), what=f"loss={loss!r}")
        best, _ = _pgd(model, x, y, eps=eps, alpha=alpha, steps=steps, norm=norm, loss_fn=loss_fn,
                       restarts=restarts, random_start=bool(random_start), generator=gen)
    return best
