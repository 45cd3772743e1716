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
("apgd-dlr") and for C = 2 it is skipped. Under norm="l2" APGD runs its L2 step and Square its
L2 proposal. The paper suites are L-inf only.

``per_attack`` maps each stage to the CUMULATIVE robust accuracy after it (AutoAttack's
log): per_attack[last stage] == robust_accuracy. Stage names: "apgd-ce", "apgd-t"
(or "apgd-dlr"), "square", "paper-pgd-20" / "paper-pgd-100". Every accuracy comes with its
count (``clean_count``, ``robust_count``, ``per_attack_counts``) and ``n``; the fractions are
count / n in float64.

Results are a function of (model, point, eps, suite, seed) alone: every random draw is keyed
by the seed, the point's index in the dataset (``index``, default its row) and what the draw is
for (``_keys.py``), every attack iterates each point on its own (a point leaves the working
batch when it breaks; the others go on exactly as before), and on the CPU the model is called
so that a row's output does not depend on the rest of its batch (``StableRows``). So each
point's robust/broken verdict, and every number, is the same whatever the batch size, the
order of the points, a shard over processes or a resumed run. (On CUDA, cuBLAS/cuDNN may pick
other kernels for other batch sizes, which can flip a point at the decision boundary.)

``accuracy_vs_eps`` is monotone by construction: it runs the eps in increasing order, a
point broken at a smaller eps counts as broken at every larger one (the same adversarial
example lies in the larger ball) and is not attacked again, and the first attack at each
larger eps starts from the best point found so far for every remaining point.

Scale: ``accuracy_vs_eps`` = ``sweep`` (the attacks, resumable from a ``SweepState`` and
reporting after every batch) followed by ``sweep_report`` (the numbers and the sanity checks).
Run ``sweep`` on shards of the points in several processes, ``SweepState.merge`` the states,
and ``sweep_report`` the whole: the result is the single-process one.

The sanity checks and their flags live in ``checks.py``; FLAGS.md explains each flag.
"""
from __future__ import annotations

import contextlib
import signal
import threading
import time
from typing import Callable, Optional

import torch

from . import _common as C
from . import _keys as R
from . import checks as K
from ._progress import StageProgress
from .apgd import _apgd, apgd, n_runs
from .fgsm_pgd import fgsm, pgd
from .hsj import hop_skip_jump
from .paper import _paper_pgd, check_proto_classifier, paper_pgd
from .square import _square, square

__all__ = ["evaluate", "accuracy_vs_eps", "sweep", "sweep_report", "SweepState", "transfer", "SUITES"]

SUITES = {
    "standard": {"ce_steps": 100, "t_steps": 100, "n_targets": 9, "square_queries": 5000},
    "quick": {"ce_steps": 20, "t_steps": 20, "n_targets": 3, "square_queries": 0},
    "paper": {"paper_steps": 20},
    "paper-100": {"paper_steps": 100},
}

_STATE_FORMAT = "drp-sweep-state/1"
_PER_SAMPLE_EPS_KEY = R.MASK64  # the key part of a per-sample (tensor) budget


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _check_suite(suite):
    if not isinstance(suite, str) or suite not in SUITES:
        raise ValueError(f"suite must be one of {tuple(SUITES)}, got {suite!r}")
    return SUITES[suite]


def _stages(cfg, n_classes, norm, max_rows):
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


def _eps_keys(eps_list, order):
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


def _run_order(eps_list):
    """The positions of eps_list in the order they run: increasing eps, ties in the given order."""
    return sorted(range(len(eps_list)), key=lambda i: float(eps_list[i]) if not isinstance(eps_list[i], torch.Tensor)
                  else 0.0)


# ------------------------------------------------------------------------- state
class SweepState:
    """Where a ``sweep`` stands, point by point, and what it found: enough to resume it, to merge
    the shards of a sharded run, and to report it (``sweep_report``).

    A point goes through the steps (eps in increasing order, then the suite's stages) one after
    the other. Per point (N of them, K eps, S stages):

    * ``index``: (N,) int64, its index in the dataset (the key of its random draws);
    * ``correct``: (N,) int8, 1 if classified correctly, 0 if not, -1 not known yet;
    * ``pos``: (N,) int32, how many steps it has been through (K * S once it is done or broken);
    * ``broken``: (K, N) int8, per eps (in ``eps_list``'s order) the stage that broke it there, -1 none;
    * its warm start for the next eps: the best point of the last stage it went through.

    ``to_dict`` gives plain tensors and lists (``torch.save`` / ``torch.load(weights_only=True)``),
    ``from_dict`` reads them back; ``merge`` joins the states of disjoint (or overlapping) shards;
    ``select`` takes a subset of the points (points it lacks start afresh).
    """

    def __init__(self, *, index, eps_list, suite, norm, seed, stages=None):
        if not isinstance(index, torch.Tensor) or index.dim() != 1 or index.dtype.is_floating_point \
                or index.dtype == torch.bool:
            raise ValueError("index must be a 1-D integer tensor (the points' indices in the dataset)")
        _check_suite(suite)
        C.check_norm(norm)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.index = index.detach().to("cpu", torch.int64).clone()
        self.eps_list = [float(e) for e in eps_list]
        self.suite, self.norm, self.seed = suite, norm, int(seed)
        self.stages = None if stages is None else list(stages)
        n = self.index.shape[0]
        self.correct = torch.full((n,), -1, dtype=torch.int8)
        self.pos = torch.zeros(n, dtype=torch.int32)
        self.broken = torch.full((len(self.eps_list), n), -1, dtype=torch.int8)
        self.start_index = torch.zeros(0, dtype=torch.int64)  # warm starts of points between two eps
        self.start_x = None
        self._live = None  # during a sweep: (best points (N, ...), set by an attack (N,)), read by to_dict
        self.timings = [{} for _ in self.eps_list]  # seconds per stage at each eps, this process only

    # -------------------------------------------------------------- shape of the run
    @property
    def n(self) -> int:
        return int(self.index.shape[0])

    @property
    def n_steps(self) -> Optional[int]:
        return None if self.stages is None else len(self.eps_list) * len(self.stages)

    def alive(self) -> torch.Tensor:
        """(N,) bool: classified correctly and not broken so far."""
        return (self.correct == 1) & (self.broken < 0).all(dim=0)

    def complete(self) -> bool:
        """Every point done: known correctness, and every step gone through (or broken, or wrong)."""
        if self.stages is None or bool((self.correct < 0).any()):
            return False
        return bool(((self.pos >= self.n_steps) | ~self.alive()).all())

    def meta(self) -> dict:
        return {"eps_list": list(self.eps_list), "suite": self.suite, "norm": self.norm, "seed": self.seed,
                "stages": None if self.stages is None else list(self.stages)}

    def mismatch(self, other: "SweepState | dict") -> Optional[str]:
        """The first of eps list, suite, norm, seed, stages where ``other`` (a state or its meta)
        differs, as 'what (theirs vs ours)', or None."""
        theirs = other.meta() if isinstance(other, SweepState) else other
        ours = self.meta()
        for key, what in (("eps_list", "eps list"), ("suite", "suite"), ("norm", "norm"), ("seed", "seed"),
                          ("stages", "stages")):
            if key == "stages" and (theirs.get(key) is None or ours.get(key) is None):
                continue
            if theirs.get(key) != ours.get(key):
                return f"{what} ({theirs.get(key)!r} there, {ours.get(key)!r} here)"
        return None

    # --------------------------------------------------------------------- warm starts
    def _needs_start(self) -> torch.Tensor:
        """Points whose next step is the first stage of a larger eps: they start there from the
        best point of their last stage."""
        if self.stages is None:
            return torch.zeros(self.n, dtype=torch.bool)
        s = len(self.stages)
        return self.alive() & (self.pos > 0) & (self.pos < self.n_steps) & (self.pos % s == 0)

    def starts_for(self, rows: torch.Tensor, x_rows: torch.Tensor) -> torch.Tensor:
        """The warm starts of the points at ``rows`` (x itself where none is recorded)."""
        out = x_rows.clone()
        if self.start_x is None or self.start_index.numel() == 0:
            return out
        want = self.index[rows]
        where = {int(v): i for i, v in enumerate(self.start_index.tolist())}
        for j, v in enumerate(want.tolist()):
            i = where.get(v)
            if i is not None:
                out[j] = self.start_x[i].to(out.device, out.dtype)
        return out

    def set_starts(self, best: torch.Tensor, best_set: torch.Tensor) -> None:
        """Keep the warm starts the state still needs from ``best`` (N, ...) rows set by an attack."""
        need = (self._needs_start() & best_set).nonzero().squeeze(1)
        self.start_index = self.index[need].clone()
        self.start_x = best[need].detach().cpu().clone() if need.numel() else None

    # -------------------------------------------------------------------- (de)serialise
    def to_dict(self, *, starts: bool = True) -> dict:
        if starts and self._live is not None:
            self.set_starts(*self._live)
        return {"format": _STATE_FORMAT, **self.meta(), "index": self.index.clone(), "correct": self.correct.clone(),
                "pos": self.pos.clone(), "broken": self.broken.clone(),
                "start_index": self.start_index.clone() if starts else torch.zeros(0, dtype=torch.int64),
                "start_x": (self.start_x.clone() if (starts and self.start_x is not None) else None)}

    @classmethod
    def from_dict(cls, d: dict) -> "SweepState":
        if not isinstance(d, dict) or d.get("format") != _STATE_FORMAT:
            raise ValueError(f"not a sweep state (expected format {_STATE_FORMAT!r})")
        st = cls(index=d["index"], eps_list=d["eps_list"], suite=d["suite"], norm=d["norm"], seed=d["seed"],
                 stages=d["stages"])
        n, k = st.n, len(st.eps_list)
        for name, shape in (("correct", (n,)), ("pos", (n,)), ("broken", (k, n))):
            t = d[name]
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
                raise ValueError(f"sweep state: {name} must have shape {shape}")
        st.correct = d["correct"].to(torch.int8).clone()
        st.pos = d["pos"].to(torch.int32).clone()
        st.broken = d["broken"].to(torch.int8).clone()
        st.start_index = d["start_index"].to(torch.int64).clone()
        st.start_x = None if d.get("start_x") is None else d["start_x"].clone()
        return st

    @classmethod
    def merge(cls, states) -> "SweepState":
        """One state over the union of the states' points (sorted by index). Where two states hold
        the same point, the one that got further wins. All must describe the same sweep."""
        states = list(states)
        if not states:
            raise ValueError("states: expected at least one SweepState")
        first = states[0]
        stages = next((s.stages for s in states if s.stages is not None), None)
        for s in states[1:]:
            why = first.mismatch(s)
            if why is not None:
                raise ValueError(f"cannot merge sweep states of different runs: {why}")
        index = torch.cat([s.index for s in states])
        pos = torch.cat([s.pos for s in states])
        # per index, the row that got furthest (ties: the first)
        order = sorted(range(index.numel()), key=lambda i: (int(index[i]), -int(pos[i]), i))
        keep, last = [], None
        for i in order:
            if int(index[i]) != last:
                keep.append(i)
                last = int(index[i])
        keep = torch.tensor(keep, dtype=torch.int64)
        out = cls(index=index[keep], eps_list=first.eps_list, suite=first.suite, norm=first.norm, seed=first.seed,
                  stages=stages)
        out.correct = torch.cat([s.correct for s in states])[keep]
        out.pos = pos[keep]
        out.broken = torch.cat([s.broken for s in states], dim=1)[:, keep]
        rows = [(s.start_index, s.start_x) for s in states if s.start_x is not None and s.start_index.numel()]
        if rows:
            wanted = set(out.index[out._needs_start()].tolist())
            si = torch.cat([r[0] for r in rows])
            sx = torch.cat([r[1] for r in rows])
            pick, seen = [], set()
            for i, v in enumerate(si.tolist()):
                if v in wanted and v not in seen:
                    pick.append(i)
                    seen.add(v)
            if pick:
                p = torch.tensor(pick, dtype=torch.int64)
                out.start_index, out.start_x = si[p], sx[p]
        for k in range(len(out.eps_list)):
            for s in states:
                for name, t in s.timings[k].items():
                    out.timings[k][name] = out.timings[k].get(name, 0.0) + t
        return out

    def select(self, index: torch.Tensor) -> "SweepState":
        """The state of the points ``index`` (in that order); points it does not hold start afresh."""
        index = index.detach().to("cpu", torch.int64)
        out = SweepState(index=index, eps_list=self.eps_list, suite=self.suite, norm=self.norm, seed=self.seed,
                         stages=self.stages)
        where = {int(v): i for i, v in enumerate(self.index.tolist())}
        mine = [(j, where[int(v)]) for j, v in enumerate(index.tolist()) if int(v) in where]
        if mine:
            dst = torch.tensor([a for a, _ in mine], dtype=torch.int64)
            src = torch.tensor([b for _, b in mine], dtype=torch.int64)
            out.correct[dst] = self.correct[src]
            out.pos[dst] = self.pos[src]
            out.broken[:, dst] = self.broken[:, src]
        if self.start_x is not None and self.start_index.numel():
            wanted = set(index.tolist())
            pick = [i for i, v in enumerate(self.start_index.tolist()) if v in wanted]
            if pick:
                p = torch.tensor(pick, dtype=torch.int64)
                out.start_index, out.start_x = self.start_index[p].clone(), self.start_x[p].clone()
        return out


# ------------------------------------------------------------------------ the sweep
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
    elif cfg["square_queries"] > 0 and x.dim() != 4:
        raise ValueError(f"x must be a 4-D NCHW tensor for suite={suite!r} (Square), got shape {tuple(x.shape)}")
    return y, norm, batch_size


def _check_eps_list(eps_list, x):
    if isinstance(eps_list, (str, bytes)) or not hasattr(eps_list, "__iter__"):
        raise TypeError(f"eps_list must be a list of floats >= 0, got {type(eps_list).__name__}")
    eps_list = [C.check_budget(e, x, name="eps_list[i]") for e in eps_list]
    if not eps_list or any(isinstance(e, torch.Tensor) for e in eps_list):
        raise ValueError("eps_list must be a non-empty list of floats >= 0")
    return eps_list


def _maybe_compile(model, compile):
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


def _sweep(run, x, y, state, *, eps_list, cfg, norm, batch_size, progress, device, clean, on_batch):
    """The attacks of ``state``'s remaining steps, stage by stage (AutoAttack's order): each stage
    runs on every point still robust that has not been through it, in chunks of at most
    ``batch_size`` of THOSE points, so the later stages, which see few points, run them in one
    full batch instead of many small ones. ``state`` is updated after every chunk (then
    ``on_batch(state)`` is called); an exception leaves it as it was after the last chunk."""
    logits_all, correct = clean
    stages = _stages(cfg, logits_all.shape[1], norm, batch_size)
    order = _run_order(eps_list)
    eps_keys = _eps_keys(eps_list, order)
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
            broken = (fooled & K.in_ball(x_adv, xs, es, norm)).cpu()
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
    finally:
        bar.close(left=int((state.alive() & (state.pos > step)).sum()))


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
    y, norm, batch_size = _validate_eval(model, x, y, suite, batch_size, norm, seed, 0)
    eps_list = _check_eps_list(eps_list, x)
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
        names = [s[0] for s in _stages(SUITES[suite], n_classes, norm, batch_size)]
        if state.stages is not None and state.stages != names:
            raise ValueError(f"state is of another sweep: stages ({state.stages!r} there, {names!r} here)")
        state.stages = names
        run = C.stable_rows(_maybe_compile(model, compile))
        clean = _clean_pass(run, x, y, batch_size=batch_size, device=device)
        _sweep(run, x, y, state, eps_list=eps_list, cfg=SUITES[suite], norm=norm, batch_size=batch_size,
               progress=progress, device=device, clean=clean, on_batch=on_batch)
    return state


def _counts(state):
    """Per eps (eps_list's order): (robust mask, {stage: count robust after it}, Square's breaks)."""
    correct = state.correct == 1
    alive = correct.clone()
    out = [None] * len(state.eps_list)
    for k in _run_order(state.eps_list):
        b = state.broken[k]
        per = {}
        for si, name in enumerate(state.stages):
            per[name] = int((alive & ~((b >= 0) & (b <= si))).sum())
        robust = alive & (b < 0)
        sq = state.stages.index("square") if "square" in state.stages else None
        out[k] = (robust, per, 0 if sq is None else int((b == sq).sum()))
        alive = robust
    return out


def _frac(count, n):
    return count / n if n else 0.0


def _report(model, x, y, state, *, checks, check_samples, compile, eps_values=None):
    """The numbers and the sanity checks of a complete ``state`` (no warnings issued).

    eps_values: the budgets themselves where they are not the state's floats (a per-sample tensor)."""
    n = state.n
    cfg = SUITES[state.suite]
    counts = _counts(state)
    order = _run_order(state.eps_list)
    eps_keys = _eps_keys(state.eps_list if eps_values is None else eps_values, order)
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
            run = C.stable_rows(_maybe_compile(model, compile))
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
                results[k]["flags"] = K.eps_checks(
                    run, xs, ys, robust[:m].to(device), eps=eps, suite=state.suite, cfg=cfg, norm=state.norm,
                    seed=state.seed, square_broken=square_broken, has_square="square" in state.stages,
                    index=state.index[:m], eps_key=R.derive_int(*eps_keys[k]))
                results[k]["timings"]["checks"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            with torch.no_grad():
                n_classes = C.check_logits(run(x[:1].to(device)), y, rows=1, what="sweep_report")
            top_flags = K.model_checks(run, xs, ys)
            measured = [] if eps_values is not None else [(r["eps"], r["robust_accuracy"]) for r in results]
            top_flags += K.chance_check(run, xs, ys, y.cpu(), measured=measured, norm=state.norm, seed=state.seed,
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
    y, _, _ = _validate_eval(model, x, y, state.suite, 1, state.norm, state.seed, check_samples)
    if x.shape[0] != state.n:
        raise ValueError(f"x must hold the state's {state.n} points, got {x.shape[0]}")
    if not state.complete():
        raise ValueError("state is not complete: some points still have steps to go (run sweep with it)")
    out = _report(model, x, y, state, checks=checks, check_samples=check_samples, compile=compile)
    if return_points:
        for r, (robust, _, _) in zip(out["results"], _counts(state)):
            r["robust"] = robust.clone()
    K.warn(out["flags"] + [f for r in out["results"] for f in r["flags"]])
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
    y, norm, batch_size = _validate_eval(model, x, y, suite, batch_size, norm, seed, check_samples)
    eps = C.check_budget(eps, x)
    index = C.check_index(index, x)
    t_start = time.perf_counter()
    per_sample = isinstance(eps, torch.Tensor)
    state = SweepState(index=index, eps_list=[0.0 if per_sample else eps], suite=suite, norm=norm, seed=seed)
    device = C.model_device(model, x.device)
    with C.eval_mode(model):
        with torch.no_grad():
            n_classes = C.check_logits(model(x[:1].to(device)), y, rows=1, what="evaluate")
        state.stages = [s[0] for s in _stages(SUITES[suite], n_classes, norm, batch_size)]
        run = C.stable_rows(_maybe_compile(model, compile))
        clean = _clean_pass(run, x, y, batch_size=batch_size, device=device)
        _sweep(run, x, y, state, eps_list=[eps], cfg=SUITES[suite], norm=norm, batch_size=batch_size,
               progress=progress, device=device, clean=clean, on_batch=None)
    rep = _report(model, x, y, state, checks=checks, check_samples=check_samples, compile=compile,
                  eps_values=[eps] if per_sample else None)
    r = rep["results"][0]
    flags = rep["flags"] + r["flags"]
    K.warn(flags)
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
    y, norm, batch_size = _validate_eval(model, x, y, suite, batch_size, norm, seed, check_samples)
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

