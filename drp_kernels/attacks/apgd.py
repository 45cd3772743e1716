"""Auto-PGD (Croce & Hein, ICML 2020): APGD-CE, APGD-DLR and the targeted APGD-T.

The algorithm, per sample:
  x0 = random_init(x, eps); eta = 2 * eps; x1 = P(x0 + eta * s(grad f(x0)))
  z_{k+1} = P(x_k + eta * s(grad f(x_k)))
  x_{k+1} = P(x_k + 0.75 (z_{k+1} - x_k) + 0.25 (x_k - x_{k-1}))          (momentum 0.75)
with s = sign (linf) or grad / ||grad||_2 (l2) and P the projection on the eps ball
intersected with [0, 1]. At the checkpoints w_j = ceil(p_j N), p_0 = 0, p_1 = 0.22,
p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), eta is halved and the iterate reset to
the best point found so far when
  (1) the loss increased in fewer than 0.75 (w_j - w_{j-1}) of the steps since the last
      checkpoint, or
  (2) eta was not halved at the last checkpoint and the best loss has not improved since.
Both the step and the projection go through ``drp_kernels.pgd_step_`` (the projection
is a step with a zero gradient and step size 0). A point leaves the working batch as soon
as it is misclassified (AutoAttack keeps iterating it until the run ends); the others
iterate exactly as before.

Randomness is keyed per point (``_keys.py``): run r of a point starts from the ball noise of
``derive(key, r)``, whatever else shares its batch, so every point's trajectory, and with it
whether it breaks, is a function of the point, its key and the model alone.
"""
from __future__ import annotations

import torch

from ..ops.pgd_step import PreparedBudget
from . import _common as C
from . import _keys as R

__all__ = ["apgd", "checkpoints", "n_runs", "keyed_init"]

MOMENTUM = 0.75
RHO = 0.75


def checkpoints(steps: int) -> list:
    """The iterations w_j (1 <= w_j < steps) after which APGD checks its step size.

    Uses integer hundredths so 0.22 * 100 is exactly 22 (no float round-up)."""
    out, p_prev, p = [], 0, 22
    while True:
        w = (p * steps + 99) // 100  # ceil(p / 100 * steps)
        if w >= steps:
            break
        if w >= 1 and (not out or w > out[-1]):
            out.append(w)
        p_prev, p = p, p + max(p - p_prev - 3, 6)
    return out


def _last_row(point, rows, n_points):
    """Per output point, the index of the last of ``rows`` (a bool mask) that maps to it (-1: none)."""
    r = torch.arange(point.shape[0], device=point.device)
    last = torch.full((n_points,), -1, dtype=torch.long, device=point.device)
    return last.scatter_reduce(0, point[rows], r[rows], reduce="amax")


def keyed_init(x, eps, norm, keys):
    """``drp_kernels.random_init``'s uniform draw from the eps ball around each row of x (clipped to
    [0, 1]), with each row's noise drawn from its own key (``_keys.ball_noise``)."""
    noise, radius = R.ball_noise(keys, tuple(x.shape[1:]), norm, x.device)
    eps_s, eps_t = C.step_budget(eps, x, round_down=True)
    return torch.ops.drp.ball_init(x.detach(), noise, radius, eps_s, eps_t, norm, 0.0, 1.0)


def _apgd_run(model, x, y, *, eps, steps, norm, loss_fn, keys, aux=None, x_start=None, progress=None,
              point=None, n_points=None, runs_per_row_block=1):
    """APGD runs on validated inputs (model in eval mode), one per row of x.

    Several runs of the same point (its restarts, or its targets under dlr-t) may be stacked
    as rows: ``point`` (rows,) maps each row to its output point (default: row i is point i,
    ``n_points`` = rows). A point counts as broken as soon as any of its rows is misclassified,
    and then ALL its rows leave the working batch. ``runs_per_row_block``: how many runs the
    rows stack (for progress only).

    loss_fn(logits, y, aux) -> per-row loss; aux is a per-row tensor (the targets of
    dlr-t) or None. keys: (rows,) int64, each row's random-start key. x_start: the starting
    points (default: a uniform draw from the ball).
    A point leaves the working batch once it is misclassified (per-point early exit), so
    broken points cost nothing further; the others follow exactly the same per-sample
    iteration as without the exit. Budgets are validated once, so the loop itself never
    waits on the device except for the early exit (see ``_common.exit_every``).

    Returns (x_out, fooled) per point: x_out is the first misclassified iterate where one
    was found, else the iterate of highest loss (of the point's last row)."""
    n = x.shape[0]
    if point is None:
        point, n_points = torch.arange(n, device=x.device), n
    bview = (-1,) + (1,) * (x.dim() - 1)
    out = torch.empty((n_points,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    out_fooled = torch.zeros(n_points, dtype=torch.bool, device=x.device)
    eps_b = C.step_budget(eps, x, round_down=True)
    step = (2.0 * C.budget_vector(eps, n, x.device)).to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    if x_start is None:
        x_adv = keyed_init(x, eps, norm, keys)
    else:
        x_adv = x_start.detach().clone()

    def grad_at(xa, yy, aa):
        return C.input_grad(model, xa, yy, lambda z, t: loss_fn(z, t, aa))

    logits, loss, grad = grad_at(x_adv, y, aux)
    fooled = logits.argmax(dim=1) != y
    s = {  # the per-sample state, compacted together when points leave
        "x": x, "y": y, "aux": aux, "step": step, "x_adv": x_adv, "x_prev": x_adv.clone(), "grad": grad,
        "x_found": torch.where(fooled.view(bview), x_adv, x), "fooled": fooled,
        "x_best": x_adv.clone(), "grad_best": grad.clone(), "loss_best": loss.clone(), "loss_prev": loss,
        "increases": torch.zeros(n, device=x.device), "reduced_last": torch.zeros(n, dtype=torch.bool, device=x.device),
        "point": point,
    }
    s["loss_best_last"] = s["loss_best"].clone()

    def drop_broken():
        """Write out the broken points, remove every row of theirs from the state; returns the
        number of rows left."""
        nonlocal eps_b, points_left
        f = s["fooled"]
        if not bool(f.any()):
            return f.shape[0]
        last = _last_row(s["point"], f, n_points)
        hit = last >= 0
        out[hit] = s["x_found"][last[hit]]
        out_fooled[hit] = True
        points_left -= int(hit.sum())
        keep = (~hit[s["point"]]).nonzero().squeeze(1)
        for k, v in s.items():
            if v is not None:
                s[k] = v[keep]
        eps_b = C.subset_step_budget(eps_b, keep)
        return keep.numel()

    every = C.exit_every(x.device)
    points_left = n_points
    left = drop_broken()
    marks, last_mark = set(checkpoints(steps)), 0
    for i in range(steps):
        if left == 0:
            if progress is not None:
                progress.update((steps - i) * runs_per_row_block, left=0)
            break
        xa, xp, g = s["x_adv"], s["x_prev"], s["grad"]
        buf = xa.clone()
        C.fused_step_(buf, s["x"], g, eps_b, PreparedBudget(0.0, s["step"]), norm)  # z = P(x_k + eta s(grad))
        if i > 0:
            # x_k + a (z - x_k) + (1 - a)(x_k - x_{k-1}) = a z + 2 (1 - a) x_k - (1 - a) x_{k-1}
            buf.mul_(MOMENTUM).add_(xa, alpha=2.0 * (1.0 - MOMENTUM)).add_(xp, alpha=-(1.0 - MOMENTUM))
            C.fused_step_(buf, s["x"], torch.zeros_like(buf), eps_b, PreparedBudget(0.0, None), norm)  # projection only
        s["x_prev"], s["x_adv"] = xa, buf
        logits, loss, grad = grad_at(buf, s["y"], s["aux"])
        s["grad"] = grad
        newly = (logits.argmax(dim=1) != s["y"]) & ~s["fooled"]
        s["x_found"] = torch.where(newly.view(bview), buf, s["x_found"])
        s["fooled"] = s["fooled"] | newly
        s["increases"] += (loss > s["loss_prev"]).float()
        s["loss_prev"] = loss
        better = loss > s["loss_best"]
        s["x_best"] = torch.where(better.view(bview), buf, s["x_best"])
        s["grad_best"] = torch.where(better.view(bview), grad, s["grad_best"])
        s["loss_best"] = torch.where(better, loss, s["loss_best"])
        if i + 1 in marks:
            k = i + 1 - last_mark
            reduce = (s["increases"] < RHO * k) | (~s["reduced_last"] & (s["loss_best"] <= s["loss_best_last"]))
            s["step"] = torch.where(reduce, 0.5 * s["step"], s["step"])
            rv = reduce.view(bview)
            s["x_adv"] = torch.where(rv, s["x_best"], s["x_adv"])
            s["grad"] = torch.where(rv, s["grad_best"], s["grad"])
            s["loss_prev"] = torch.where(reduce, s["loss_best"], s["loss_prev"])
            s["reduced_last"] = reduce
            s["loss_best_last"] = s["loss_best"].clone()
            s["increases"].zero_()
            last_mark = i + 1
        if (i + 1) % every == 0 or i + 1 == steps:
            left = drop_broken()
        if progress is not None:
            progress.update(runs_per_row_block, left=points_left)
    if left > 0:
        last = _last_row(s["point"], torch.ones_like(s["fooled"]), n_points)
        hit = last >= 0
        out[hit] = s["x_best"][last[hit]]
    return out, out_fooled


def _targets(logits: torch.Tensor, rank: int) -> torch.Tensor:
    """The class with the rank-th largest logit (rank 1 = the top class)."""
    return logits.topk(rank, dim=1).indices[:, rank - 1]


def _loss3(name):
    """The named loss as loss(logits, y, aux); aux carries the targets of dlr-t."""
    if name == "dlr-t":
        return C.dlr_targeted_loss
    base = C.resolve_loss(name, allowed=C.LOSSES)
    return lambda z, yy, _aux: base(z, yy)


def n_runs(loss, restarts, n_target_classes) -> int:
    """How many APGD runs ``_apgd`` makes at most (for progress totals)."""
    return restarts * (n_target_classes if loss == "dlr-t" else 1)


def _apgd(model, x, y, *, eps, steps, norm, loss, restarts, n_target_classes, keys, clean_logits=None,
          x_start=None, progress=None, max_rows=None):
    """APGD on validated inputs (model in eval mode). Returns (x_adv, fooled).

    Only samples classified correctly are attacked; every restart (and every target of
    dlr-t) runs only on the samples not yet fooled. Runs are stacked into one batch of at
    most ``max_rows`` rows (default: len(x)), so that when few points remain, several of
    their targets or restarts run side by side instead of one after another; a point leaves
    all its runs once one breaks it. Whether a point breaks does not depend on the stacking:
    run j of a point starts from the key ``derive(keys[point], j)`` and iterates alone, and the
    point breaks when any of its runs does. x_start (optional) replaces the random start of
    the first run. progress: a StageProgress over n_runs(...) * steps iterations."""
    x = x.detach()
    if clean_logits is None:
        with torch.no_grad():
            clean_logits = model(x)
    fooled = clean_logits.argmax(dim=1) != y
    out = x.clone()
    if loss == "dlr-t":
        runs = [rank for rank in range(2, n_target_classes + 2) for _ in range(restarts)]
    else:
        runs = [None] * restarts
    loss_fn = _loss3(loss)
    max_rows = x.shape[0] if max_rows is None else max(int(max_rows), 1)
    k = 0
    while k < len(runs):
        idx = (~fooled).nonzero().squeeze(1)
        if idx.numel() == 0:
            if progress is not None:
                progress.update((len(runs) - k) * steps, left=0)
            break
        g = 1 if (x_start is not None and k == 0) else max(1, min(len(runs) - k, max_rows // idx.numel()))
        group = runs[k:k + g]
        xs, ys = x[idx], y[idx]
        rep = (g,) + (1,) * (x.dim() - 1)
        aux = None if group[0] is None else torch.cat([_targets(clean_logits[idx], rank) for rank in group])
        e = C.subset_budget(eps, idx)
        start = x_start[idx] if (x_start is not None and k == 0) else None
        kidx = keys[idx.cpu()]
        run_keys = torch.cat([R.derive(kidx, k + j) for j in range(g)])
        x_run, f_run = _apgd_run(model, xs.repeat(rep), ys.repeat(g), eps=e.repeat(g) if isinstance(e, torch.Tensor)
                                 else e, steps=steps, norm=norm, loss_fn=loss_fn, keys=run_keys, aux=aux,
                                 x_start=start, progress=progress,
                                 point=torch.arange(idx.numel(), device=x.device).repeat(g), n_points=idx.numel(),
                                 runs_per_row_block=g)
        out[idx] = x_run
        fooled[idx] = f_run
        k += g
    return out, fooled


def apgd(model, x, y, *, eps, steps=100, norm="linf", loss="ce", restarts=1, n_target_classes=9, seed=0,
         index=None):
    """Auto-PGD (Croce & Hein 2020), untargeted (loss "ce" or "dlr") or targeted ("dlr-t").

    Args:
        model: maps inputs in [0, 1] to logits (B, C).
        x: inputs (B, ...) in [0, 1]; y: int64 labels (B,).
        eps: budget, a float or a length-B tensor.
        steps: iterations per run (N; >= 1).
        norm: "linf" or "l2".
        loss: "ce"; "dlr" (needs C >= 3); "dlr-t", the targeted DLR run once per target
            among the n_target_classes runner-up classes of the clean logits (needs C >= 4
            and n_target_classes <= C - 1).
        restarts: random restarts (per target for dlr-t), each on the samples still unbroken.
        seed: seeds the random starts (None: a seed drawn from torch's global RNG).
        index: (B,) int64, each sample's identity for its random starts (default: its row);
            a sample with the same index, seed and inputs gets the same result in any batch.

    Returns adversarial inputs: the first misclassified iterate found per sample, else the
    highest-loss point of the last run; samples misclassified at x are returned as x.
    """
    y, eps, norm = C.validate_attack(model, x, y, eps=eps, norm=norm)
    steps = C.check_positive_int(steps, name="steps")
    restarts = C.check_positive_int(restarts, name="restarts")
    n_target_classes = C.check_positive_int(n_target_classes, name="n_target_classes")
    if not isinstance(loss, str) or loss not in C.LOSSES:
        raise ValueError(f"loss must be one of {C.LOSSES}, got {loss!r}")
    keys = R.point_keys(C.check_seed(seed), C.check_index(index, x), R.PUBLIC_IDS["apgd"])
    if x.shape[0] == 0:
        return x.detach().clone()
    with C.eval_mode(model):
        with torch.no_grad():
            logits = model(x.detach())
        c = C.check_logits(logits, y, min_classes=C.min_classes(loss), what=f"loss={loss!r}")
        if loss == "dlr-t" and n_target_classes > c - 1:
            raise ValueError(f"n_target_classes must be <= C - 1 = {c - 1} for this model, got {n_target_classes}")
        x_adv, _ = _apgd(model, x, y, eps=eps, steps=steps, norm=norm, loss=loss, restarts=restarts,
                         n_target_classes=n_target_classes, keys=keys, clean_logits=logits)
    return x_adv
