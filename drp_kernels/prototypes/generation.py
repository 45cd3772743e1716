"""``repulsive_prototypes``: class prototypes far apart from each other.

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

``"hypercube"`` (+-1 corners, any metric, on request) is described in ``hypercube.py``.
"""
from __future__ import annotations

import math
import warnings

import torch

from .. import functional as Fn
from .._backend import backend_for
from .._constants import DEFAULT_METRIC, METRICS
from .._contexts import single_thread
from .._validate import check_choice, check_float, check_int, check_metric
from .hypercube import hypercube

__all__ = ["PROTOTYPE_METHODS", "repulsive_prototypes"]

#: The methods of ``repulsive_prototypes`` ("default" picks one per metric).
PROTOTYPE_METHODS = ("default", "hypercube", "sphere", "box", "paper")
_METHOD_METRICS = {"hypercube": METRICS, "sphere": ("cosine", "l2"), "box": ("linf",), "paper": METRICS}

# Defaults of the softmin methods per geometry: (steps, lr, start temperature, end temperature).
_SPHERE_DEFAULTS = (1000, 0.01, 0.1, 0.005)
_BOX_DEFAULTS = (1000, 0.05, 0.1, 0.005)
_PAPER_STEPS, _PAPER_LR, _PAPER_MOMENTUM = 100, 0.01, 0.9
_LR_FLOOR = 0.01  # the cosine learning-rate schedule ends at 1% of lr
# CPU problems with at most this many C * C * D distance terms per step run on one thread.
_SINGLE_THREAD_WORK = 1 << 24


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

    ``method`` is one of ``PROTOTYPE_METHODS`` (see the module docstring); ``"default"`` picks the best one
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
    check_choice("method", method, PROTOTYPE_METHODS)
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
    with single_thread(small):
        if resolved == "hypercube":
            P = hypercube(C, D, gen).to(device)
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
