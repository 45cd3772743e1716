"""AutoAttack-grade evaluation, the DRP paper's own protocol, the accuracy-vs-eps curve and
transfer attacks.

Suites (each attack runs only on the points still classified correctly, so the robust
accuracy is the per-sample worst case over the suite):
  standard:  APGD-CE (100 it.) -> APGD-T (targeted DLR, 9 targets, 100 it.) -> Square (5000 queries)
  quick:     APGD-CE (20 it.)  -> APGD-T (targeted DLR, 3 targets, 20 it.)
  paper:     the DRP paper's attack: L-inf PGD on the model's own distance to the true
             prototype, step eps/4, 20 it., no random start (``paper_pgd``). ProtoClassifier only.
  paper-100: the same with the authors' 100 iterations.
APGD-T uses min(n_targets, C - 1) targets; for C = 3 it is replaced by untargeted APGD-DLR
("apgd-dlr") and for C = 2 it is skipped. Square is L-inf only, so norm="l2" suites omit it.
The paper suites are L-inf only.

``per_attack`` maps each stage to the CUMULATIVE robust accuracy after it (AutoAttack's
log): per_attack[last stage] == robust_accuracy. Stage names: "apgd-ce", "apgd-t"
(or "apgd-dlr"), "square", "paper-pgd-20" / "paper-pgd-100".

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
from . import checks as K
from ._progress import StageProgress
from .apgd import _apgd, apgd, n_runs
from .fgsm_pgd import fgsm, pgd
from .hsj import hop_skip_jump
from .paper import _paper_pgd, check_proto_classifier, paper_pgd
from .square import _square, square

__all__ = ["evaluate", "accuracy_vs_eps", "transfer", "SUITES"]

SUITES = {
    "standard": {"ce_steps": 100, "t_steps": 100, "n_targets": 9, "square_queries": 5000},
    "quick": {"ce_steps": 20, "t_steps": 20, "n_targets": 3, "square_queries": 0},
    "paper": {"paper_steps": 20},
    "paper-100": {"paper_steps": 100},
}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _check_suite(suite):
    if not isinstance(suite, str) or suite not in SUITES:
        raise ValueError(f"suite must be one of {tuple(SUITES)}, got {suite!r}")
    return SUITES[suite]


def _stages(cfg, n_classes, norm, max_rows):
    """[(name, iterations per point, fn(model, x, y, eps, gen, clean_logits, x_start, progress)
    -> (x_adv, fooled))] for the suite and this model. Only the first stage uses x_start.
    max_rows bounds APGD's stacked batch (several targets of the same points side by side)."""
    if "paper_steps" in cfg:
        steps = cfg["paper_steps"]
        return [(f"paper-pgd-{steps}", steps, lambda m, x, y, e, g, lg, x0, pr: _paper_pgd(
            m, x, y, eps=e, steps=steps, x_start=x0, progress=pr))]
    stages = [("apgd-ce", cfg["ce_steps"], lambda m, x, y, e, g, lg, x0, pr: _apgd(
        m, x, y, eps=e, steps=cfg["ce_steps"], norm=norm, loss="ce", restarts=1, n_target_classes=1,
        generator=g, clean_logits=lg, x_start=x0, progress=pr))]
    if n_classes >= 4:
        nt = min(cfg["n_targets"], n_classes - 1)
        stages.append(("apgd-t", n_runs("dlr-t", 1, nt) * cfg["t_steps"], lambda m, x, y, e, g, lg, x0, pr: _apgd(
            m, x, y, eps=e, steps=cfg["t_steps"], norm=norm, loss="dlr-t", restarts=1, n_target_classes=nt,
            generator=g, clean_logits=lg, progress=pr, max_rows=max_rows)))
    elif n_classes == 3:
        stages.append(("apgd-dlr", cfg["t_steps"], lambda m, x, y, e, g, lg, x0, pr: _apgd(
            m, x, y, eps=e, steps=cfg["t_steps"], norm=norm, loss="dlr", restarts=1, n_target_classes=1,
            generator=g, clean_logits=lg, progress=pr)))
    if cfg["square_queries"] > 0 and norm == "linf" and n_classes >= 2:
        stages.append(("square", cfg["square_queries"], lambda m, x, y, e, g, lg, x0, pr: _square(
            m, x, y, eps=e, queries=cfg["square_queries"], p_init=0.8, generator=g, clean_logits=lg, progress=pr)))
    return stages


def _clean_pass(model, x, y, *, batch_size, device):
    """Clean logits (on the CPU, computed once per run) and the per-point correctness."""
    outs = []
    with torch.no_grad():
        for start in range(0, x.shape[0], batch_size):
            outs.append(model(x[start:start + batch_size].to(device)).cpu())
    logits = torch.cat(outs)
    return logits, logits.argmax(dim=1) == y.cpu()


def _fmt_eps(eps):
    return f"{eps:g}" if not isinstance(eps, torch.Tensor) else "per-sample"


def _run_suite(model, x, y, *, eps, suite, norm, batch_size, seed, progress, device, clean, alive=None,
               x_start=None, label=""):
    """The cumulative suite, attack by attack (AutoAttack's order): each attack runs on every
    point still robust, in chunks of at most ``batch_size`` of THOSE points, so the later
    attacks, which see few points, run them in one full batch instead of many small ones.

    clean: (clean logits, correct) from ``_clean_pass``. alive: per point, still unbroken at
    a smaller eps (None: every correct point); points not alive count as broken and are not
    attacked. x_start: per point, the best point found so far (the first attack starts there).
    Returns (robust, per-stage counts, timings, broken_by, best points)."""
    cfg = SUITES[suite]
    n = x.shape[0]
    logits_all, correct = clean
    robust = correct.clone() if alive is None else (correct & alive)
    best = x.clone() if x_start is None else x_start.clone()
    stages = _stages(cfg, logits_all.shape[1], norm, batch_size)
    counts, timings = {}, {}
    broken_by = {name: torch.zeros(n, dtype=torch.bool) for name, _, _ in stages}
    nothing_moves = not isinstance(eps, torch.Tensor) and eps == 0.0  # the ball is the point itself
    for si, (name, iters, fn) in enumerate(stages):
        t0 = time.perf_counter()
        todo = robust.nonzero().squeeze(1)
        if todo.numel() > 0 and not nothing_moves:
            chunks = list(torch.split(todo, batch_size))
            bar = StageProgress(f"{label}{name}", total=iters * len(chunks), points=todo.numel(), enabled=progress)
            left_other = todo.numel()
            for ci, chunk in enumerate(chunks):
                left_other -= chunk.numel()
                bar.offset = left_other
                at = chunk.to(x.device)
                xs, ys = x[at].to(device), y[at].to(device)
                es = eps[at].to(device) if isinstance(eps, torch.Tensor) else eps
                x0 = x_start[at].to(device) if (x_start is not None and si == 0) else None
                gen = C.make_generator(K.seed_for(seed, ci, si), xs.device)
                x_adv, fooled = fn(model, xs, ys, es, gen, logits_all[chunk].to(device), x0, bar)
                # the attack's own verdict (from the logits of exactly these points), plus the budget
                broken = (fooled & K.in_ball(x_adv, xs, es, norm)).cpu()
                robust[chunk[broken]] = False
                broken_by[name][chunk[broken]] = True
                # the best point so far: the adversarial example, or this attack's last point
                best[chunk.to(best.device)] = x_adv.to(best.device, best.dtype)
                left_other += chunk.numel() - int(broken.sum())
            bar.close(left=int(robust.sum()))
        _sync(device)
        timings[name] = time.perf_counter() - t0
        counts[name] = int(robust.sum())
    # points broken at a smaller eps keep their adversarial example (already in x_start)
    return robust, counts, timings, broken_by, best


# ----------------------------------------------------------------------- public API
def _validate_eval(model, x, y, suite, batch_size, norm, seed, check_samples):
    y, _, norm = C.validate_attack(model, x, y, norm=norm)
    cfg = _check_suite(suite)
    batch_size = C.check_positive_int(batch_size, name="batch_size")
    C.check_positive_int(check_samples, name="check_samples", minimum=0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if x.shape[0] == 0:
        raise ValueError("x must hold at least one sample")
    if "paper_steps" in cfg:
        check_proto_classifier(model, what=f"suite={suite!r} (the DRP paper's attack)")
        if norm != "linf":
            raise ValueError(f"suite={suite!r} is the paper's L-inf attack, so norm must be 'linf', got {norm!r}")
    elif cfg["square_queries"] > 0 and norm == "linf" and x.dim() != 4:
        raise ValueError(f"x must be a 4-D NCHW tensor for suite={suite!r} (Square), got shape {tuple(x.shape)}")
    return y, norm, batch_size


def _maybe_compile(model, compile):
    """``torch.compile(model, dynamic=True)`` when asked (the point counts change as points
    break); the attacks then call the compiled module. Off by default: on the CPU it costs
    minutes of compilation and did not pay on the small CNNs measured (bench/RESULTS.md)."""
    if isinstance(compile, bool) and compile:
        return torch.compile(model, dynamic=True)
    if not isinstance(compile, bool):
        raise TypeError(f"compile must be a bool, got {type(compile).__name__}")
    return model


def _evaluate(model, x, y, *, eps, suite, batch_size, norm, seed, progress, checks, check_samples, device,
              clean, alive=None, x_start=None, label=""):
    """One eps. Returns (report, robust mask, best points); the report has no model-level or
    chance flags (the callers add those once per run)."""
    n = x.shape[0]
    t_start = time.perf_counter()
    robust, counts, timings, broken_by, best = _run_suite(
        model, x, y, eps=eps, suite=suite, norm=norm, batch_size=batch_size, seed=seed, progress=progress,
        device=device, clean=clean, alive=alive, x_start=x_start, label=label)
    per_attack = {name: counts[name] / n for name in counts}
    flags = []
    if checks and check_samples > 0:
        t0 = time.perf_counter()
        m = min(check_samples, n)
        xs, ys = x[:m].to(device), y[:m].to(device)
        es = eps[:m].to(device) if isinstance(eps, torch.Tensor) else eps
        flags += K.eps_checks(model, xs, ys, robust[:m].to(device), eps=es, suite=suite, cfg=SUITES[suite],
                              norm=norm, seed=seed, square_broken=int(broken_by["square"].sum())
                              if "square" in broken_by else 0, has_square="square" in broken_by)
        timings["checks"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    report = {
        "clean_accuracy": int(clean[1].sum()) / n,
        "robust_accuracy": int(robust.sum()) / n,
        "per_attack": per_attack,
        "timings": timings,
        "flags": flags,
        "n": n,
    }
    return report, robust, best


def _run_checks(model, x, y, *, measured, norm, seed, check_samples, device, n_classes):
    """The once-per-run checks: the model's (probabilities, random, zero gradients) and chance."""
    t0 = time.perf_counter()
    m = min(check_samples, x.shape[0])
    xs, ys = x[:m].to(device), y[:m].to(device)
    flags = K.model_checks(model, xs, ys)
    flags += K.chance_check(model, xs, ys, y.cpu(), measured=measured, norm=norm, seed=seed, n_classes=n_classes)
    return flags, time.perf_counter() - t0


def evaluate(model, x, y, *, eps, suite="standard", batch_size=256, norm="linf", seed=0, progress=True,
             checks=True, check_samples=64, compile=False):
    """Robust accuracy under an attack suite (see the module docstring).

    Args:
        model: maps inputs in [0, 1] to logits (B, C); put in eval mode for the run, its
            modes restored afterwards. The "paper" suites need a ``ProtoClassifier``.
        x: inputs (N, ...) in [0, 1] (NCHW for suites with Square); y: int64 labels (N,).
            Batches are moved to the model's device, so x may stay on the CPU.
        eps: the budget, a float or a length-N tensor.
        suite: "standard", "quick", "paper" or "paper-100". batch_size: points per batch
            (bounds memory).
        norm: "linf" or "l2". seed: seeds every random start and query (same seed, same result).
        progress: progress of each attack (tqdm on a terminal, log lines otherwise).
        checks / check_samples: run the sanity checks (checks.py, FLAGS.md) on the first
            check_samples points.
        compile: run the attacks on ``torch.compile(model, dynamic=True)`` (opt-in).

    Returns {"clean_accuracy", "robust_accuracy", "per_attack" (cumulative robust accuracy
    after each stage), "timings" (seconds per stage, "checks", "total"), "flags", "n"}.
    """
    y, norm, batch_size = _validate_eval(model, x, y, suite, batch_size, norm, seed, check_samples)
    eps = C.check_budget(eps, x)
    device = C.model_device(model, x.device)
    t_start = time.perf_counter()
    with C.eval_mode(model):
        with torch.no_grad():
            n_classes = C.check_logits(model(x[:1].to(device)), y, rows=1, what="evaluate")
        run = _maybe_compile(model, compile)
        clean = _clean_pass(run, x, y, batch_size=batch_size, device=device)
        out, _, _ = _evaluate(run, x, y, eps=eps, suite=suite, batch_size=batch_size, norm=norm, seed=seed,
                              progress=progress, checks=checks, check_samples=check_samples, device=device,
                              clean=clean, label=f"eps {_fmt_eps(eps)} ")
        if checks and check_samples > 0:
            flags, t = _run_checks(model, x, y, measured=[(eps, out["robust_accuracy"])], norm=norm, seed=seed,
                                   check_samples=check_samples, device=device, n_classes=n_classes)
            out["flags"] = flags + out["flags"]
            out["timings"]["checks"] = out["timings"].get("checks", 0.0) + t
    out["timings"]["total"] = time.perf_counter() - t_start
    K.warn(out["flags"])
    return out


def accuracy_vs_eps(model, x, y, *, eps_list, suite="standard", batch_size=256, norm="linf", seed=0,
                    progress=True, checks=True, check_samples=64, compile=False, return_points=False):
    """Robust accuracy for each eps in eps_list (the "large perturbations" curve), monotone by
    construction: the eps run in increasing order, a point broken at a smaller eps counts as
    broken at the larger ones and is not attacked again, and each larger eps starts its first
    attack from the best point found so far. So robust accuracy never rises with eps.

    Returns {"clean_accuracy", "results": [{"eps", "robust_accuracy", "per_attack", "flags",
    "timings"}, ...] in the order of eps_list, "flags": run-level flags}. The timings of an
    eps cover only the work done at it (the points still unbroken). The model-level checks
    (probabilities, randomness, zero gradients) and the large-eps chance check run once and
    are reported in the top-level "flags"; the per-eps checks (single-step, black-box, more
    iterations) in each result's "flags". The chance check uses the curve's value at its
    largest eps when that eps is >= 0.5 (linf) / 0.5 sqrt(d) (l2), else a probe.

    ``return_points=True`` adds "robust" to each result: a (N,) bool CPU tensor, True where the
    point is classified correctly and no attack broke it at that eps.
    """
    y, norm, batch_size = _validate_eval(model, x, y, suite, batch_size, norm, seed, check_samples)
    if isinstance(eps_list, (str, bytes)) or not hasattr(eps_list, "__iter__"):
        raise TypeError(f"eps_list must be a list of floats >= 0, got {type(eps_list).__name__}")
    eps_list = [C.check_budget(e, x, name="eps_list[i]") for e in eps_list]
    if not eps_list or any(isinstance(e, torch.Tensor) for e in eps_list):
        raise ValueError("eps_list must be a non-empty list of floats >= 0")
    device = C.model_device(model, x.device)
    results = [None] * len(eps_list)
    top_flags = []
    with C.eval_mode(model):
        with torch.no_grad():
            n_classes = C.check_logits(model(x[:1].to(device)), y, rows=1, what="accuracy_vs_eps")
        run = _maybe_compile(model, compile)
        clean = _clean_pass(run, x, y, batch_size=batch_size, device=device)
        alive, best = None, None
        for k in sorted(range(len(eps_list)), key=lambda i: eps_list[i]):
            e = eps_list[k]
            r, alive, best = _evaluate(run, x, y, eps=e, suite=suite, batch_size=batch_size, norm=norm,
                                       seed=seed + k, progress=progress, checks=checks, check_samples=check_samples,
                                       device=device, clean=clean, alive=alive, x_start=best,
                                       label=f"eps {_fmt_eps(e)} ")
            results[k] = {"eps": e, "robust_accuracy": r["robust_accuracy"], "per_attack": r["per_attack"],
                          "flags": r["flags"], "timings": r["timings"]}
            if return_points:
                results[k]["robust"] = alive.detach().to("cpu", torch.bool).clone()
        if checks and check_samples > 0:
            flags, _ = _run_checks(model, x, y, measured=[(r["eps"], r["robust_accuracy"]) for r in results],
                                   norm=norm, seed=seed, check_samples=check_samples, device=device,
                                   n_classes=n_classes)
            top_flags += flags
    K.warn(top_flags + [f for r in results for f in r["flags"]])
    return {"clean_accuracy": int(clean[1].sum()) / x.shape[0], "results": results, "flags": top_flags}


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
