"""AutoAttack-grade evaluation: ``evaluate``, ``accuracy_vs_eps`` (``sweep`` then ``sweep_report``) and
transfer attacks.

``per_attack`` maps each stage to the CUMULATIVE robust accuracy after it (AutoAttack's
log): per_attack[last stage] == robust_accuracy. Stage names: "apgd-ce", "apgd-t"
(or "apgd-dlr"), "square", "paper-pgd-20" / "paper-pgd-100". Every accuracy comes with its
count (``clean_count``, ``robust_count``, ``per_attack_counts``) and ``n``; the fractions are
count / n in float64.

``accuracy_vs_eps`` is monotone by construction: it runs the eps in increasing order, a
point broken at a smaller eps counts as broken at every larger one (the same adversarial
example lies in the larger ball) and is not attacked again, and the first attack at each
larger eps starts from the best point found so far for every remaining point.

The sanity checks and their flags live in ``checks.py``; FLAGS.md explains each flag.
"""
from __future__ import annotations

import time

import torch

from . import _common as C
from . import _keys as R
from . import checks as sanity
from .apgd import apgd
from .fgsm_pgd import fgsm, pgd
from .hsj import hop_skip_jump
from .paper import paper_pgd
from .square import square
from .sweep import (clean_pass, eps_key_parts, maybe_compile, run_sweep, stage_counts, stages_of, sweep,
                    validate_eval)
from .sweep_state import SUITES, SweepState, run_order

# sweep, SweepState and SUITES live in sweep.py / sweep_state.py; they stay importable from here.
__all__ = ["evaluate", "accuracy_vs_eps", "sweep", "sweep_report", "SweepState", "transfer", "SUITES"]


def _frac(count, n):
    return count / n if n else 0.0


def _report(model, x, y, state, *, checks, check_samples, compile, eps_values=None):
    """The numbers and the sanity checks of a complete ``state`` (no warnings issued).

    eps_values: the budgets themselves where they are not the state's floats (a per-sample tensor)."""
    n = state.n
    cfg = SUITES[state.suite]
    counts = stage_counts(state)
    order = run_order(state.eps_list)
    eps_keys = eps_key_parts(state.eps_list if eps_values is None else eps_values, order)
    device = C.model_device(model, x.device)
    results = [None] * len(state.eps_list)
    for k, e in enumerate(state.eps_list):
        robust, per, _ = counts[k]
        rc = int(robust.sum())
        results[k] = {"eps": e, "robust_accuracy": _frac(rc, n), "robust_count": rc, "n": n,
                      "per_attack": {name: _frac(c, n) for name, c in per.items()},
                      "per_attack_counts": dict(per), "flags": [], "timings": dict(state.timings[k])}
    top_flags = []
    if checks and check_samples > 0:
        with C.eval_mode(model):
            run = C.stable_rows(maybe_compile(model, compile))
            m = min(check_samples, n)
            xs, ys = x[:m].to(device), y[:m].to(device)
            for k in order:
                t0 = time.perf_counter()
                robust, _, square_broken = counts[k]
                eps = state.eps_list[k] if eps_values is None else eps_values[k]
                if isinstance(eps, torch.Tensor):
                    eps = eps[:m].to(device)
                elif eps == 0.0:  # nothing can move: nothing to check
                    continue
                results[k]["flags"] = sanity.eps_checks(
                    run, xs, ys, robust[:m].to(device), eps=eps, suite=state.suite, cfg=cfg, norm=state.norm,
                    seed=state.seed, square_broken=square_broken, has_square="square" in state.stages,
                    index=state.index[:m], eps_key=R.derive_int(*eps_keys[k]))
                results[k]["timings"]["checks"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            with torch.no_grad():
                n_classes = C.check_logits(run(x[:1].to(device)), y, rows=1, what="sweep_report")
            top_flags = sanity.model_checks(run, xs, ys)
            measured = [] if eps_values is not None else [(r["eps"], r["robust_accuracy"]) for r in results]
            top_flags += sanity.chance_check(run, xs, ys, y.cpu(), measured=measured, norm=state.norm, seed=state.seed,
                                        n_classes=n_classes, index=state.index[:m])
            t_top = time.perf_counter() - t0
            # the once-per-run checks' time goes to the first eps run
            first = results[order[0]]["timings"]
            first["checks"] = first.get("checks", 0.0) + t_top
    for r in results:
        r["timings"]["total"] = sum(v for key, v in r["timings"].items() if key != "total")
    cc = int((state.correct == 1).sum())
    return {"clean_accuracy": _frac(cc, n), "clean_count": cc, "n": n, "results": results, "flags": top_flags}


def sweep_report(model, x, y, state, *, checks=True, check_samples=64, return_points=False, compile=False):
    """``accuracy_vs_eps``'s result from a finished ``sweep`` over all the points (``x``, ``y`` in
    ``state.index``'s order, e.g. the merged shards of a sharded run): the numbers, and the sanity
    checks on the first ``check_samples`` points (their draws keyed like the suite's, so the flags
    too are the same whatever the sharding). Flags are also issued as ``RobustnessWarning``."""
    if not isinstance(state, SweepState):
        raise TypeError(f"state must be a SweepState, got {type(state).__name__}")
    y, _, _ = validate_eval(model, x, y, state.suite, 1, state.norm, state.seed, check_samples)
    if x.shape[0] != state.n:
        raise ValueError(f"x must hold the state's {state.n} points, got {x.shape[0]}")
    if not state.complete():
        raise ValueError("state is not complete: some points still have steps to go (run sweep with it)")
    out = _report(model, x, y, state, checks=checks, check_samples=check_samples, compile=compile)
    if return_points:
        for r, (robust, _, _) in zip(out["results"], stage_counts(state)):
            r["robust"] = robust.clone()
    sanity.warn(out["flags"] + [f for r in out["results"] for f in r["flags"]])
    return out


# ----------------------------------------------------------------------- public API
def evaluate(model, x, y, *, eps, suite="standard", batch_size=256, norm="linf", seed=0, progress=True,
             checks=True, check_samples=64, compile=False, index=None):
    """Robust accuracy under an attack suite (see the module docstring).

    Args:
        model: maps inputs in [0, 1] to logits (B, C); put in eval mode for the run, its
            modes restored afterwards. The "paper" suites need a ``ProtoClassifier``.
        x: inputs (N, ...) in [0, 1] (NCHW for suites with Square); y: int64 labels (N,).
            Batches are moved to the model's device, so x may stay on the CPU.
        eps: the budget, a float or a length-N tensor.
        suite: "standard", "quick", "paper" or "paper-100". batch_size: points per batch
            (bounds memory; the result does not depend on it).
        norm: "linf" or "l2". seed: seeds every random start and query (same seed, same result).
        progress: progress of each attack (tqdm on a terminal, log lines otherwise).
        checks / check_samples: run the sanity checks (checks.py, FLAGS.md) on the first
            check_samples points.
        compile: run the attacks on ``torch.compile(model, dynamic=True)`` (opt-in).
        index: (N,) integer tensor, each point's index in the dataset (default: its row); it keys
            the point's random draws.

    Returns {"clean_accuracy", "clean_count", "robust_accuracy", "robust_count", "per_attack"
    (cumulative robust accuracy after each stage), "per_attack_counts", "timings" (seconds per
    stage, "checks", "total"), "flags", "n"}.
    """
    y, norm, batch_size = validate_eval(model, x, y, suite, batch_size, norm, seed, check_samples)
    eps = C.check_budget(eps, x)
    index = C.check_index(index, x)
    t_start = time.perf_counter()
    per_sample = isinstance(eps, torch.Tensor)
    state = SweepState(index=index, eps_list=[0.0 if per_sample else eps], suite=suite, norm=norm, seed=seed)
    device = C.model_device(model, x.device)
    with C.eval_mode(model):
        with torch.no_grad():
            n_classes = C.check_logits(model(x[:1].to(device)), y, rows=1, what="evaluate")
        state.stages = [s[0] for s in stages_of(SUITES[suite], n_classes, norm, batch_size)]
        run = C.stable_rows(maybe_compile(model, compile))
        clean = clean_pass(run, x, y, batch_size=batch_size, device=device)
        run_sweep(run, x, y, state, eps_list=[eps], cfg=SUITES[suite], norm=norm, batch_size=batch_size,
               progress=progress, device=device, clean=clean, on_batch=None)
    rep = _report(model, x, y, state, checks=checks, check_samples=check_samples, compile=compile,
                  eps_values=[eps] if per_sample else None)
    r = rep["results"][0]
    flags = rep["flags"] + r["flags"]
    sanity.warn(flags)
    timings = dict(r["timings"])
    timings["total"] = time.perf_counter() - t_start
    return {"clean_accuracy": rep["clean_accuracy"], "clean_count": rep["clean_count"],
            "robust_accuracy": r["robust_accuracy"], "robust_count": r["robust_count"],
            "per_attack": r["per_attack"], "per_attack_counts": r["per_attack_counts"], "timings": timings,
            "flags": flags, "n": rep["n"]}


def accuracy_vs_eps(model, x, y, *, eps_list, suite="standard", batch_size=256, norm="linf", seed=0,
                    progress=True, checks=True, check_samples=64, compile=False, return_points=False, index=None):
    """Robust accuracy for each eps in eps_list (the "large perturbations" curve), monotone by
    construction: the eps run in increasing order, a point broken at a smaller eps counts as
    broken at the larger ones and is not attacked again, and each larger eps starts its first
    attack from the best point found so far. So robust accuracy never rises with eps.

    index: (N,) integer tensor, each point's index in the dataset (default: its row); it keys the
    point's random draws, so the result does not depend on batch_size or on how the points are
    split (``sweep`` then ``sweep_report`` run the same in pieces).

    Returns {"clean_accuracy", "clean_count", "n", "results": [{"eps", "robust_accuracy",
    "robust_count", "n", "per_attack", "per_attack_counts", "flags", "timings"}, ...] in the order
    of eps_list, "flags": run-level flags}. The timings of an eps cover only the work done at it
    (the points still unbroken). The model-level checks (probabilities, randomness, zero
    gradients) and the large-eps chance check run once and are reported in the top-level
    "flags"; the per-eps checks (single-step, black-box, more iterations) in each result's
    "flags". The chance check uses the curve's value at its largest eps when that eps is >= 0.5
    (linf) / 0.5 sqrt(d) (l2), else a probe.

    ``return_points=True`` adds "robust" to each result: a (N,) bool CPU tensor, True where the
    point is classified correctly and no attack broke it at that eps.
    """
    y, norm, batch_size = validate_eval(model, x, y, suite, batch_size, norm, seed, check_samples)
    state = sweep(model, x, y, eps_list=eps_list, suite=suite, norm=norm, seed=seed, batch_size=batch_size,
                  index=index, progress=progress, compile=compile)
    return sweep_report(model, x, y, state, checks=checks, check_samples=check_samples, return_points=return_points,
                        compile=compile)


_ATTACKS = {"fgsm": fgsm, "pgd": pgd, "apgd": apgd, "square": square, "hop_skip_jump": hop_skip_jump,
            "paper_pgd": paper_pgd}


def transfer(source_model, target_model, x, y, *, attack="pgd", batch_size=256, **kw):
    """Craft adversarial inputs on ``source_model`` and evaluate them on ``target_model``.

    attack: a name in ("fgsm", "pgd", "apgd", "square", "hop_skip_jump", "paper_pgd") or a callable
    ``attack(model, x, y, **kw) -> x_adv``; ``kw`` is passed on (e.g. eps, alpha, steps).
    Both models are put in eval mode while used and restored afterwards.

    Returns {"x_adv": the adversarial inputs (detached), "source_accuracy": accuracy of the
    source model on x_adv, "target_clean_accuracy": of the target on x, "target_accuracy":
    of the target on x_adv}.
    """
    C.check_model(source_model, "source_model")
    C.check_model(target_model, "target_model")
    y, _, _ = C.validate_attack(target_model, x, y)
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

