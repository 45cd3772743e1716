"""Sanity checks of an evaluation (Carlini et al. 2019; AutoAttack's own checks).

Each check returns flag strings; ``evaluate`` and ``accuracy_vs_eps`` put them in their
report and issue each one as a ``RobustnessWarning``. What every flag means, and what to
do about it, is in FLAGS.md next to this file. Every flag starts with its name:

  probabilities, random, zero gradients                     (the model, once per run)
  single-step beats iterative, black-box beats white-box,
  more iterations recover accuracy                          (each eps)
  not at chance at large eps                                (once per run)
"""
from __future__ import annotations

import math
import warnings

import torch

from . import _common as C
from . import _keys as R
from .apgd import _apgd
from .fgsm_pgd import fgsm
from .paper import _paper_pgd
from .square import _square

__all__ = [
    "FLAG_NAMES",
    "model_checks",
    "eps_checks",
    "chance_check",
    "in_ball",
    "warn",
]

FLAG_NAMES = (
    "probabilities",
    "random",
    "zero gradients",
    "single-step beats iterative",
    "black-box beats white-box",
    "more iterations recover accuracy",
    "not at chance at large eps",
)

PROBE_STEPS = 20  # APGD iterations of the large-eps probe
QUICK_SQUARE_QUERIES = 300  # Square's queries in the black-box check of suites without Square
ITERATION_FACTOR = 4  # the "more iterations" check reruns the first attack with this many times the steps
CHANCE_MARGIN = 0.05  # accuracy above chance + this at the large eps is flagged


def _keys(seed, index, purpose, *parts):
    """Each checked point's key for one check's draws (its own purpose id, apart from the suite's)."""
    return R.point_keys(seed, index, R.STAGE_IDS[purpose], *parts)


def in_ball(x_adv, x, eps, norm):
    """Per sample: x_adv within [0, 1] and the eps ball (the l2 check allows float rounding)."""
    ev = C.budget_view(eps, x)
    inside = ((x_adv >= 0) & (x_adv <= 1)).flatten(1).all(dim=1)
    if norm == "linf":
        return inside & ((x_adv <= x + ev) & (x_adv >= x - ev)).flatten(1).all(dim=1)
    dn = (x_adv - x).flatten(1).float().norm(dim=1)
    return inside & (dn <= ev.flatten().float() * (1 + 1e-5) + 1e-6)


def _fooled(model, x_adv, x, y, eps, norm):
    with torch.no_grad():
        return (model(x_adv).argmax(dim=1) != y) & in_ball(x_adv, x, eps, norm)


def model_checks(model, xs, ys):
    """probabilities / random between calls / zero gradients, on the check subset."""
    flags = []
    with torch.no_grad():
        a = model(xs)
        b = model(xs)
    af = a.float()
    if bool((af >= 0).all()) and bool(((af.sum(dim=1) - 1).abs() <= 1e-3).all()):
        flags.append("probabilities: the model's outputs are non-negative and sum to 1 per row; attacks "
                     "expect logits (remove the softmax, or the losses saturate and mask gradients)")
    if not torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5):
        flags.append("random: two clean forward passes in eval mode gave different outputs (max diff "
                     f"{float((a.float() - b.float()).abs().max()):.3g}); a randomized model needs EOT attacks")
    _, _, grad = C.input_grad(model, xs, ys, C.margin)
    zero = int((grad.flatten(1).abs().amax(dim=1) == 0).sum())
    if zero > 0:
        flags.append(f"zero gradients: the input gradient of the logit margin is exactly zero for {zero} of "
                     f"{xs.shape[0]} checked points (masked or obfuscated gradients)")
    return flags


def _first_attack(model, xs, ys, *, eps, norm, cfg, steps, keys, clean_logits):
    """The suite's first attack at ``steps`` iterations; returns the per-sample fooled mask."""
    if "paper_steps" in cfg:
        x_a, _ = _paper_pgd(model, xs, ys, eps=eps, steps=steps)
    else:
        x_a, _ = _apgd(model, xs, ys, eps=eps, steps=steps, norm=norm, loss="ce", restarts=1, n_target_classes=1,
                       keys=keys, clean_logits=clean_logits)
    return _fooled(model, x_a, xs, ys, eps, norm)


def eps_checks(model, xs, ys, robust_s, *, eps, suite, cfg, norm, seed, square_broken, has_square, index=None,
               eps_key=0):
    """Per-eps checks on the subset (xs, ys); robust_s is the suite's per-sample result there.

    square_broken: the number of points the suite's own Square stage broke (when it has one).
    index: the checked points' indices in the dataset (default: their rows), which key their
    random draws together with ``seed`` and ``eps_key``."""
    index = C.check_index(index, xs)
    flags = []
    # single-step vs iterative
    x_f = fgsm(model, xs, ys, eps=eps, norm=norm)
    beaten = int((_fooled(model, x_f, xs, ys, eps, norm) & robust_s).sum())
    if beaten > 0:
        flags.append(f"single-step beats iterative: FGSM fooled {beaten} points that the {suite} suite left "
                     "robust (the iterative attacks are failing)")
    # black-box vs white-box
    if has_square:
        bb = square_broken
    elif xs.dim() == 4 and bool(robust_s.any()):
        idx = robust_s.nonzero().squeeze(1)
        keys = _keys(seed, index[idx.cpu()], "check-quick-square", eps_key)
        es = C.subset_budget(eps, idx)
        x_sq, _ = _square(model, xs[idx], ys[idx], eps=es, queries=QUICK_SQUARE_QUERIES, p_init=0.8, keys=keys,
                          norm=norm)
        bb = int(_fooled(model, x_sq, xs[idx], ys[idx], es, norm).sum())
    else:
        bb = 0
    if bb > 0:
        flags.append(f"black-box beats white-box: Square found adversarial points for {bb} samples that the "
                     "white-box attacks missed (gradient masking?)")
    # more iterations must not recover accuracy
    with torch.no_grad():
        logits = model(xs)
    correct = logits.argmax(1) == ys
    steps = cfg["paper_steps"] if "paper_steps" in cfg else cfg["ce_steps"]
    accs = []
    for k, s in enumerate((steps, ITERATION_FACTOR * steps)):
        fooled = _first_attack(model, xs, ys, eps=eps, norm=norm, cfg=cfg, steps=s, clean_logits=logits,
                               keys=_keys(seed, index, "check-more-iterations", eps_key, k))
        accs.append(int((~fooled & correct).sum()))
    if accs[1] - accs[0] > max(2, 0.05 * xs.shape[0]):
        flags.append(f"more iterations recover accuracy: the first attack of the {suite} suite with "
                     f"{ITERATION_FACTOR * steps} iterations leaves {accs[1]} of {xs.shape[0]} points robust, "
                     f"with {steps} only {accs[0]}")
    return flags


def _large_eps(norm, x):
    """A budget at which every input can reach the uniform 0.5 image."""
    return 0.5 if norm == "linf" else 0.5 * math.sqrt(x[0].numel())


def _chance(ys, n_classes):
    freq = torch.bincount(ys, minlength=n_classes).float() / max(1, ys.numel())
    return max(float(freq.max()), 1.0 / n_classes)


def _large_eps_probe(model, xs, ys, norm, seed, index):
    """Robust accuracy of the check subset at the large budget (APGD-CE then APGD-DLR/CE)."""
    e = _large_eps(norm, xs)
    with torch.no_grad():
        logits = model(xs)
    n_classes = logits.shape[1]
    rb = logits.argmax(dim=1) == ys
    for k, loss in enumerate(("ce", "dlr" if n_classes >= 3 else "ce")):
        idx = rb.nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        keys = _keys(seed, index[idx.cpu()], "check-chance-probe", k)
        x_adv, _ = _apgd(model, xs[idx], ys[idx], eps=e, steps=PROBE_STEPS, norm=norm, loss=loss, restarts=1,
                         n_target_classes=1, keys=keys)
        rb[idx[_fooled(model, x_adv, xs[idx], ys[idx], e, norm)]] = False
    return float(rb.float().mean()), e


def chance_check(model, xs, ys, y_all, *, measured, norm, seed, n_classes, index=None):
    """The large-eps check, once per run: the measured robust accuracy at the largest eps
    when that eps reaches the large budget, else a probe on the check subset.

    measured: [(eps, robust accuracy over all points)] of the run (floats only). index: the
    checked points' indices in the dataset (default: their rows)."""
    index = C.check_index(index, xs)
    big = _large_eps(norm, xs)
    floats = [(e, a) for e, a in measured if not isinstance(e, torch.Tensor)]
    top = max(floats, key=lambda ea: ea[0]) if floats else None
    if top is not None and top[0] >= big:
        acc, e, chance = top[1], top[0], _chance(y_all, n_classes)
    else:
        acc, e = _large_eps_probe(model, xs, ys, norm, seed, index)
        chance = _chance(ys, n_classes)
    if acc > chance + CHANCE_MARGIN:
        return [(f"not at chance at large eps: robust accuracy {acc:.3f} at eps {e:.4g} exceeds chance "
                 f"level {chance:.3f} (+{CHANCE_MARGIN}); every input can reach the uniform 0.5 image there, so "
                 "the attack is failing (gradient masking?)")]
    return []


def warn(flags, stacklevel=3):
    for f in flags:
        warnings.warn(f, C.RobustnessWarning, stacklevel=stacklevel)
