"""``separation``: how far apart a set of prototypes is, and the known optima it is measured against."""
from __future__ import annotations

import math
from typing import Optional

import torch

from .._validate import check_int, check_matrix, check_metric

__all__ = ["separation", "optimum_max_cosine"]


def optimum_max_cosine(C: int, D: int) -> Optional[float]:
    """Smallest achievable max pairwise cosine of C unit vectors in R^D, where it is known."""
    if C <= D + 1:
        return -1.0 / (C - 1)  # regular simplex
    if C <= 2 * D:
        return 0.0  # cross-polytope (and no C > D + 1 vectors have all cosines < 0)
    return None


def separation(P, *, metric, block_rows=2048) -> dict:
    """How far apart the rows of P (C >= 2) are. Works in row blocks: memory O(block_rows * C).

    Returns a dict:
      ``min_distance``, ``mean_distance``: over pairs i != j, in ``metric`` (cosine distance is
          1 - cos);
      ``max_cosine``: the largest pairwise cosine similarity (whatever the metric);
      ``optimum``: the known optimum of the metric's headline quantity for this C and D, or None:
          cosine -> the smallest achievable ``max_cosine``: -1/(C-1) for C <= D+1 (regular simplex),
              0 for D+1 < C <= 2D (cross-polytope), None beyond;
          l2 -> the largest achievable ``min_distance`` sqrt(2 - 2 c) of unit vectors (c the cosine
              optimum above), only when every row has unit norm (within 1e-3), else None;
          linf -> 2, the largest achievable ``min_distance`` in the box [-1, 1]^D, when every entry
              lies in the box (within 1e-5) and C <= 2^D, else None (e.g. the unconstrained paper
              prototypes);
      ``optimum_of``: "max_cosine" (cosine) or "min_distance" (l2, linf);
      ``gap``: how far P is from ``optimum`` (>= 0 up to rounding), or None.
    """
    P = check_matrix("P", P)
    check_metric(metric)
    C, D = P.shape
    if C < 2:
        raise ValueError(f"P needs at least 2 rows to measure separation, got shape {tuple(P.shape)}")
    block_rows = check_int("block_rows", block_rows, 1)
    cd = torch.float64 if P.dtype == torch.float64 else torch.float32
    x = P.detach().to(cd)
    norms = torch.linalg.vector_norm(x, dim=1)
    d_min, d_sum, c_max = math.inf, 0.0, -math.inf
    for r0 in range(0, C, block_rows):
        r1 = min(C, r0 + block_rows)
        # dot products of the raw rows, then one division: exact zeros stay zero (normalising
        # first leaves rounding residue such as 1e-8 between orthogonal +-1 rows)
        cos = (x[r0:r1] @ x.T) / (norms[r0:r1, None] * norms[None, :]).clamp_min(1e-16)
        if metric == "cosine":
            d = 1.0 - cos
        elif metric == "l2":
            d = torch.cdist(x[r0:r1], x, p=2.0)
        else:
            d = torch.cdist(x[r0:r1], x, p=math.inf)
        rows = torch.arange(r0, r1, device=x.device)
        diag = torch.zeros(r1 - r0, C, dtype=torch.bool, device=x.device)
        diag[rows - r0, rows] = True
        d_min = min(d_min, d.masked_fill(diag, math.inf).min().item())
        d_sum += d.masked_fill(diag, 0.0).sum().item()
        c_max = max(c_max, cos.masked_fill(diag, -math.inf).max().item())
    out = {"min_distance": d_min, "mean_distance": d_sum / (C * (C - 1)), "max_cosine": c_max}
    c_opt = optimum_max_cosine(C, D)
    if metric == "cosine":
        optimum, of = c_opt, "max_cosine"
    elif metric == "l2":
        norms = torch.linalg.vector_norm(x, dim=1)
        unit = bool(((norms - 1.0).abs() <= 1e-3).all())
        optimum = math.sqrt(2.0 - 2.0 * c_opt) if (unit and c_opt is not None) else None
        of = "min_distance"
    else:
        in_box = bool((x.abs() <= 1.0 + 1e-5).all())
        optimum = 2.0 if (in_box and (D >= 63 or C <= 2 ** D)) else None
        of = "min_distance"
    gap = None
    if optimum is not None:
        gap = out[of] - optimum if of == "max_cosine" else optimum - out[of]
    out.update(optimum=optimum, optimum_of=of, gap=gap)
    return out
