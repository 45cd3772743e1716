"""The attack of the DRP paper (Serban, Poll, Visser 2021), as the authors ran it.

L-inf PGD that ascends the model's own training loss, the distance from the network's
output to the TRUE class prototype (``proto_loss(net(x), P, y, reduction="none")``:
``||z - P_y||_inf`` for linf, ``||z - P_y||_2`` for l2, ``1 - cos(z, P_y)`` for cosine),
with step eps/4, 20 iterations (the authors' variant: 100) and no random start. It never
looks at the runner-up class, so it measures robustness only along one direction; the
standard suite is the evaluation to trust (see PAPER.md).

Here a point whose prediction is already wrong at the current iterate stops moving (the
frozen iterate stays adversarial), so the reported accuracy is the authors' attack with an
early stop, never higher than it. The prediction is the model's own decision rule
(``ProtoClassifier.decision``: nearest prototype, or the paper's normalised dot product).
"""
from __future__ import annotations

import contextlib

import torch

from .. import functional as Fn
from ..modules import ProtoClassifier
from . import _common as C

__all__ = ["paper_pgd", "check_proto_classifier", "PAPER_STEP_FRACTION"]

PAPER_STEP_FRACTION = 0.25  # step = eps / 4


def check_proto_classifier(model, what: str = "the paper's attack") -> ProtoClassifier:
    """The model itself, or a TypeError when it is not a ProtoClassifier (the attack needs
    its network output and prototypes, not only its logits)."""
    inner = C.unwrap(model)  # the engine's StableRows and a torch.compile wrapper around a ProtoClassifier
    if not isinstance(inner, ProtoClassifier):
        raise TypeError(f"{what} ascends a prototype network's own distance loss, so model must be a "
                        f"drp_kernels.ProtoClassifier, got {type(inner).__name__}")
    return model


def _head(model, z):
    """The model's logits from its network output z, under its decision rule."""
    if model.decision == "paper":
        return Fn.paper_logits(z, model.prototypes, metric=model.metric)
    return Fn.proto_logits(z, model.prototypes, metric=model.metric)


def _logits_loss_grad(model, x_adv, y):
    """(logits, distance to P[y], d distance / d x_adv) from ONE forward and backward pass (the
    network padded to ``MIN_ROWS`` rows, and under a ``StableRows`` model's thread rule)."""
    threads = model.threads(x_adv) if isinstance(model, C.StableRows) else contextlib.nullcontext()
    with threads, torch.enable_grad():
        xr = x_adv.detach().requires_grad_(True)
        z = C.row_call(model.net, xr)
        dist = Fn.proto_loss(z, model.prototypes, y, metric=model.metric, reduction="none")
        (grad,) = torch.autograd.grad(dist.sum(), xr, allow_unused=True)
        with torch.no_grad():
            logits = _head(model, z.detach())
    if grad is None:
        grad = torch.zeros_like(x_adv)
    return logits, dist.detach(), grad


def _paper_pgd(model, x, y, *, eps, steps, x_start=None, progress=None):
    """The paper's PGD on validated inputs (model in eval mode). Returns (x_adv, fooled).

    x_start: the starting points (default x itself: no random start)."""
    x = x.detach()
    eps_b = C.step_budget(eps, x, round_down=True)
    alpha = eps * PAPER_STEP_FRACTION if isinstance(eps, torch.Tensor) else float(eps) * PAPER_STEP_FRACTION
    alpha_b = C.step_budget(alpha, x, round_down=False)
    x_adv = x.clone() if x_start is None else x_start.detach().clone()
    for _ in range(steps):
        logits, _, grad = _logits_loss_grad(model, x_adv, y)
        active = logits.argmax(dim=1) == y
        C.fused_step_(x_adv, x, grad, eps_b, alpha_b, "linf", active=active)
        if progress is not None:
            progress.update(1)
    with torch.no_grad():
        fooled = _head(model, C.row_call(model.net, x_adv)).argmax(dim=1) != y
    if progress is not None:
        progress.update(0, left=int((~fooled).sum()))
    return x_adv, fooled


def paper_pgd(model, x, y, *, eps, steps=20):
    """The DRP paper's own attack: L-inf PGD on the distance to the true prototype, step
    eps/4, ``steps`` iterations (the authors used 20 and 100), no random start.

    model: a ``drp_kernels.ProtoClassifier`` (TypeError otherwise); x: inputs (B, ...) in
    [0, 1]; y: int64 labels (B,); eps: a float or a length-B tensor. Returns the
    adversarial inputs (detached). Use it to reproduce the paper's numbers, not to measure
    robustness: ``evaluate(..., suite="standard")`` is the evaluation to trust.
    """
    y, eps, _ = C.validate_attack(model, x, y, eps=eps)
    check_proto_classifier(model)
    steps = C.check_positive_int(steps, name="steps")
    if x.shape[0] == 0:
        return x.detach().clone()
    with C.eval_mode(model):
        with torch.no_grad():
            C.check_logits(model(x[:1]), y, rows=1, what="paper_pgd")
        x_adv, _ = _paper_pgd(model, x, y, eps=eps, steps=steps)
    return x_adv
