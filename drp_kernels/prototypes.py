"""Class prototypes pushed apart by an all-pairs repulsion, their separation, saving and loading.

Two methods:

``method="paper"`` reproduces Serban, Poll and Visser: C vectors drawn uniformly in [-1, 1]^D,
then the sum of pairwise L-inf distances is maximised (``kind="sum"``, ``metric="linf"``) with SGD
(lr 0.01, momentum 0.9) and no constraint, for ``steps`` steps (default 100). The ``metric``
argument is validated but does not change this procedure (the paper always uses L-inf).

``method="default"`` aims at the best separation we can reach in the geometry of ``metric``:

- cosine and l2: the unit sphere. Gaussian init normalised to the sphere, Adam (lr 0.01, decayed
  to 1% with a cosine schedule), 1000 steps of the softmin energy (a smooth maximum of the minimum
  pairwise distance) with the temperature annealed geometrically from 0.1 to 0.005, the energy
  evaluated on the normalised rows and the rows re-projected onto the sphere after every step.
  For C <= D + 1 the optimum is the regular simplex (max cosine -1/(C-1)); the softmin energy is
  minimised exactly there at every temperature, so the annealing converges to it. On the sphere
  l2 distance is sqrt(2 - 2 cos), so l2 and cosine share their optimum.
- linf: the box [-1, 1]^D. Uniform init, Adam (lr 0.05 decayed the same way), the same softmin
  annealing on L-inf distances and a clamp to the box after every step. This maximises the
  minimum pairwise L-inf distance; its optimum is 2 whenever C <= 2^D (distinct corners of the
  box differ by 2 in some coordinate), and no L-inf distance in the box can exceed 2.

Requests whose optimum cannot be reached produce a ``UserWarning``, not an error: cosine/l2 with
C > D + 1 (no regular simplex; the optimum max cosine is 0 for C <= 2D, unknown beyond) and
linf with C > 2^D (distance 2 is out of reach).

On CUDA the energy runs on the fused Triton kernels (``drp_kernels.repulsion_energy``). On the CPU
(backend "reference") the same energy is computed from a C x C distance matrix built with a
matmul (cosine, l2) or ``torch.cdist`` (linf), which is much faster than the broadcast reference.
"""
from __future__ import annotations

import math
import os
import tempfile
import warnings
from typing import Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from . import functional as Fn
from ._backend import backend_for

__all__ = ["METHODS", "METRICS", "repulsive_prototypes", "separation", "save_prototypes", "load_prototypes"]

METHODS = ("default", "paper")
METRICS = ("linf", "l2", "cosine")
_EXTENSIONS = (".pt", ".npy")

# Defaults of method="default" per geometry: (steps, lr, start temperature, end temperature).
_SPHERE_DEFAULTS = (1000, 0.01, 0.1, 0.005)
_BOX_DEFAULTS = (1000, 0.05, 0.1, 0.005)
_PAPER_STEPS, _PAPER_LR, _PAPER_MOMENTUM = 100, 0.01, 0.9
_LR_FLOOR = 0.01  # the cosine learning-rate schedule ends at 1% of lr


# ------------------------------------------------------------------------ validation
def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return int(value)


def _check_metric(metric) -> str:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    return metric


def _check_matrix(P, name: str = "P") -> torch.Tensor:
    if not isinstance(P, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(P).__name__}")
    if P.dim() != 2:
        raise ValueError(f"{name} must be 2-D (num_classes, dim), got shape {tuple(P.shape)}")
    if not P.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {P.dtype}")
    return P


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


# ---------------------------------------------------------------------- generation
def repulsive_prototypes(num_classes, dim, *, metric="cosine", method="default", steps=None, lr=None,
                         seed=0, device=None, progress=False) -> torch.Tensor:
    """(num_classes, dim) float32 prototypes pushed apart by repulsion; reproducible per ``seed``.

    See the module docstring for the two methods. ``steps`` and ``lr`` default per method
    (paper: 100 steps, SGD lr 0.01; default: 1000 steps, Adam lr 0.01 on the sphere, 0.05 in the
    box). ``device`` is where the optimisation runs and the result lives (CPU by default); the
    initialisation is drawn on the CPU from ``seed`` so every device starts from the same point.
    ``progress`` shows a tqdm bar.
    """
    C = _check_int("num_classes", num_classes, 2)
    D = _check_int("dim", dim, 1)
    _check_metric(metric)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if steps is not None:
        steps = _check_int("steps", steps, 0)
    if lr is not None:
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
        lr = float(lr)
    seed = _check_int("seed", seed, 0)
    device = torch.device(device) if device is not None else torch.device("cpu")
    gen = torch.Generator().manual_seed(seed)

    if method == "paper":
        steps = _PAPER_STEPS if steps is None else steps
        lr = _PAPER_LR if lr is None else lr
        p = (torch.rand(C, D, generator=gen) * 2.0 - 1.0).to(device)
        p.requires_grad_(True)
        opt = torch.optim.SGD([p], lr=lr, momentum=_PAPER_MOMENTUM)
        for _ in tqdm(range(steps), disable=not progress, desc="prototypes (paper)"):
            opt.zero_grad(set_to_none=True)
            _energy(p, "linf", "sum", 1.0).backward()
            opt.step()
        return p.detach().to(torch.float32)

    _warn_unreachable(C, D, metric)
    sphere = metric in ("cosine", "l2")
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
    for s in tqdm(range(steps), disable=not progress, desc=f"prototypes ({metric})"):
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
    _check_metric(metric)
    C, D = P.shape
    if C < 2:
        raise ValueError(f"P needs at least 2 rows to measure separation, got shape {tuple(P.shape)}")
    block_rows = _check_int("block_rows", block_rows, 1)
    cd = torch.float64 if P.dtype == torch.float64 else torch.float32
    x = P.detach().to(cd)
    n = x / torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(1e-8)
    d_min, d_sum, c_max = math.inf, 0.0, -math.inf
    for r0 in range(0, C, block_rows):
        r1 = min(C, r0 + block_rows)
        cos = n[r0:r1] @ n.T
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


def save_prototypes(P, path) -> None:
    """Write P (2-D, floating point) as float32 to ``path`` (.pt or .npy) atomically.

    The data goes to a temporary file in the same directory, which then replaces ``path``
    (``os.replace``), so a crash never leaves a half-written file behind.
    """
    P = _check_matrix(P)
    ext = _extension(path)
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"the directory of path does not exist: {folder!r}")
    data = P.detach().to(device="cpu", dtype=torch.float32).contiguous()
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-prototypes-", suffix=ext)
    try:
        with os.fdopen(fd, "wb") as f:
            if ext == ".pt":
                torch.save(data, f)
            else:
                np.save(f, data.numpy(), allow_pickle=False)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_prototypes(path) -> torch.Tensor:
    """Read prototypes saved by ``save_prototypes`` (.pt or .npy); returns a 2-D float32 CPU tensor."""
    ext = _extension(path)
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no prototype file at path {path!r}")
    if ext == ".pt":
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(obj, torch.Tensor):
            raise ValueError(f"{path!r} holds a {type(obj).__name__}, expected a 2-D tensor of prototypes")
    else:
        arr = np.load(path, allow_pickle=False)
        if not isinstance(arr, np.ndarray):
            raise ValueError(f"{path!r} holds an archive, expected a single 2-D array of prototypes")
        obj = torch.from_numpy(arr)
    if obj.dim() != 2 or not obj.is_floating_point():
        raise ValueError(f"{path!r} must hold a 2-D floating-point array, got shape {tuple(obj.shape)} "
                         f"and dtype {obj.dtype}")
    return obj.to(torch.float32).contiguous()
