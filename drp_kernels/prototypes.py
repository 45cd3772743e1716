"""Class prototypes far apart from each other, their separation, saving and loading.

Methods (``method=``):

``"default"`` picks the best method for the metric: ``"box"`` for linf, ``"sphere"`` for cosine
and l2.

``"box"`` (linf; its default): uniform init in [-1, 1]^D, Adam (lr 0.05, decayed to 1% with a
cosine schedule), 1000 steps of the softmin energy on L-inf distances (a smooth maximum of the
minimum pairwise distance) with the temperature annealed geometrically from 0.1 to 0.005, and a
clamp to the box after every step. This maximises the minimum pairwise L-inf distance; its optimum
is 2 whenever C <= 2^D (distinct corners of the box differ by 2 in some coordinate), and no L-inf
distance in the box can exceed 2. The entries stay in [-1, 1], a target a network can be trained
towards, unlike the paper's unconstrained prototypes (for 10 classes in 100-d, seed 0, they span
about -77..54 after the paper's 100 steps); most entries end strictly inside the box, which keeps
the L-inf distances from an output to the different prototypes apart (see ``"hypercube"``).

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

``"sphere"`` (cosine, l2; their default): Gaussian init normalised to the unit sphere, Adam (lr
0.01, decayed to 1% with a cosine schedule), 1000 steps of the softmin energy (a smooth maximum of
the minimum pairwise distance) with the temperature annealed geometrically from 0.1 to 0.005, the
energy evaluated on the normalised rows and the rows re-projected onto the sphere after every
step. For C <= D + 1 the optimum is the regular simplex (max cosine -1/(C-1)); the softmin energy
is minimised exactly there at every temperature, so the annealing converges to it. On the sphere
l2 distance is sqrt(2 - 2 cos), so l2 and cosine share their optimum.

``"paper"`` reproduces Serban, Poll and Visser: C vectors drawn uniformly in [-1, 1]^D, then the
sum of pairwise L-inf distances is maximised (``kind="sum"``, ``metric="linf"``) with SGD (lr 0.01,
momentum 0.9) and no constraint, for ``steps`` steps (default 100). The ``metric`` argument is
validated and recorded but does not change this procedure (the paper always uses L-inf).

Requests whose optimum cannot be reached produce a ``UserWarning``, not an error: cosine/l2 with
C > D + 1 (no regular simplex; the optimum max cosine is 0 for C <= 2D, unknown beyond) and
linf with C > 2^D (distance 2 is out of reach).

On CUDA the energy runs on the fused Triton kernels (``drp_kernels.repulsion_energy``). On the CPU
(backend "reference") the same energy is computed from a C x C distance matrix built with a
matmul (cosine, l2) or ``torch.cdist`` (linf), which is much faster than the broadcast reference.
Small CPU problems run single-threaded (``torch.set_num_threads(1)`` for the duration of the call,
restored afterwards): their steps take about a millisecond, and a thread pool on a busy machine costs far
more than it saves. As ``torch.set_num_threads`` is process-wide, avoid generating prototypes while
other threads of the same process run heavy torch work.

Files (``save_prototypes`` / ``load_prototypes``) record the metric and method the prototypes were
made for: a ``.pt`` file holds a dict ``{"prototypes": tensor, "metric": str | None, "method": str |
None}``; a ``.npy`` file holds the plain float32 array, and the metadata goes to a JSON sidecar
``<file>.npy.json`` that also stores a SHA-256 of the array, so a sidecar that no longer belongs
to its array is ignored (with a warning). Plain tensors in ``.pt`` files and ``.npy`` files without
a sidecar, as older versions wrote them, still load, with metric and method ``None``.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import warnings
from typing import Optional

import torch

from . import functional as Fn
from ._backend import backend_for
from ._constants import DEFAULT_METRIC, METRICS
from ._validate import check_choice, check_float, check_int, check_matrix, check_metric
from .io import atomic_write

__all__ = ["METHODS", "METRICS", "repulsive_prototypes", "separation", "save_prototypes", "load_prototypes"]

METHODS = ("default", "hypercube", "sphere", "box", "paper")
_METHOD_METRICS = {"hypercube": METRICS, "sphere": ("cosine", "l2"), "box": ("linf",), "paper": METRICS}
_EXTENSIONS = (".pt", ".npy")
_SIDECAR = ".json"

# Defaults of the softmin methods per geometry: (steps, lr, start temperature, end temperature).
_SPHERE_DEFAULTS = (1000, 0.01, 0.1, 0.005)
_BOX_DEFAULTS = (1000, 0.05, 0.1, 0.005)
_PAPER_STEPS, _PAPER_LR, _PAPER_MOMENTUM = 100, 0.01, 0.9
_LR_FLOOR = 0.01  # the cosine learning-rate schedule ends at 1% of lr
# CPU problems with at most this many C * C * D distance terms per step run on one thread.
_SINGLE_THREAD_WORK = 1 << 24
# Hypercube codes: exhaustive corner search up to this D; work budget of the column search.
_EXHAUSTIVE_DIM = 12
_COLUMN_BUDGET = 10 ** 9   # C * C * D * candidates scored by matmul
_MAX_CANDIDATES = 64
_MIN_BUDGET = 5 * 10 ** 7  # C * C * D * re-ranked candidates
_TOP_CANDIDATES = 8


# ------------------------------------------------------------------------ validation
def _check_matrix(P, name: str = "P") -> torch.Tensor:
    return check_matrix(name, P)


# ------------------------------------------------------------------- known optima
def _optimum_max_cosine(C: int, D: int) -> Optional[float]:
    """Smallest achievable max pairwise cosine of C unit vectors in R^D, where it is known."""
    if C <= D + 1:
        return -1.0 / (C - 1)  # regular simplex
    if C <= 2 * D:
        return 0.0  # cross-polytope (and no C > D + 1 vectors have all cosines < 0)
    return None


def _warn_unreachable(C: int, D: int, metric: str) -> None:
    if metric in ("cosine", "l2") and C > D + 1:
        known = ("the known optimum max cosine is 0 (cross-polytope)" if C <= 2 * D
                 else "no optimum is known for C > 2 * dim")
        warnings.warn(
            f"num_classes={C} > dim + 1 = {D + 1}: a regular simplex (max cosine -1/(C-1)) does not "
            f"exist in {D} dimensions; {known}. Returning the best packing found.",
            UserWarning, stacklevel=3)
    if metric == "linf" and D < 63 and C > 2 ** D:
        warnings.warn(
            f"num_classes={C} > 2**dim = {2 ** D}: a minimum L-inf distance of 2 (distinct corners of "
            f"[-1, 1]^{D}) cannot be reached. Returning the best packing found.",
            UserWarning, stacklevel=3)


# ------------------------------------------------------------------------ energies
def _fast_distances(x: torch.Tensor, metric: str) -> torch.Tensor:
    """(C, C) pairwise distances for the CPU path, differentiable (diagonal not meaningful)."""
    if metric == "linf":
        return torch.cdist(x, x, p=math.inf)
    n = x / torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(1e-8)
    gram = n @ n.T
    if metric == "cosine":
        return 1.0 - gram
    # l2 between the unit rows (the only l2 use here is on the sphere)
    return torch.sqrt((2.0 - 2.0 * gram).clamp_min(1e-12))


def _energy(x: torch.Tensor, metric: str, kind: str, temperature: float) -> torch.Tensor:
    if backend_for(x) != "reference":
        return Fn.repulsion_energy(x, metric=metric, kind=kind, temperature=temperature)
    d = _fast_distances(x, metric)
    C = d.shape[0]
    if kind == "sum":
        return -torch.triu(d, diagonal=1).sum()
    off = ~torch.eye(C, dtype=torch.bool, device=d.device)
    z = (-d / temperature).masked_fill(~off, -math.inf)
    return temperature * torch.logsumexp(z.reshape(-1), dim=0)


# ------------------------------------------------------------------------- threads
@contextlib.contextmanager
def _single_thread(enabled: bool = True):
    """Run the block with ``torch.set_num_threads(1)``, restoring the previous count afterwards."""
    previous = torch.get_num_threads()
    if not enabled or previous == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# ------------------------------------------------------------------ hypercube codes
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


def _hypercube(C: int, D: int, gen: torch.Generator) -> torch.Tensor:
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


# ---------------------------------------------------------------------- generation
def _resolve_method(method: str, metric: str, C: int, D: int) -> str:
    if method != "default":
        if metric not in _METHOD_METRICS[method]:
            raise ValueError(f"method={method!r} works with metric in {_METHOD_METRICS[method]}, got "
                             f"metric={metric!r}; use method='default' for the best method of {metric!r}")
        if method == "hypercube" and D < 63 and C > 2 ** D:
            raise ValueError(f"method='hypercube' needs num_classes <= 2**dim = {2 ** D} distinct corners, "
                             f"got num_classes={C}")
        return method
    return "box" if metric == "linf" else "sphere"


def repulsive_prototypes(num_classes, dim, *, metric=DEFAULT_METRIC, method="default", steps=None, lr=None,
                         seed=0, device=None, progress=False, with_info=False):
    """(num_classes, dim) float32 prototypes far apart in ``metric``; reproducible per ``seed``.

    ``method`` is one of ``METHODS`` (see the module docstring); ``"default"`` picks the best one
    for the metric: ``"box"`` for linf, ``"sphere"`` for cosine and l2.
    ``steps`` and ``lr`` default per method (paper: 100 steps, SGD lr 0.01; sphere: 1000 steps,
    Adam lr 0.01; box: 1000 steps, Adam lr 0.05) and do not apply to ``"hypercube"``, which
    optimises nothing by gradient. ``device`` is where the optimisation runs and the result lives
    (CPU by default); the initialisation is drawn on the CPU from ``seed`` so every device starts
    from the same point. ``progress`` shows a tqdm bar (tqdm is imported only then).

    With ``with_info=True`` returns ``(P, info)``, ``info = {"metric": metric, "method": m}`` where
    ``m`` is the method actually run (never ``"default"``): pass them on to ``save_prototypes``
    so the file records what the prototypes were made for.
    """
    C = check_int("num_classes", num_classes, 2)
    D = check_int("dim", dim, 1)
    check_metric(metric)
    check_choice("method", method, METHODS)
    if steps is not None:
        steps = check_int("steps", steps, 0)
    if lr is not None:
        lr = check_float("lr", lr, positive=True)
    seed = check_int("seed", seed, 0)
    device = torch.device(device) if device is not None else torch.device("cpu")
    resolved = _resolve_method(method, metric, C, D)
    if resolved == "hypercube" and (steps is not None or lr is not None):
        raise ValueError("steps and lr do not apply to method 'hypercube' (a combinatorial construction); "
                         "leave them unset")
    if resolved != "paper":
        _warn_unreachable(C, D, "linf" if resolved in ("hypercube", "box") else metric)
    gen = torch.Generator().manual_seed(seed)
    small = device.type == "cpu" and C * C * D <= _SINGLE_THREAD_WORK
    with _single_thread(small):
        if resolved == "hypercube":
            P = _hypercube(C, D, gen).to(device)
        elif resolved == "paper":
            P = _paper(C, D, gen, device, steps, lr, progress)
        else:
            P = _softmin(C, D, gen, device, metric, resolved, steps, lr, progress)
    info = {"metric": metric, "method": resolved}
    return (P, info) if with_info else P


def _progress(steps: int, progress: bool, desc: str):
    if not progress:
        return range(steps)
    from tqdm.auto import tqdm
    return tqdm(range(steps), desc=desc)


def _paper(C, D, gen, device, steps, lr, progress):
    steps = _PAPER_STEPS if steps is None else steps
    lr = _PAPER_LR if lr is None else lr
    p = (torch.rand(C, D, generator=gen) * 2.0 - 1.0).to(device)
    p.requires_grad_(True)
    opt = torch.optim.SGD([p], lr=lr, momentum=_PAPER_MOMENTUM)
    for _ in _progress(steps, progress, "prototypes (paper)"):
        opt.zero_grad(set_to_none=True)
        _energy(p, "linf", "sum", 1.0).backward()
        opt.step()
    return p.detach().to(torch.float32)


def _softmin(C, D, gen, device, metric, method, steps, lr, progress):
    sphere = method == "sphere"
    d_steps, d_lr, t0, t1 = _SPHERE_DEFAULTS if sphere else _BOX_DEFAULTS
    steps = d_steps if steps is None else steps
    lr = d_lr if lr is None else lr
    if sphere:
        if D == 1:
            # the 1-D "sphere" is {-1, +1}: nothing moves continuously, so alternate the signs
            p = torch.ones(C, 1)
            p[1::2] = -1.0
            return p.to(device)
        p = torch.randn(C, D, generator=gen)
        p = p / torch.linalg.vector_norm(p, dim=1, keepdim=True).clamp_min(1e-8)
    else:
        p = torch.rand(C, D, generator=gen) * 2.0 - 1.0
    p = p.to(device).requires_grad_(True)
    opt = torch.optim.Adam([p], lr=lr)
    denom = max(steps - 1, 1)
    for s in _progress(steps, progress, f"prototypes ({metric}, {method})"):
        frac = s / denom
        temperature = t0 * (t1 / t0) ** frac
        for group in opt.param_groups:
            group["lr"] = lr * (_LR_FLOOR + (1.0 - _LR_FLOOR) * 0.5 * (1.0 + math.cos(math.pi * frac)))
        opt.zero_grad(set_to_none=True)
        x = p / torch.linalg.vector_norm(p, dim=1, keepdim=True).clamp_min(1e-8) if sphere else p
        _energy(x, metric, "softmin", temperature).backward()
        opt.step()
        with torch.no_grad():
            if sphere:
                p /= torch.linalg.vector_norm(p, dim=1, keepdim=True).clamp_min(1e-8)
            else:
                p.clamp_(-1.0, 1.0)
    return p.detach().to(torch.float32)


# ---------------------------------------------------------------------- separation
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
    P = _check_matrix(P)
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
    c_opt = _optimum_max_cosine(C, D)
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


# ------------------------------------------------------------------- save and load
def _extension(path) -> str:
    ext = os.path.splitext(os.fspath(path))[1].lower()
    if ext not in _EXTENSIONS:
        raise ValueError(f"path must end in one of {_EXTENSIONS}, got {os.fspath(path)!r}")
    return ext


def _check_path(path) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    return os.fspath(path)


def _check_meta(name: str, value, choices, where: str = "") -> Optional[str]:
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"{name}{where} must be a string, one of {choices}, or None, got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"{name}{where} must be one of {choices} or None, got {value!r}")
    return value


def _digest(data: torch.Tensor) -> str:
    return hashlib.sha256(data.numpy().tobytes()).hexdigest()


def save_prototypes(P, path, *, metric=None, method=None) -> None:
    """Write P (2-D, floating point) as float32 to ``path`` (.pt or .npy) atomically, with its metadata.

    ``metric`` (one of ``METRICS``) and ``method`` (one of ``METHODS`` other than ``"default"``)
    record what the prototypes were made for; ``repulsive_prototypes(..., with_info=True)`` returns
    both. ``.pt`` files hold ``{"prototypes", "metric", "method"}``; ``.npy`` files hold the plain
    array, with the metadata in the sidecar ``<path>.json`` (written when either is given, removed
    otherwise). Every file goes through a temporary file in the same directory that then replaces
    the target, so a crash never leaves a half-written file; new files get the umask's permissions.
    """
    P = _check_matrix(P)
    path = _check_path(path)
    ext = _extension(path)
    metric = _check_meta("metric", metric, METRICS)
    method = _check_meta("method", method, METHODS[1:])
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"the directory of path does not exist: {folder!r}")
    data = P.detach().to(device="cpu", dtype=torch.float32).contiguous()
    if ext == ".pt":
        atomic_write(path, lambda f: torch.save({"prototypes": data, "metric": metric, "method": method}, f))
        return
    import numpy as np

    atomic_write(path, lambda f: np.save(f, data.numpy(), allow_pickle=False))
    sidecar = path + _SIDECAR
    if metric is None and method is None:
        if os.path.exists(sidecar):
            os.unlink(sidecar)
        return
    meta = {"metric": metric, "method": method, "shape": list(data.shape), "sha256": _digest(data)}
    atomic_write(sidecar, lambda f: f.write(json.dumps(meta, indent=1) + "\n"), binary=False)


def _read_sidecar(path: str, data: torch.Tensor) -> dict:
    sidecar = path + _SIDECAR
    info = {"metric": None, "method": None}
    if not os.path.isfile(sidecar):
        return info
    try:
        with open(sidecar, encoding="utf-8") as f:
            meta = json.load(f)
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        warnings.warn(f"ignoring the unreadable metadata file {sidecar!r} ({e})", UserWarning, stacklevel=3)
        return info
    if meta.get("sha256") != _digest(data):
        warnings.warn(f"ignoring the metadata file {sidecar!r}: it was written for other prototypes than "
                      f"those now in {path!r}", UserWarning, stacklevel=3)
        return info
    info["metric"] = _check_meta("metric", meta.get("metric"), METRICS, f" in {sidecar!r}")
    info["method"] = _check_meta("method", meta.get("method"), METHODS[1:], f" in {sidecar!r}")
    return info


def load_prototypes(path, *, with_info=False):
    """Read prototypes saved by ``save_prototypes`` (.pt or .npy); returns a 2-D float32 CPU tensor.

    With ``with_info=True`` returns ``(P, info)``, ``info = {"metric": str | None, "method": str |
    None}``: what the file records, ``None`` where it records nothing (files of older versions,
    a ``.npy`` without its sidecar).
    """
    path = _check_path(path)
    ext = _extension(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no prototype file at path {path!r}")
    info = {"metric": None, "method": None}
    if ext == ".pt":
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(obj, dict):
            if not isinstance(obj.get("prototypes"), torch.Tensor):
                raise ValueError(f"{path!r} holds a dict without a 'prototypes' tensor, expected the dict "
                                 "save_prototypes writes or a 2-D tensor of prototypes")
            info["metric"] = _check_meta("metric", obj.get("metric"), METRICS, f" in {path!r}")
            info["method"] = _check_meta("method", obj.get("method"), METHODS[1:], f" in {path!r}")
            obj = obj["prototypes"]
        elif not isinstance(obj, torch.Tensor):
            raise ValueError(f"{path!r} holds a {type(obj).__name__}, expected a 2-D tensor of prototypes")
    else:
        import numpy as np

        arr = np.load(path, allow_pickle=False)
        if not isinstance(arr, np.ndarray):
            raise ValueError(f"{path!r} holds an archive, expected a single 2-D array of prototypes")
        obj = torch.from_numpy(arr)
    if obj.dim() != 2 or not obj.is_floating_point():
        raise ValueError(f"{path!r} must hold a 2-D floating-point array, got shape {tuple(obj.shape)} "
                         f"and dtype {obj.dtype}")
    P = obj.to(torch.float32).contiguous()
    if ext == ".npy":
        info = _read_sidecar(path, P)
    return (P, info) if with_info else P
