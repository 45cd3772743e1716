"""AutoAttack-grade evaluation, the accuracy-vs-eps curve, transfer attacks, and the
sanity checks (Carlini et al. 2019; AutoAttack's own checks) reported as flags.

Suites (each attack runs only on the points still classified correctly, so the robust
accuracy is the per-sample worst case over the suite):
  standard: APGD-CE (100 it.) -> APGD-T (targeted DLR, 9 targets, 100 it.) -> Square (5000 queries)
  quick:    APGD-CE (20 it.)  -> APGD-T (targeted DLR, 3 targets, 20 it.)
APGD-T uses min(n_targets, C - 1) targets; for C = 3 it is replaced by untargeted APGD-DLR
("apgd-dlr") and for C = 2 it is skipped. Square is L-inf only, so norm="l2" suites omit it.

``per_attack`` maps each stage to the CUMULATIVE robust accuracy after it (AutoAttack's
log): per_attack[last stage] == robust_accuracy. Stage names: "apgd-ce", "apgd-t"
(or "apgd-dlr"), "square".

Flags (strings, each also issued as a ``RobustnessWarning``), computed on the first
``check_samples`` points:
  * probabilities: every output row is non-negative and sums to 1 (softmax inside the model);
  * random: two clean forward passes in eval mode differ (rtol 1e-4, atol 1e-5);
  * zero gradients: the input gradient of the logit margin z_y - max_{i!=y} z_i is exactly
    zero for some sample (the margin, unlike CE, does not saturate on confident points);
  * single-step beats iterative: FGSM at eps fools a point that the whole suite left robust;
  * black-box beats white-box: Square breaks points that the APGD stages left robust (in the
    standard suite this is counted on every point at no extra cost; the quick suite runs a
    300-query Square on the subset's robust points);
  * more iterations recover accuracy: APGD-CE with 4x the suite's iterations leaves more
    than max(2 points, 5 %) more of the subset robust than APGD-CE with the suite's count;
  * not at chance at large eps: at a budget where every image can be mapped to the uniform
    0.5 image (eps >= 0.5 for linf, >= 0.5 sqrt(d) for l2) the accuracy must not exceed the
    subset's majority-class frequency + 5 %. ``evaluate`` checks its own result when eps is
    that large and otherwise runs a probe (APGD-CE and APGD-DLR/CE, 20 it.) at that budget;
    ``accuracy_vs_eps`` checks the curve at its largest eps when that is large enough and
    otherwise runs the probe, and also flags robust accuracy that rises with eps.
"""
from __future__ import annotations

import math
import time
import warnings
from typing import Optional

import torch
from tqdm.auto import tqdm

from . import _common as C
from .apgd import _apgd
from .fgsm_pgd import _pgd, fgsm, pgd
from .hsj import hop_skip_jump
from .square import _square, square
from .apgd import apgd

__all__ = ["evaluate", "accuracy_vs_eps", "transfer", "SUITES"]

SUITES = {
    "standard": {"ce_steps": 100, "t_steps": 100, "n_targets": 9, "square_queries": 5000},
    "quick": {"ce_steps": 20, "t_steps": 20, "n_targets": 3, "square_queries": 0},
}
_PROBE_STEPS = 20
_QUICK_SQUARE_QUERIES = 300


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _check_suite(suite):
    if suite not in SUITES:
        raise ValueError(f"suite must be one of {tuple(SUITES)}, got {suite!r}")
    return SUITES[suite]


def _stages(cfg, n_classes, norm):
    """[(name, fn(model, x, y, eps, gen, logits) -> x_adv)] for the suite and this model."""
    stages = [("apgd-ce", lambda m, x, y, e, g, lg: _apgd(
        m, x, y, eps=e, steps=cfg["ce_steps"], norm=norm, loss="ce", restarts=1, n_target_classes=1,
        generator=g, clean_logits=lg)[0])]
    if n_classes >= 4:
        nt = min(cfg["n_targets"], n_classes - 1)
        stages.append(("apgd-t", lambda m, x, y, e, g, lg: _apgd(
            m, x, y, eps=e, steps=cfg["t_steps"], norm=norm, loss="dlr-t", restarts=1, n_target_classes=nt,
            generator=g, clean_logits=lg)[0]))
    elif n_classes == 3:
        stages.append(("apgd-dlr", lambda m, x, y, e, g, lg: _apgd(
            m, x, y, eps=e, steps=cfg["t_steps"], norm=norm, loss="dlr", restarts=1, n_target_classes=1,
            generator=g, clean_logits=lg)[0]))
    if cfg["square_queries"] > 0 and norm == "linf" and n_classes >= 2:
        stages.append(("square", lambda m, x, y, e, g, lg: _square(
            m, x, y, eps=e, queries=cfg["square_queries"], p_init=0.8, generator=g, clean_logits=lg)[0]))
    return stages


def _in_ball(x_adv, x, eps, norm):
    """Per-sample: x_adv within [0, 1] and the eps ball (the l2 check allows float rounding)."""
    ev = C.budget_view(eps, x)
    inside = ((x_adv >= 0) & (x_adv <= 1)).flatten(1).all(dim=1)
    if norm == "linf":
        return inside & ((x_adv <= x + ev) & (x_adv >= x - ev)).flatten(1).all(dim=1)
    dn = (x_adv - x).flatten(1).float().norm(dim=1)
    return inside & (dn <= ev.flatten().float() * (1 + 1e-5) + 1e-6)


def _seed_for(seed, *parts):
    h = seed & 0xFFFFFFFF
    for p in parts:
        h = (h * 1000003 + p + 1) & 0x7FFFFFFFFFFF
    return h


def _run_suite(model, x, y, *, eps, suite, norm, batch_size, seed, progress, device, desc):
    """The cumulative suite in batches. Returns (correct, robust, per-stage counts, timings, broken_by)."""
    cfg = SUITES[suite]
    n = x.shape[0]
    correct = torch.zeros(n, dtype=torch.bool)
    robust = torch.zeros(n, dtype=torch.bool)
    counts, timings, broken_by = {}, {}, {}
    stages = None
    batches = list(range(0, n, batch_size))
    bar = tqdm(total=len(batches), desc=desc, disable=not progress, leave=False)
    for bi, start in enumerate(batches):
        xb = x[start:start + batch_size].to(device)
        yb = y[start:start + batch_size].to(device)
        eb = eps[start:start + batch_size].to(device) if isinstance(eps, torch.Tensor) else eps
        with torch.no_grad():
            logits = model(xb)
        if stages is None:
            stages = _stages(cfg, logits.shape[1], norm)
            for name, _ in stages:
                counts[name], timings[name], broken_by[name] = 0, 0.0, torch.zeros(n, dtype=torch.bool)
        rb = logits.argmax(dim=1) == yb
        correct[start:start + xb.shape[0]] = rb.cpu()
        for si, (name, fn) in enumerate(stages):
            t0 = time.perf_counter()
            idx = rb.nonzero().squeeze(1)
            if idx.numel() > 0:
                gen = C.make_generator(_seed_for(seed, bi, si), xb.device)
                xs, ys = xb[idx], yb[idx]
                es = C.subset_budget(eb, idx)
                x_adv = fn(model, xs, ys, es, gen, logits[idx])
                with torch.no_grad():
                    broken = (model(x_adv).argmax(dim=1) != ys) & _in_ball(x_adv, xs, es, norm)
                rb[idx[broken]] = False
                broken_by[name][start + idx[broken].cpu()] = True
            _sync(xb.device)
            timings[name] += time.perf_counter() - t0
            counts[name] += int(rb.sum())
        robust[start:start + xb.shape[0]] = rb.cpu()
        bar.update(1)
    bar.close()
    return correct, robust, counts, timings, broken_by


# ------------------------------------------------------------------------- checks
def _model_checks(model, xs, ys):
    """probabilities / random between calls / zero gradients on the check subset."""
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


def _fooled(model, x_adv, x, y, eps, norm):
    with torch.no_grad():
        return (model(x_adv).argmax(dim=1) != y) & _in_ball(x_adv, x, eps, norm)


def _large_eps(norm, x):
    return 0.5 if norm == "linf" else 0.5 * math.sqrt(x[0].numel())


def _chance(ys, n_classes):
    freq = torch.bincount(ys, minlength=n_classes).float() / max(1, ys.numel())
    return max(float(freq.max()), 1.0 / n_classes)


def _large_eps_probe(model, xs, ys, norm, seed):
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
        gen = C.make_generator(_seed_for(seed, 77, k), xs.device)
        x_adv, _ = _apgd(model, xs[idx], ys[idx], eps=e, steps=_PROBE_STEPS, norm=norm, loss=loss, restarts=1,
                         n_target_classes=1, generator=gen)
        rb[idx[_fooled(model, x_adv, xs[idx], ys[idx], e, norm)]] = False
    return float(rb.float().mean()), _chance(ys, n_classes), e


def _chance_flag(acc, chance, e):
    if acc > chance + 0.05:
        return (f"not at chance at large eps: robust accuracy {acc:.3f} at eps {e:.4g} exceeds chance "
                f"level {chance:.3f} (+0.05); every input can reach the uniform 0.5 image there, so the "
                "attack is failing (gradient masking?)")
    return None


def _eps_checks(model, xs, ys, robust_s, *, eps, suite, norm, seed, square_robust_broken, stage_names):
    """Per-eps checks on the subset (xs, ys): robust_s is the suite's per-sample result there."""
    flags = []
    cfg = SUITES[suite]
    # single-step vs iterative
    x_f = fgsm(model, xs, ys, eps=eps, norm=norm)
    beaten = int((_fooled(model, x_f, xs, ys, eps, norm) & robust_s).sum())
    if beaten > 0:
        flags.append(f"single-step beats iterative: FGSM fooled {beaten} points that the {suite} suite left "
                     "robust (the iterative attacks are failing)")
    # black-box vs white-box
    if "square" in stage_names:
        bb = square_robust_broken
    elif norm == "linf" and xs.dim() == 4 and bool(robust_s.any()):
        idx = robust_s.nonzero().squeeze(1)
        gen = C.make_generator(_seed_for(seed, 99), xs.device)
        es = C.subset_budget(eps, idx)
        x_sq, _ = _square(model, xs[idx], ys[idx], eps=es, queries=_QUICK_SQUARE_QUERIES, p_init=0.8, generator=gen)
        bb = int(_fooled(model, x_sq, xs[idx], ys[idx], es, norm).sum())
    else:
        bb = 0
    if bb > 0:
        flags.append(f"black-box beats white-box: Square found adversarial points for {bb} samples that the "
                     "white-box APGD attacks missed (gradient masking?)")
    # more iterations must not recover accuracy
    with torch.no_grad():
        logits = model(xs)
    accs = []
    for k, steps in enumerate((cfg["ce_steps"], 4 * cfg["ce_steps"])):
        gen = C.make_generator(_seed_for(seed, 55, k), xs.device)
        x_a, _ = _apgd(model, xs, ys, eps=eps, steps=steps, norm=norm, loss="ce", restarts=1, n_target_classes=1,
                       generator=gen, clean_logits=logits)
        accs.append(int((~_fooled(model, x_a, xs, ys, eps, norm) & (logits.argmax(1) == ys)).sum()))
    if accs[1] - accs[0] > max(2, 0.05 * xs.shape[0]):
        flags.append(f"more iterations recover accuracy: APGD-CE with {4 * cfg['ce_steps']} iterations leaves "
                     f"{accs[1]} of {xs.shape[0]} points robust, with {cfg['ce_steps']} only {accs[0]}")
    return flags


def _warn(flags):
    for f in flags:
        warnings.warn(f, C.RobustnessWarning, stacklevel=3)


# ----------------------------------------------------------------------- public API
def _validate_eval(model, x, y, eps, suite, batch_size, norm, seed, check_samples):
    C.check_model(model)
    C.check_images(x)
    y = C.check_labels(y, x)
    cfg = _check_suite(suite)
    norm = C.check_norm(norm)
    batch_size = C.check_positive_int(batch_size, name="batch_size")
    C.check_positive_int(check_samples, name="check_samples", minimum=0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if x.shape[0] == 0:
        raise ValueError("x must hold at least one sample")
    if cfg["square_queries"] > 0 and norm == "linf" and x.dim() != 4:
        raise ValueError(f"x must be a 4-D NCHW tensor for suite={suite!r} (Square), got shape {tuple(x.shape)}")
    return y, norm, batch_size


def _evaluate(model, x, y, *, eps, suite, batch_size, norm, seed, progress, checks, check_samples, device,
              model_flags=True, chance_check=True):
    n = x.shape[0]
    t_start = time.perf_counter()
    correct, robust, counts, timings, broken_by = _run_suite(
        model, x, y, eps=eps, suite=suite, norm=norm, batch_size=batch_size, seed=seed, progress=progress,
        device=device, desc=f"evaluate[{suite}]")
    per_attack = {name: counts[name] / n for name in counts}
    flags = []
    if checks and check_samples > 0:
        t0 = time.perf_counter()
        m = min(check_samples, n)
        xs, ys = x[:m].to(device), y[:m].to(device)
        es = eps[:m].to(device) if isinstance(eps, torch.Tensor) else eps
        if model_flags:
            flags += _model_checks(model, xs, ys)
        sq = 0
        if "square" in broken_by:
            sq = int(broken_by["square"].sum())
        flags += _eps_checks(model, xs, ys, robust[:m].to(device), eps=es, suite=suite, norm=norm, seed=seed,
                             square_robust_broken=sq, stage_names=tuple(counts))
        if chance_check:
            big = _large_eps(norm, xs)
            e_min = float(eps.min()) if isinstance(eps, torch.Tensor) else eps
            if e_min >= big:
                with torch.no_grad():
                    nc = model(xs[:1]).shape[1]
                f = _chance_flag(float(robust.float().mean()), _chance(y, nc), e_min)
            else:
                f = _chance_flag(*_large_eps_probe(model, xs, ys, norm, seed))
            if f:
                flags.append(f)
        timings["checks"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    return {
        "clean_accuracy": int(correct.sum()) / n,
        "robust_accuracy": int(robust.sum()) / n,
        "per_attack": per_attack,
        "timings": timings,
        "flags": flags,
        "n": n,
    }


def evaluate(model, x, y, *, eps, suite="standard", batch_size=256, norm="linf", seed=0, progress=True,
             checks=True, check_samples=64):
    """Robust accuracy under an AutoAttack-style suite (see the module docstring).

    Args:
        model: maps inputs in [0, 1] to logits (B, C); put in eval mode for the run, its
            modes restored afterwards.
        x: inputs (N, ...) in [0, 1] (NCHW for suites with Square); y: int64 labels (N,).
            Batches are moved to the model's device, so x may stay on the CPU.
        eps: the budget, a float or a length-N tensor.
        suite: "standard" or "quick". batch_size: points per batch (bounds memory).
        norm: "linf" or "l2". seed: seeds every random start and query (same seed, same result).
        progress: tqdm progress bars. checks / check_samples: run the sanity checks on the
            first check_samples points.

    Returns {"clean_accuracy", "robust_accuracy", "per_attack" (cumulative robust accuracy
    after each stage), "timings" (seconds per stage, "checks", "total"), "flags", "n"}.
    """
    y, norm, batch_size = _validate_eval(model, x, y, eps, suite, batch_size, norm, seed, check_samples)
    eps = C.check_budget(eps, x)
    device = C.model_device(model, x.device)
    with C.eval_mode(model):
        with torch.no_grad():
            C.check_logits(model(x[:1].to(device)), y, rows=1, what="evaluate")
        out = _evaluate(model, x, y, eps=eps, suite=suite, batch_size=batch_size, norm=norm, seed=seed,
                        progress=progress, checks=checks, check_samples=check_samples, device=device)
    _warn(out["flags"])
    return out


def accuracy_vs_eps(model, x, y, *, eps_list, suite="standard", batch_size=256, norm="linf", seed=0,
                    progress=True, checks=True, check_samples=64):
    """Robust accuracy for each eps in eps_list (the "large perturbations" curve).

    Returns {"clean_accuracy", "results": [{"eps", "robust_accuracy", "per_attack", "flags",
    "timings"}, ...] in the order of eps_list, "flags": curve-level flags}. The model-level
    checks (probabilities, randomness, zero gradients) and the large-eps chance check run
    once and are reported in the top-level "flags"; the per-eps checks (single-step,
    black-box, more iterations) in each result's "flags". The chance check uses the curve's
    value at its largest eps when that eps is >= 0.5 (linf) / 0.5 sqrt(d) (l2), else a probe.
    Robust accuracy rising by more than max(2 points, 2 %) from a smaller to a larger eps is
    flagged too.
    """
    y, norm, batch_size = _validate_eval(model, x, y, None, suite, batch_size, norm, seed, check_samples)
    if isinstance(eps_list, (str, bytes)) or not hasattr(eps_list, "__iter__"):
        raise ValueError(f"eps_list must be a list of floats >= 0, got {eps_list!r}")
    eps_list = [C.check_budget(e, x, name="eps_list[i]") for e in eps_list]
    if not eps_list or any(isinstance(e, torch.Tensor) for e in eps_list):
        raise ValueError("eps_list must be a non-empty list of floats >= 0")
    device = C.model_device(model, x.device)
    results, top_flags = [], []
    with C.eval_mode(model):
        with torch.no_grad():
            nc = C.check_logits(model(x[:1].to(device)), y, rows=1, what="accuracy_vs_eps")
        clean = None
        for k, e in enumerate(tqdm(eps_list, desc="accuracy_vs_eps", disable=not progress, leave=False)):
            r = _evaluate(model, x, y, eps=e, suite=suite, batch_size=batch_size, norm=norm, seed=seed + k,
                          progress=progress, checks=checks, check_samples=check_samples, device=device,
                          model_flags=False, chance_check=False)
            clean = r["clean_accuracy"]
            results.append({"eps": e, "robust_accuracy": r["robust_accuracy"], "per_attack": r["per_attack"],
                            "flags": r["flags"], "timings": r["timings"]})
        if checks and check_samples > 0:
            m = min(check_samples, x.shape[0])
            xs, ys = x[:m].to(device), y[:m].to(device)
            top_flags += _model_checks(model, xs, ys)
            i_max = max(range(len(eps_list)), key=lambda i: eps_list[i])
            if eps_list[i_max] >= _large_eps(norm, xs):
                f = _chance_flag(results[i_max]["robust_accuracy"], _chance(y, nc), eps_list[i_max])
            else:
                f = _chance_flag(*_large_eps_probe(model, xs, ys, norm, seed))
            if f:
                top_flags.append(f)
        order = sorted(range(len(eps_list)), key=lambda i: eps_list[i])
        tol = max(2.0 / x.shape[0], 0.02)
        for a, b in zip(order, order[1:]):
            if eps_list[b] > eps_list[a] and results[b]["robust_accuracy"] > results[a]["robust_accuracy"] + tol:
                top_flags.append(f"accuracy rises with eps: {results[a]['robust_accuracy']:.3f} at eps "
                                 f"{eps_list[a]:.4g} but {results[b]['robust_accuracy']:.3f} at eps {eps_list[b]:.4g}")
    _warn(top_flags + [f for r in results for f in r["flags"]])
    return {"clean_accuracy": clean, "results": results, "flags": top_flags}


_ATTACKS = {"fgsm": fgsm, "pgd": pgd, "apgd": apgd, "square": square, "hop_skip_jump": hop_skip_jump}


def transfer(source_model, target_model, x, y, *, attack="pgd", batch_size=256, **kw):
    """Craft adversarial inputs on ``source_model`` and evaluate them on ``target_model``.

    attack: a name in ("fgsm", "pgd", "apgd", "square", "hop_skip_jump") or a callable
    ``attack(model, x, y, **kw) -> x_adv``; ``kw`` is passed on (e.g. eps, alpha, steps).
    Both models are put in eval mode while used and restored afterwards.

    Returns {"x_adv": the adversarial inputs (detached), "source_accuracy": accuracy of the
    source model on x_adv, "target_clean_accuracy": of the target on x, "target_accuracy":
    of the target on x_adv}.
    """
    C.check_model(source_model, "source_model")
    C.check_model(target_model, "target_model")
    C.check_images(x)
    y = C.check_labels(y, x)
    batch_size = C.check_positive_int(batch_size, name="batch_size")
    if isinstance(attack, str):
        if attack not in _ATTACKS:
            raise ValueError(f"attack must be one of {tuple(_ATTACKS)} or a callable, got {attack!r}")
        fn = _ATTACKS[attack]
    elif callable(attack):
        fn = attack
    else:
        raise ValueError(f"attack must be one of {tuple(_ATTACKS)} or a callable, got {type(attack).__name__}")
    x_adv = fn(source_model, x, y, **kw)
    if not isinstance(x_adv, torch.Tensor) or x_adv.shape != x.shape:
        raise ValueError(f"attack must return adversarial inputs of shape {tuple(x.shape)}")
    x_adv = x_adv.detach()
    with C.eval_mode(source_model), C.eval_mode(target_model):
        src = (C.predict(source_model, x_adv, batch_size=batch_size) == y).float().mean()
        tc = (C.predict(target_model, x, batch_size=batch_size) == y).float().mean()
        ta = (C.predict(target_model, x_adv, batch_size=batch_size) == y).float().mean()
    return {"x_adv": x_adv, "source_accuracy": float(src), "target_clean_accuracy": float(tc),
            "target_accuracy": float(ta)}
