"""The attack suites and ``SweepState``: where a ``sweep`` stands, point by point.

Suites (each attack runs only on the points still classified correctly, so the robust
accuracy is the per-sample worst case over the suite):
  standard:  APGD-CE (100 it.) -> APGD-T (targeted DLR, 9 targets, 100 it.) -> Square (5000 queries)
  quick:     APGD-CE (20 it.)  -> APGD-T (targeted DLR, 3 targets, 20 it.)
  paper:     the DRP paper's attack: L-inf PGD on the model's own distance to the true
             prototype, step eps/4, 20 it., no random start (``paper_pgd``). ProtoClassifier only.
  paper-100: the same with the authors' 100 iterations.
The stages of each suite are built in ``sweep.py``.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _common as C

__all__ = ["SUITES", "SweepState", "check_suite", "run_order"]

SUITES = {
    "standard": {"ce_steps": 100, "t_steps": 100, "n_targets": 9, "square_queries": 5000},
    "quick": {"ce_steps": 20, "t_steps": 20, "n_targets": 3, "square_queries": 0},
    "paper": {"paper_steps": 20},
    "paper-100": {"paper_steps": 100},
}

_STATE_FORMAT = "drp-sweep-state/1"


def check_suite(suite):
    if not isinstance(suite, str) or suite not in SUITES:
        raise ValueError(f"suite must be one of {tuple(SUITES)}, got {suite!r}")
    return SUITES[suite]


def run_order(eps_list):
    """The positions of eps_list in the order they run: increasing eps, ties in the given order."""
    return sorted(range(len(eps_list)), key=lambda i: float(eps_list[i]) if not isinstance(eps_list[i], torch.Tensor)
                  else 0.0)


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
        check_suite(suite)
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
        # seconds per stage at each eps, summed over the processes and runs this state went through
        # (saved with it, so a resumed evaluation reports the time before the interrupt too)
        self.timings = [{} for _ in self.eps_list]

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
                "start_x": (self.start_x.clone() if (starts and self.start_x is not None) else None),
                "timings": [{str(a): float(b) for a, b in t.items()} for t in self.timings]}

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
        tm = d.get("timings")  # absent from states saved before timings were kept
        if tm is not None:
            if not isinstance(tm, list) or len(tm) != k or not all(isinstance(t, dict) for t in tm):
                raise ValueError(f"sweep state: timings must be a list of {k} dicts (one per eps)")
            st.timings = [{str(a): float(b) for a, b in t.items()} for t in tm]
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
        # a point's warm start comes from the state whose row was kept: another state's start
        # for it belongs to another stage
        source = torch.cat([torch.full((s.index.numel(),), k, dtype=torch.int64) for k, s in enumerate(states)])[keep]
        owner = dict(zip(out.index.tolist(), source.tolist()))
        wanted = set(out.index[out._needs_start()].tolist())
        parts, seen = [], set()
        for k, s in enumerate(states):
            if s.start_x is None or not s.start_index.numel():
                continue
            pick = []
            for i, v in enumerate(s.start_index.tolist()):
                if v in wanted and v not in seen and owner[v] == k:
                    pick.append(i)
                    seen.add(v)
            if pick:
                p = torch.tensor(pick, dtype=torch.int64)
                parts.append((s.start_index[p], s.start_x[p]))
        if parts:
            out.start_index = torch.cat([a for a, _ in parts])
            out.start_x = torch.cat([b for _, b in parts])
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
