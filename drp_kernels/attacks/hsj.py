"""HopSkipJump (Chen, Jordan, Wainwright, IEEE S&P 2020), untargeted, decision-based.

It only sees the predicted label. From an adversarial starting point (uniform noise,
pulled towards x by a binary search on the blend) it repeats:
  1. binary search along the segment (l2) or over the L-inf radius (linf) between x and
     the adversarial point, to a point just on the adversarial side of the boundary;
  2. a Monte-Carlo estimate of the boundary's normal from the signs of
     ``num_evals = init_evals * sqrt(t)`` random probes (baseline-corrected mean);
  3. a geometric step search: start at dist / sqrt(t) along the estimate (its sign for
     linf) and halve until the point is adversarial.
Binary-search threshold theta = gamma / d^(3/2) (l2) or gamma / d^2 (linf), d = features.
"""
from __future__ import annotations

import math

import torch

from . import _common as C

__all__ = ["hop_skip_jump"]

_MAX_BINARY_STEPS = 40
_MAX_STEP_HALVINGS = 30
_PROBE_ELEMENTS = 1 << 24  # probes per chunk are bounded by this many input elements


def _dist(a, b, norm):
    d = (a - b).flatten(1).float()
    return d.norm(dim=1) if norm == "l2" else d.abs().amax(dim=1)


def _project(x, x_adv, alpha, norm, bview):
    a = alpha.to(x.dtype).view(bview)
    if norm == "l2":
        return (1 - a) * x + a * x_adv
    return torch.minimum(torch.maximum(x_adv, x - a), x + a)


class _Oracle:
    """phi(x') = 1 when the model's label differs from y; counts queries per sample."""

    def __init__(self, model, batch_size):
        self.model, self.batch_size, self.queries = model, batch_size, 0

    def __call__(self, x, y):
        self.queries += x.shape[0]
        return C.predict(self.model, x, batch_size=self.batch_size) != y


def _binary_search(oracle, x, y, x_adv, norm, theta, bview):
    dist = _dist(x_adv, x, norm)
    if norm == "l2":
        high = torch.ones_like(dist)
        thr = torch.full_like(dist, theta)
    else:
        high = dist.clone()
        thr = torch.clamp(dist * theta, max=theta).clamp_min(1e-12)
    low = torch.zeros_like(dist)
    for _ in range(_MAX_BINARY_STEPS):
        if not bool(((high - low) > thr).any()):
            break
        mid = 0.5 * (high + low)
        adv = oracle(_project(x, x_adv, mid, norm, bview), y)
        high = torch.where(adv, mid, high)
        low = torch.where(adv, low, mid)
    out = _project(x, x_adv, high, norm, bview)
    return out, _dist(out, x, norm)


def _estimate_direction(oracle, x_b, y, num_evals, delta, norm, generator):
    """The baseline-corrected Monte-Carlo estimate of the boundary normal at x_b (unit l2)."""
    n = x_b.shape[0]
    feat = x_b[0].numel()
    chunk = max(1, min(num_evals, _PROBE_ELEMENTS // max(1, n * feat)))
    s_fr = torch.zeros_like(x_b, dtype=torch.float32)
    s_r = torch.zeros_like(x_b, dtype=torch.float32)
    s_f = torch.zeros(n, device=x_b.device)
    dv = delta.view((-1, 1) + (1,) * (x_b.dim() - 1))
    done = 0
    while done < num_evals:
        m = min(chunk, num_evals - done)
        shape = (n, m) + tuple(x_b.shape[1:])
        if norm == "l2":
            rv = torch.randn(shape, generator=generator, device=x_b.device)
        else:
            rv = torch.rand(shape, generator=generator, device=x_b.device).mul_(2).sub_(1)
        rv /= rv.flatten(2).norm(dim=2).clamp_min(1e-12).view((n, m) + (1,) * (x_b.dim() - 1))
        probe = (x_b.float()[:, None] + dv * rv).clamp(0.0, 1.0)
        rv = (probe - x_b.float()[:, None]) / dv
        fval = oracle(probe.to(x_b.dtype).flatten(0, 1), y.repeat_interleave(m)).view(n, m).float() * 2 - 1
        s_fr += (fval.view((n, m) + (1,) * (x_b.dim() - 1)) * rv).sum(dim=1)
        s_r += rv.sum(dim=1)
        s_f += fval.sum(dim=1)
        done += m
    mean_f = (s_f / num_evals).view((-1,) + (1,) * (x_b.dim() - 1))
    constant = mean_f.abs() == 1  # every probe on one side: no baseline to subtract
    grad = torch.where(constant, mean_f * s_r, s_fr - mean_f * s_r) / num_evals
    return grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(mean_f.shape)


def _initial_points(oracle, x, y, *, tries, generator, bview):
    """Uniform noise that is adversarial (else another sample of the batch with a different label),
    blended towards x by binary search. Returns (x_adv, found). x must be classified correctly."""
    n = x.shape[0]
    start = x.clone()
    found = torch.zeros(n, dtype=torch.bool, device=x.device)
    for _ in range(tries):
        idx = (~found).nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        noise = torch.rand(x[idx].shape, generator=generator, device=x.device).to(x.dtype)
        ok = oracle(noise, y[idx])
        start[idx] = torch.where(ok.view(bview), noise, start[idx])
        found[idx] |= ok
    # fallback: another sample of the batch with a different label (correct points, so it is
    # classified as that label and is adversarial for this one)
    idx = (~found).nonzero().squeeze(1)
    if idx.numel() > 0 and n > 1:
        perm = torch.randperm(n, generator=generator, device=x.device) if generator is not None \
            else torch.randperm(n, device=x.device)
        other = y[perm][None, :] != y[idx][:, None]  # (k, n)
        has = other.any(dim=1)
        j = perm[other.float().argmax(dim=1)]
        start[idx] = torch.where(has.view(bview), x[j], start[idx])
        found[idx] = has
    low = torch.zeros(n, device=x.device)
    high = torch.ones(n, device=x.device)
    for _ in range(12):
        mid = 0.5 * (low + high)
        adv = oracle(_project(x, start, mid, "l2", bview), y)
        high = torch.where(adv, mid, high)
        low = torch.where(adv, low, mid)
    x_adv = torch.where(found.view(bview), _project(x, start, high, "l2", bview), x)
    return x_adv, found


def _hsj(model, x, y, *, norm, steps, init_evals, max_evals, gamma, init_tries, eps, batch_size,
         generator, progress):
    """HSJ on the samples of x that are classified correctly (validated; model in eval mode).

    Returns (x_adv, found, dist): found marks samples with an adversarial point."""
    bview = (-1,) + (1,) * (x.dim() - 1)
    oracle = _Oracle(model, batch_size)
    d = x[0].numel()
    theta = gamma / (d * math.sqrt(d)) if norm == "l2" else gamma / (d * d)
    x_adv, found = _initial_points(oracle, x, y, tries=init_tries, generator=generator, bview=bview)
    dist = torch.full((x.shape[0],), float("inf"), device=x.device)
    idx = found.nonzero().squeeze(1)
    if idx.numel() > 0:
        xb, db = _binary_search(oracle, x[idx], y[idx], x_adv[idx], norm, theta, bview)
        x_adv[idx], dist[idx] = xb, db
    eps_vec = None if eps is None else C.budget_vector(eps, x.shape[0], x.device)
    if progress:
        from tqdm.auto import tqdm  # imported only here: `import drp_kernels` does not need tqdm

        bar = tqdm(range(1, steps + 1), desc="hop_skip_jump", leave=False)
    else:
        bar = range(1, steps + 1)
    for t in bar:
        todo = found if eps_vec is None else found & (dist > eps_vec)  # done once within the budget
        idx = todo.nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        xs, ys, xa, da = x[idx], y[idx], x_adv[idx], dist[idx]
        if t == 1:
            delta = torch.full_like(da, 0.1)
        else:
            delta = (math.sqrt(d) if norm == "l2" else d) * theta * da
        delta = delta.clamp_min(1e-8)
        num_evals = int(min(init_evals * math.sqrt(t), max_evals))
        grad = _estimate_direction(oracle, xa, ys, num_evals, delta, norm, generator)
        update = grad if norm == "l2" else grad.sign()
        size = da / math.sqrt(t)
        ok = torch.zeros_like(todo[idx])
        cand = xa.clone()
        for _ in range(_MAX_STEP_HALVINGS):
            left = (~ok).nonzero().squeeze(1)
            if left.numel() == 0:
                break
            trial = (xa[left].float() + size[left].view(bview) * update[left]).clamp(0.0, 1.0).to(x.dtype)
            adv = oracle(trial, ys[left])
            cand[left] = torch.where(adv.view(bview), trial, cand[left])
            ok[left] = adv
            size[left] = torch.where(adv, size[left], 0.5 * size[left])
        xb, db = _binary_search(oracle, xs, ys, cand, norm, theta, bview)
        keep = db < da  # never accept a step that moved away from x
        x_adv[idx] = torch.where(keep.view(bview), xb, xa)
        dist[idx] = torch.where(keep, db, da)
    if progress:
        bar.close()
    return x_adv, found, dist


def hop_skip_jump(model, x, y, *, norm="l2", steps=40, init_evals=100, max_evals=10000, gamma=1.0,
                  init_tries=100, eps=None, batch_size=4096, seed=0, progress=False):
    """Untargeted HopSkipJump, a decision-based attack (labels only).

    Args:
        model: maps inputs in [0, 1] to logits (only the argmax is used).
        x: inputs (B, ...) in [0, 1]; y: int64 labels (B,).
        norm: "l2" or "linf" (the distance minimised).
        steps: iterations (>= 1); init_evals / max_evals: gradient-estimate probes at the
            first iteration / at most (num_evals = init_evals * sqrt(t)); gamma: sets the
            binary-search threshold; init_tries: random-noise draws to find a starting point.
        eps: None, or a budget (float or length-B tensor) in ``norm``: then a sample whose
            adversarial point is farther than eps is returned as x (and its search stops as
            soon as it is within eps), so ``model(result)`` gives the accuracy under eps.
        batch_size: rows per model query (bounds memory); seed: seeds the random probes.
        progress: show a tqdm bar over the iterations.

    Returns the adversarial inputs: the closest adversarial point found per sample, or x
    where none was found (or, with eps, none within eps). Misclassified samples return x.
    """
    y, _, norm = C.validate_attack(model, x, y, norm=norm)
    steps = C.check_positive_int(steps, name="steps")
    init_evals = C.check_positive_int(init_evals, name="init_evals")
    max_evals = C.check_positive_int(max_evals, name="max_evals")
    init_tries = C.check_positive_int(init_tries, name="init_tries")
    batch_size = C.check_positive_int(batch_size, name="batch_size")
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not gamma > 0:
        raise ValueError(f"gamma must be a float > 0, got {gamma!r}")
    if eps is not None:
        eps = C.check_budget(eps, x)
    gen = C.make_generator(seed, x.device)
    x = x.detach()
    if x.shape[0] == 0:
        return x.clone()
    with C.eval_mode(model), torch.no_grad():
        logits = model(x[:1])
        C.check_logits(logits, y, rows=1, min_classes=2, what="hop_skip_jump")
        correct = C.predict(model, x, batch_size=batch_size) == y
        out = x.clone()
        idx = correct.nonzero().squeeze(1)
        if idx.numel() > 0:
            e = None if eps is None else C.subset_budget(eps, idx)
            x_adv, found, dist = _hsj(model, x[idx], y[idx], norm=norm, steps=steps, init_evals=init_evals,
                                      max_evals=max_evals, gamma=float(gamma), init_tries=init_tries, eps=e,
                                      batch_size=batch_size, generator=gen, progress=progress)
            ok = found if eps is None else found & (dist <= C.budget_vector(e, idx.numel(), x.device))
            out[idx] = torch.where(ok.view((-1,) + (1,) * (x.dim() - 1)), x_adv, x[idx])
    return out
