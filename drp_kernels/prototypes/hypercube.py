"""The hypercube search of ``repulsive_prototypes(method="hypercube")``.

``"hypercube"`` (any metric, on request): C distinct corners of the box [-1, 1]^D, i.e. a binary
code with +-1 entries. Any two distinct corners are at L-inf distance 2, the largest
L-inf distance two points of the box can have, so the minimum pairwise L-inf distance is optimal.
Among such codes it keeps the Hamming distances large and even (which is what the paper's
decision rule and the cosine geometry see): D <= 12 picks corners one by one, each farthest in
Hamming distance from those already chosen; larger D builds the code column by column, each
column splitting the classes into two halves, chosen among random candidates to split the pairs
that are still closest and to lift the smallest pairwise Hamming distance (for 10 classes in
100-d the smallest Hamming distance comes out at 54, against an upper bound of 55 and 34 for
random signs drawn with seed 0). It is not the linf default: the L-inf distance from an output z with
entries in (-1, 1) to a corner is 1 plus the largest ``|z_k|`` among the coordinates whose sign
disagrees with the corner, so early in training the distances to all corners nearly tie and the
L-inf loss moves one coordinate at a time, which makes DRP-linf training slow to leave chance.
"""
from __future__ import annotations

import math

import torch

__all__ = ["hypercube"]

# Exhaustive corner search up to this D; work budget of the column search.
_EXHAUSTIVE_DIM = 12
_COLUMN_BUDGET = 10 ** 9   # C * C * D * candidates scored by matmul
_MAX_CANDIDATES = 64
_MIN_BUDGET = 5 * 10 ** 7  # C * C * D * re-ranked candidates
_TOP_CANDIDATES = 8


def _pairwise_hamming(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(len(a), len(b)) Hamming distances between rows of two bool matrices."""
    return (a[:, None, :] != b[None, :, :]).sum(dim=-1)


def _corners_exhaustive(C: int, D: int, gen: torch.Generator) -> torch.Tensor:
    """C distinct corners (bool rows) chosen farthest-first among all 2^D corners, in random order."""
    codes = torch.arange(2 ** D)
    bits = ((codes[:, None] >> torch.arange(D)) & 1).bool()
    bits = bits[torch.randperm(2 ** D, generator=gen)]
    chosen = [0]
    nearest = _pairwise_hamming(bits, bits[:1])[:, 0]
    for _ in range(C - 1):
        j = int(torch.argmax(nearest))  # the first maximum: ties broken by the random order
        chosen.append(j)
        nearest = torch.minimum(nearest, _pairwise_hamming(bits, bits[j:j + 1])[:, 0])
    return bits[chosen]


def _corners_by_columns(C: int, D: int, gen: torch.Generator) -> torch.Tensor:
    """A (C, D) bool code built one balanced column at a time (see the module docstring).

    Each column splits the rows into two halves. Among ``n`` random candidates v (+-1), the ``top``
    with the largest ``v^T H v`` (H the Hamming distances so far; a large value means the column
    separates pairs that are still close) are kept, and the one giving the largest new minimum
    distance wins. Work per column: a (C, C) x (C, n) matmul plus ``top`` (C, C) updates.
    """
    n = max(1, min(_MAX_CANDIDATES, _COLUMN_BUDGET // (C * C * D)))
    top = min(n, _TOP_CANDIDATES) if C * C * D * _TOP_CANDIDATES <= _MIN_BUDGET else 1
    half = torch.arange(C) < C // 2
    hamming = torch.zeros(C, C)  # float32 counts: exact up to 2^24
    off = ~torch.eye(C, dtype=torch.bool)
    cols = []
    for k in range(D):
        perm = torch.rand(n, C, generator=gen).argsort(dim=1)
        cand = half[perm] if k % 2 == 0 else ~half[perm]  # odd C: alternate the larger half
        v = cand.to(torch.float32) * 2.0 - 1.0
        order = torch.argsort(((v @ hamming) * v).sum(dim=1), descending=True, stable=True)[:top]
        best = int(order[0])
        if top > 1:
            vt = v[order]
            new = hamming + 0.5 * (1.0 - vt[:, :, None] * vt[:, None, :])
            lowest = new.masked_fill(~off, math.inf).flatten(1).amin(dim=1)
            best = int(order[int(torch.argmax(lowest))])
        hamming += 0.5 * (1.0 - v[best][:, None] * v[best][None, :])
        cols.append(cand[best])
    return torch.stack(cols, dim=1)


def hypercube(C: int, D: int, gen: torch.Generator) -> torch.Tensor:
    """C distinct corners of [-1, 1]^D (float32 +-1 rows) with large, even Hamming distances."""
    if D <= _EXHAUSTIVE_DIM:
        bits = _corners_exhaustive(C, D, gen)
    else:
        bits = _corners_by_columns(C, D, gen)
        for _ in range(10_000):  # a repeated row (possible only when C is close to 2^D) is redrawn
            seen, repeats = set(), []
            for i, row in enumerate(bits.numpy()):
                key = row.tobytes()
                if key in seen:
                    repeats.append(i)
                else:
                    seen.add(key)
            if not repeats:
                break
            bits[repeats] = torch.rand(len(repeats), D, generator=gen) < 0.5
        else:  # pragma: no cover
            raise RuntimeError(f"could not draw {C} distinct corners of [-1, 1]^{D}")
    return bits.to(torch.float32) * 2.0 - 1.0
