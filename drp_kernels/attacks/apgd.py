"""Auto-PGD (Croce & Hein, ICML 2020): APGD-CE, APGD-DLR and the targeted APGD-T.

The algorithm, per sample:
  x0 = random_init(x, eps); eta = 2 * eps; x1 = P(x0 + eta * s(grad f(x0)))
  z_{k+1} = P(x_k + eta * s(grad f(x_k)))
  x_{k+1} = P(x_k + 0.75 (z_{k+1} - x_k) + 0.25 (x_k - x_{k-1}))          (momentum 0.75)
with s = sign (linf) or grad / ||grad||_2 (l2) and P the projection on the eps ball
intersected with [0, 1]. At the checkpoints w_j = ceil(p_j N), p_0 = 0, p_1 = 0.22,
p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), eta is halved and the iterate reset to
the best point found so far when
  (1) the loss increased in fewer than 0.75 (w_j - w_{j-1}) of the steps since the last
      checkpoint, or
  (2) eta was not halved at the last checkpoint and the best loss has not improved since.
Both the step and the projection go through ``drp_kernels.pgd_step_`` (the projection
is a step with a zero gradient and step size 0).
"""
from __future__ import annotations

import torch

from ..ops.pgd_step import pgd_step_, random_init
from . import _common as C

__all__ = ["apgd", "checkpoints"]

MOMENTUM = 0.75
RHO = 0.75


def checkpoints(steps: int) -> list:
    """The iterations w_j (1 <= w_j < steps) after which APGD checks its step size.

    Uses integer hundredths so 0.22 * 100 is exactly 22 (no float round-up)."""
    out, p_prev, p = [], 0, 22
    while True:
        w = (p * steps + 99) // 100  # ceil(p / 100 * steps)
        if w >= steps:
            break
        if w >= 1 and (not out or w > out[-1]):
            out.append(w)
        p_prev, p = p, p + max(p - p_prev - 3, 6)
    return out


def _apgd_run(model, x, y, *, eps, steps, norm, loss_fn, generator):
    """One APGD run on validated inputs (model in eval mode). No host sync inside the loop.

    Returns (x_out, fooled): x_out is the first misclassified iterate where one was found,
    else the iterate of highest loss."""
    n = x.shape[0]
    bview = (-1,) + (1,) * (x.dim() - 1)
    eps_vec = C.budget_vector(eps, n, x.device)
    x_adv = random_init(x, eps, norm=norm, generator=generator)
    logits, loss, grad = C.input_grad(model, x_adv, y, loss_fn)
    fooled = logits.argmax(dim=1) != y
    x_found = torch.where(fooled.view(bview), x_adv, x)
    x_best, grad_best, loss_best = x_adv.clone(), grad.clone(), loss.clone()
    step = 2.0 * eps_vec
    x_prev = x_adv.clone()
    buf = torch.empty_like(x_adv)
    zero = torch.zeros_like(x_adv)
    loss_prev = loss
    increases = torch.zeros(n, device=x.device)
    reduced_last = torch.zeros(n, dtype=torch.bool, device=x.device)
    loss_best_last = loss_best.clone()
    marks, last_mark = set(checkpoints(steps)), 0
    for i in range(steps):
        buf.copy_(x_adv)
        pgd_step_(buf, x, grad, eps, step, norm=norm)  # z = P(x_k + eta s(grad))
        if i > 0:
            # x_k + a (z - x_k) + (1 - a)(x_k - x_{k-1}) = a z + 2 (1 - a) x_k - (1 - a) x_{k-1}
            buf.mul_(MOMENTUM).add_(x_adv, alpha=2.0 * (1.0 - MOMENTUM)).add_(x_prev, alpha=-(1.0 - MOMENTUM))
            pgd_step_(buf, x, zero, eps, 0.0, norm=norm)  # projection only
        x_prev, x_adv, buf = x_adv, buf, x_prev
        logits, loss, grad = C.input_grad(model, x_adv, y, loss_fn)
        newly = (logits.argmax(dim=1) != y) & ~fooled
        torch.where(newly.view(bview), x_adv, x_found, out=x_found)
        fooled |= newly
        increases += (loss > loss_prev).float()
        loss_prev = loss
        better = loss > loss_best
        torch.where(better.view(bview), x_adv, x_best, out=x_best)
        torch.where(better.view(bview), grad, grad_best, out=grad_best)
        loss_best = torch.where(better, loss, loss_best)
        if i + 1 in marks:
            k = i + 1 - last_mark
            reduce = (increases < RHO * k) | (~reduced_last & (loss_best <= loss_best_last))
            step = torch.where(reduce, 0.5 * step, step)
            rv = reduce.view(bview)
            torch.where(rv, x_best, x_adv, out=x_adv)
            torch.where(rv, grad_best, grad, out=grad)
            loss_prev = torch.where(reduce, loss_best, loss_prev)
            reduced_last = reduce
            loss_best_last = loss_best.clone()
            increases.zero_()
            last_mark = i + 1
    x_out = torch.where(fooled.view(bview), x_found, x_best)
    return x_out, fooled


def _targets(logits: torch.Tensor, rank: int) -> torch.Tensor:
    """The class with the rank-th largest logit (rank 1 = the top class)."""
    return logits.topk(rank, dim=1).indices[:, rank - 1]


def _apgd(model, x, y, *, eps, steps, norm, loss, restarts, n_target_classes, generator, clean_logits=None):
    """APGD on validated inputs (model in eval mode). Returns (x_adv, fooled).

    Only samples classified correctly are attacked; every restart (and every target of
    dlr-t) runs only on the samples not yet fooled."""
    x = x.detach()
    if clean_logits is None:
        with torch.no_grad():
            clean_logits = model(x)
    fooled = clean_logits.argmax(dim=1) != y
    out = x.clone()
    if loss == "dlr-t":
        runs = [(rank, r) for rank in range(2, n_target_classes + 2) for r in range(restarts)]
    else:
        runs = [(None, r) for r in range(restarts)]
    base_loss = C.resolve_loss(loss, allowed=C.LOSSES)
    for rank, _ in runs:
        idx = (~fooled).nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        xs, ys = x[idx], y[idx]
        if rank is None:
            loss_fn = base_loss
        else:
            tgt = _targets(clean_logits[idx], rank)
            loss_fn = (lambda t: (lambda z, yy: C.dlr_targeted_loss(z, yy, t)))(tgt)
        x_run, f_run = _apgd_run(model, xs, ys, eps=C.subset_budget(eps, idx), steps=steps, norm=norm,
                                 loss_fn=loss_fn, generator=generator)
        out[idx] = x_run
        fooled[idx] = f_run
    return out, fooled


def apgd(model, x, y, *, eps, steps=100, norm="linf", loss="ce", restarts=1, n_target_classes=9, seed=0):
    """Auto-PGD (Croce & Hein 2020), untargeted (loss "ce" or "dlr") or targeted ("dlr-t").

    Args:
        model: maps inputs in [0, 1] to logits (B, C).
        x: inputs (B, ...) in [0, 1]; y: int64 labels (B,).
        eps: budget, a float or a length-B tensor.
        steps: iterations per run (N; >= 1).
        norm: "linf" or "l2".
        loss: "ce"; "dlr" (needs C >= 3); "dlr-t", the targeted DLR run once per target
            among the n_target_classes runner-up classes of the clean logits (needs C >= 4
            and n_target_classes <= C - 1).
        restarts: random restarts (per target for dlr-t), each on the samples still unbroken.
        seed: seeds the random starts (None: the global RNG).

    Returns adversarial inputs: the first misclassified iterate found per sample, else the
    highest-loss point of the last run; samples misclassified at x are returned as x.
    """
    C.check_model(model)
    C.check_images(x)
    y = C.check_labels(y, x)
    eps = C.check_budget(eps, x)
    steps = C.check_positive_int(steps, name="steps")
    restarts = C.check_positive_int(restarts, name="restarts")
    n_target_classes = C.check_positive_int(n_target_classes, name="n_target_classes")
    norm = C.check_norm(norm)
    if not isinstance(loss, str) or loss not in C.LOSSES:
        raise ValueError(f"loss must be one of {C.LOSSES}, got {loss!r}")
    gen = C.make_generator(seed, x.device)
    if x.shape[0] == 0:
        return x.detach().clone()
    with C.eval_mode(model):
        with torch.no_grad():
            logits = model(x.detach())
        c = C.check_logits(logits, y, min_classes=C.min_classes(loss), what=f"loss={loss!r}")
        if loss == "dlr-t" and n_target_classes > c - 1:
            raise ValueError(f"n_target_classes must be <= C - 1 = {c - 1} for this model, got {n_target_classes}")
        x_adv, _ = _apgd(model, x, y, eps=eps, steps=steps, norm=norm, loss=loss, restarts=restarts,
                         n_target_classes=n_target_classes, generator=gen, clean_logits=logits)
    return x_adv
