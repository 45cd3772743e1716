"""``sweep``: the attacks of a suite over a list of eps, point by point, resumable and shardable.

The suites are in ``sweep_state.py``; ``stages_of`` builds their stages for a model. APGD-T uses
min(n_targets, C - 1) targets; for C = 3 it is replaced by untargeted APGD-DLR ("apgd-dlr") and
for C = 2 it is skipped. Under norm="l2" APGD runs its L2 step and Square its
L2 proposal. The paper suites are L-inf only.

Results are a function of (model, point, eps, suite, seed) alone: every random draw is keyed
by the seed, the point's index in the dataset (``index``, default its row) and what the draw is
for (``_keys.py``), every attack iterates each point on its own (a point leaves the working
batch when it breaks; the others go on exactly as before), and on the CPU the model is called
so that a row's output does not depend on the rest of its batch (``StableRows``). So each
point's robust/broken verdict, and every number, is the same whatever the batch size, the
order of the points, a shard over processes or a resumed run. (On CUDA, cuBLAS/cuDNN may pick
other kernels for other batch sizes, which can flip a point at the decision boundary.)

Scale: ``accuracy_vs_eps`` = ``sweep`` (the attacks, resumable from a ``SweepState`` and
reporting after every batch) followed by ``sweep_report`` (the numbers and the sanity checks).
Run ``sweep`` on shards of the points in several processes, ``SweepState.merge`` the states,
and ``sweep_report`` the whole: the result is the single-process one.
"""
from __future__ import annotations

import contextlib
import signal
import threading
import time
from typing import Callable, Optional

import torch

from .._validate import check_int
from . import _common as C
from . import _keys as R
from . import checks as sanity
from ._progress import StageProgress
from .apgd import _apgd, n_runs
from .paper import _paper_pgd, check_proto_classifier
from .square import _square
from .sweep_state import SUITES, SweepState, check_suite, run_order

__all__ = ["sweep", "stages_of", "clean_pass", "eps_key_parts", "validate_eval", "check_eps_list", "maybe_compile",
           "run_sweep", "stage_counts"]

_PER_SAMPLE_EPS_KEY = R.MASK64  # the key part of a per-sample (tensor) budget


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stages_of(cfg, n_classes, norm, max_rows):
    """[(name, purpose, iterations per point, fn(model, x, y, eps, keys, clean_logits, x_start, progress)
    -> (x_adv, fooled))] for the suite and this model. Only the first stage uses x_start; purpose
    names the stage's random draws (``_keys.STAGE_IDS``). max_rows bounds APGD's stacked batch
    (several targets of the same points side by side)."""
    if "paper_steps" in cfg:
        steps = cfg["paper_steps"]
        return [(f"paper-pgd-{steps}", "paper-pgd", steps, lambda m, x, y, e, k, lg, x0, pr: _paper_pgd(
            m, x, y, eps=e, steps=steps, x_start=x0, progress=pr))]
    stages = [("apgd-ce", "apgd-ce", cfg["ce_steps"], lambda m, x, y, e, k, lg, x0, pr: _apgd(
        m, x, y, eps=e, steps=cfg["ce_steps"], norm=norm, loss="ce", restarts=1, n_target_classes=1,
        keys=k, clean_logits=lg, x_start=x0, progress=pr))]
    if n_classes >= 4:
        nt = min(cfg["n_targets"], n_classes - 1)
        stages.append(("apgd-t", "apgd-t", n_runs("dlr-t", 1, nt) * cfg["t_steps"],
                       lambda m, x, y, e, k, lg, x0, pr: _apgd(
                           m, x, y, eps=e, steps=cfg["t_steps"], norm=norm, loss="dlr-t", restarts=1,
                           n_target_classes=nt, keys=k, clean_logits=lg, progress=pr, max_rows=max_rows)))
    elif n_classes == 3:
        stages.append(("apgd-dlr", "apgd-dlr", cfg["t_steps"], lambda m, x, y, e, k, lg, x0, pr: _apgd(
            m, x, y, eps=e, steps=cfg["t_steps"], norm=norm, loss="dlr", restarts=1, n_target_classes=1,
            keys=k, clean_logits=lg, progress=pr)))
    if cfg["square_queries"] > 0 and n_classes >= 2:
        stages.append(("square", "square", cfg["square_queries"], lambda m, x, y, e, k, lg, x0, pr: _square(
            m, x, y, eps=e, queries=cfg["square_queries"], p_init=0.8, keys=k, norm=norm, clean_logits=lg,
            progress=pr)))
    return stages


def clean_pass(model, x, y, *, batch_size, device):
    """Clean logits (on the CPU, computed once per run) and the per-point correctness."""
    outs = []
    with torch.no_grad():
        for start in range(0, x.shape[0], batch_size):
            outs.append(model(x[start:start + batch_size].to(device)).cpu())
    logits = torch.cat(outs)
    return logits, logits.argmax(dim=1) == y.cpu()


def _fmt_eps(eps):
    return f"{eps:g}" if not isinstance(eps, torch.Tensor) else "per-sample"


def eps_key_parts(eps_list, order):
    """Per eps (in eps_list's order), the key part of its draws: its value's bits, and how many
    times the same value came before it in the run order (a repeated eps draws afresh)."""
    seen, parts = {}, [None] * len(eps_list)
    for k in order:
        e = eps_list[k]
        if isinstance(e, torch.Tensor):
            parts[k] = (_PER_SAMPLE_EPS_KEY, 0)
            continue
        v = R.eps_part(e)
        parts[k] = (v, seen.get(v, 0))
        seen[v] = seen.get(v, 0) + 1
    return parts


def validate_eval(model, x, y, suite, batch_size, norm, seed, check_samples):
    y, _, norm = C.validate_attack(model, x, y, norm=norm)
    cfg = check_suite(suite)
    batch_size = C.check_positive_int(batch_size, name="batch_size")
    C.check_positive_int(check_samples, name="check_samples", minimum=0)
    check_int("seed", seed, 0)
    if x.shape[0] == 0:
        raise ValueError("x must hold at least one sample")
    if "paper_steps" in cfg:
        check_proto_classifier(model, what=f"suite={suite!r} (the DRP paper's attack)")
        if norm != "linf":
            raise ValueError(f"suite={suite!r} is the paper's L-inf attack, so norm must be 'linf', got {norm!r}")
    elif cfg["square_queries"] > 0 and x.dim() != 4:
        raise ValueError(f"x must be a 4-D NCHW tensor for suite={suite!r} (Square), got shape {tuple(x.shape)}")
    return y, norm, batch_size


def check_eps_list(eps_list, x):
    if isinstance(eps_list, (str, bytes)) or not hasattr(eps_list, "__iter__"):
        raise TypeError(f"eps_list must be a list of floats >= 0, got {type(eps_list).__name__}")
    eps_list = [C.check_budget(e, x, name="eps_list[i]") for e in eps_list]
    if not eps_list or any(isinstance(e, torch.Tensor) for e in eps_list):
        raise ValueError("eps_list must be a non-empty list of floats >= 0")
    return eps_list


def maybe_compile(model, compile):
    """``torch.compile(model, dynamic=True)`` when asked (the point counts change as points
    break); the attacks then call the compiled module. Off by default: on the CPU it costs
    minutes of compilation and did not pay on the small CNNs measured (bench/RESULTS.md)."""
    if isinstance(compile, bool) and compile:
        return torch.compile(model, dynamic=True)
    if not isinstance(compile, bool):
        raise TypeError(f"compile must be a bool, got {type(compile).__name__}")
    return model


@contextlib.contextmanager
def _uninterrupted():
    """SIGINT and SIGTERM held back while a chunk's results are committed to the state, so that
    Ctrl-C never leaves it half updated: their handlers are swapped for one that only notes the
    signal, and the noted signal is handled (KeyboardInterrupt, or the original action) at the end
    of the block. Main thread only (where Python runs signal handlers); elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    noted = []
    sigs = [signal.SIGINT] + ([signal.SIGTERM] if hasattr(signal, "SIGTERM") else [])
    old = {sig: signal.signal(sig, lambda signum, frame: noted.append(signum)) for sig in sigs}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        if noted:
            handler = old[noted[0]]
            if callable(handler):
                handler(noted[0], None)  # Python's SIGINT handler raises KeyboardInterrupt
            elif handler == signal.SIG_DFL:
                signal.raise_signal(noted[0])


def run_sweep(run, x, y, state, *, eps_list, cfg, norm, batch_size, progress, device, clean, on_batch):
    """The attacks of ``state``'s remaining steps, stage by stage (AutoAttack's order): each stage
    runs on every point still robust that has not been through it, in chunks of at most
    ``batch_size`` of THOSE points, so the later stages, which see few points, run them in one
    full batch instead of many small ones. ``state`` is updated after every chunk (then
    ``on_batch(state)`` is called); an exception leaves it as it was after the last chunk."""
    logits_all, correct = clean
    stages = stages_of(cfg, logits_all.shape[1], norm, batch_size)
    order = run_order(eps_list)
    eps_keys = eps_key_parts(eps_list, order)
    total = len(eps_list) * len(stages)
    state.correct = correct.to(torch.int8)
    state.pos[~correct] = total
    best = x.clone()
    best_set = torch.zeros(x.shape[0], dtype=torch.bool)
    if state.start_x is not None:
        rows = state._needs_start().nonzero().squeeze(1)
        if rows.numel():
            best[rows] = state.starts_for(rows, x[rows])
            best_set[rows] = True
    state._live = (best, best_set)
    try:
        for step in range(total):
            _sweep_step(run, x, y, state, step, stages=stages, order=order, eps_keys=eps_keys, eps_list=eps_list,
                        norm=norm, batch_size=batch_size, progress=progress, device=device, logits_all=logits_all,
                        best=best, best_set=best_set, on_batch=on_batch)
    finally:
        state.set_starts(best, best_set)
        state._live = None
    return state


def _sweep_step(run, x, y, state, step, *, stages, order, eps_keys, eps_list, norm, batch_size, progress, device,
                logits_all, best, best_set, on_batch):
    """One step of the sweep: one stage at one eps, on the points still robust that are at it."""
    n_st = len(stages)
    total = len(eps_list) * n_st
    kpos, si = divmod(step, n_st)
    k = order[kpos]
    eps = eps_list[k]
    name, purpose, iters, fn = stages[si]
    todo = (state.alive() & (state.pos == step)).nonzero().squeeze(1)
    if todo.numel() == 0:
        return
    label = f"eps {_fmt_eps(eps)} "
    if not isinstance(eps, torch.Tensor) and eps == 0.0:  # the ball is the point itself: nothing moves
        with _uninterrupted():
            state.pos[todo] = step + 1
        if on_batch is not None:
            on_batch(state)
        return
    chunks = list(torch.split(todo, batch_size))
    bar = StageProgress(f"{label}{name}", total=iters * len(chunks), points=todo.numel(), enabled=progress)
    left_other = todo.numel()
    finished = False
    try:
        for chunk in chunks:
            left_other -= chunk.numel()
            bar.offset = left_other
            t1 = time.perf_counter()
            at = chunk.to(x.device)
            xs, ys = x[at].to(device), y[at].to(device)
            es = eps[at].to(device) if isinstance(eps, torch.Tensor) else eps
            x0 = best[at].to(device) if (kpos > 0 and si == 0) else None
            keys = R.point_keys(state.seed, state.index[chunk], R.STAGE_IDS[purpose], *eps_keys[k])
            x_adv, fooled = fn(run, xs, ys, es, keys, logits_all[chunk].to(device), x0, bar)
            # the attack's own verdict (from the logits of exactly these points), plus the budget
            broken = (fooled & sanity.in_ball(x_adv, xs, es, norm)).cpu()
            x_adv = x_adv.to(best.device, best.dtype)
            new_pos = torch.where(broken, torch.tensor(total, dtype=torch.int32),
                                  torch.tensor(step + 1, dtype=torch.int32))
            _sync(device)
            with _uninterrupted():  # the chunk's results, all or nothing
                state.broken[k, chunk[broken]] = si
                state.pos[chunk] = new_pos
                best[at] = x_adv
                best_set[chunk] = True
            state.timings[k][name] = state.timings[k].get(name, 0.0) + time.perf_counter() - t1
            left_other += chunk.numel() - int(broken.sum())
            if on_batch is not None:
                on_batch(state)
        finished = True
    finally:
        if finished:
            bar.close(left=int((state.alive() & (state.pos > step)).sum()))
        else:
            bar.close(interrupted=True)


def sweep(model, x, y, *, eps_list, suite="standard", norm="linf", seed=0, batch_size=256, index=None, state=None,
          progress=True, on_batch: Optional[Callable] = None, compile=False) -> SweepState:
    """The attacks of ``accuracy_vs_eps`` without its report: returns a ``SweepState`` with each
    point's clean correctness and, per eps, the stage that broke it (``sweep_report`` turns it
    into numbers).

    index: (N,) integer tensor, each point's index in the dataset (default: its row); it keys
        the point's random draws, so a point gets the same verdict in any shard or batch.
    state: a ``SweepState`` to continue (from ``SweepState.from_dict``, or an interrupted call's
        own): points it has been through a step are not attacked there again. It must be of the
        same eps list, suite, norm, seed and points (ValueError naming what differs). It is
        updated in place after every chunk of every stage, and ``on_batch(state)`` is called
        then; after an exception (Ctrl-C) it is as the last chunk left it.
    The other arguments are ``accuracy_vs_eps``'s.
    """
    y, norm, batch_size = validate_eval(model, x, y, suite, batch_size, norm, seed, 0)
    eps_list = check_eps_list(eps_list, x)
    index = C.check_index(index, x)
    if state is None:
        state = SweepState(index=index, eps_list=eps_list, suite=suite, norm=norm, seed=seed)
    else:
        if not isinstance(state, SweepState):
            raise TypeError(f"state must be a SweepState or None, got {type(state).__name__}")
        why = state.mismatch({"eps_list": [float(e) for e in eps_list], "suite": suite, "norm": norm, "seed": seed,
                              "stages": None})
        if why is None and not torch.equal(state.index, index):
            why = "points (its index differs from index)"
        if why is not None:
            raise ValueError(f"state is of another sweep: {why}")
    if on_batch is not None and not callable(on_batch):
        raise TypeError(f"on_batch must be callable or None, got {type(on_batch).__name__}")
    device = C.model_device(model, x.device)
    with C.eval_mode(model):
        with torch.no_grad():
            n_classes = C.check_logits(model(x[:1].to(device)), y, rows=1, what="sweep")
        names = [s[0] for s in stages_of(SUITES[suite], n_classes, norm, batch_size)]
        if state.stages is not None and state.stages != names:
            raise ValueError(f"state is of another sweep: stages ({state.stages!r} there, {names!r} here)")
        state.stages = names
        run = C.stable_rows(maybe_compile(model, compile))
        clean = clean_pass(run, x, y, batch_size=batch_size, device=device)
        run_sweep(run, x, y, state, eps_list=eps_list, cfg=SUITES[suite], norm=norm, batch_size=batch_size,
               progress=progress, device=device, clean=clean, on_batch=on_batch)
    return state


def stage_counts(state):
    """Per eps (eps_list's order): (robust mask, {stage: count robust after it}, Square's breaks)."""
    correct = state.correct == 1
    alive = correct.clone()
    out = [None] * len(state.eps_list)
    for k in run_order(state.eps_list):
        b = state.broken[k]
        per = {}
        for si, name in enumerate(state.stages):
            per[name] = int((alive & ~((b >= 0) & (b <= si))).sum())
        robust = alive & (b < 0)
        sq = state.stages.index("square") if "square" in state.stages else None
        out[k] = (robust, per, 0 if sq is None else int((b == sq).sum()))
        alive = robust
    return out
