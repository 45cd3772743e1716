"""Progress of the evaluation engine: which attack is running and how many points remain.

On a terminal, one tqdm bar per attack stage, over the stage's iterations (APGD steps of
every run, Square queries, PGD steps), with the number of points still unbroken as its
postfix and tqdm's own time estimate. Elsewhere (a log file, CI), plain INFO lines on the
``drp_kernels.attacks`` logger, at most one per quarter of a stage plus one when it ends,
each with the points left and an ETA. The iteration totals assume that no point breaks, so
the ETA is an upper estimate that shrinks as points leave. ``enabled=False`` silences both.
"""
from __future__ import annotations

import logging
import sys
import time

__all__ = ["StageProgress"]

logger = logging.getLogger("drp_kernels.attacks")


def _is_terminal() -> bool:
    stream = sys.stderr
    return bool(getattr(stream, "isatty", None)) and stream.isatty()


def _fmt_seconds(t: float) -> str:
    t = max(0.0, float(t))
    if t < 60:
        return f"{t:.0f} s"
    if t < 3600:
        return f"{int(t // 60)} min {int(t % 60):02d} s"
    return f"{int(t // 3600)} h {int((t % 3600) // 60):02d} min"


class StageProgress:
    """Progress of one attack stage: ``total`` iterations over ``points`` points."""

    def __init__(self, desc: str, *, total: int, points: int, enabled: bool = True):
        self.desc, self.total, self.points = desc, max(int(total), 1), int(points)
        self.done, self.left = 0, int(points)
        self.offset = 0  # points left outside the part being attacked now (set by the caller)
        self.enabled = bool(enabled)
        self._bar = None
        self._next_log = 0.25
        self._t0 = time.perf_counter()
        if not self.enabled:
            return
        if _is_terminal():
            from tqdm.auto import tqdm  # imported only here: `import drp_kernels` does not need tqdm

            self._bar = tqdm(total=self.total, desc=desc, unit="it", leave=False, dynamic_ncols=True)
            self._bar.set_postfix_str(f"{self.left}/{self.points} points left", refresh=False)
        else:
            logger.info("%s: %d points, %d iterations", desc, self.points, self.total)

    def eta(self) -> str:
        """The time the stage still needs at its pace so far ("?" before the first iteration)."""
        if self.done == 0:
            return "?"
        elapsed = time.perf_counter() - self._t0
        return _fmt_seconds(elapsed / self.done * (self.total - self.done))

    def update(self, n: int = 1, *, left=None) -> None:
        """``n`` more iterations done; ``left``: points still unbroken in the part being attacked
        (None: unchanged); ``offset`` is added to it."""
        if not self.enabled:
            return
        self.done = min(self.total, self.done + int(n))
        if left is not None:
            self.left = int(left) + self.offset
        if self._bar is not None:
            if left is not None:
                self._bar.set_postfix_str(f"{self.left}/{self.points} points left", refresh=False)
            self._bar.update(int(n))
        elif self.done / self.total >= self._next_log and self.done < self.total:
            while self._next_log <= self.done / self.total:
                self._next_log += 0.25
            logger.info("%s: %d/%d iterations, %d/%d points left, ETA %s", self.desc, self.done, self.total,
                        self.left, self.points, self.eta())

    def close(self, *, left=None, interrupted: bool = False) -> None:
        """End the stage; ``interrupted``: it stopped early (an exception), so the line says where
        it stopped instead of a count of points left that the stage never finished."""
        if not self.enabled:
            return
        if left is not None:
            self.left = int(left)
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif interrupted:
            logger.info("%s: stopped after %.1f s at %d/%d iterations", self.desc, time.perf_counter() - self._t0,
                        self.done, self.total)
        else:
            logger.info("%s: done in %.1f s, %d/%d points left", self.desc, time.perf_counter() - self._t0,
                        self.left, self.points)
        self.enabled = False
