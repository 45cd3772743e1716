"""The optimiser, the per-step learning-rate schedule and the per-step seeds of a training run."""
import math

import numpy as np
import torch

from .errors import ConfigError

__all__ = ["make_optimizer", "make_scheduler", "lr_factor", "derive_seed"]


def make_optimizer(cfg, params):
    """The optimiser of a resolved TrainConfig: SGD with momentum, or Adam with the l-inf-distance
    nets' settings (beta1 = --momentum, beta2 0.99, eps 1e-10)."""
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=(cfg.momentum, 0.99), eps=1e-10,
                                weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def make_scheduler(cfg, optimizer, total_steps: int):
    """The per-step ``LambdaLR`` of ``cfg.schedule`` over ``total_steps`` optimiser steps, after the
    first ``cfg.lr_hold`` of them at the base lr."""
    factor = lr_factor(cfg.schedule, total_steps, hold=getattr(cfg, "lr_hold", 0.0))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def lr_factor(schedule, total, *, hold=0.0):
    """Multiplier of the base lr after ``t`` optimiser steps out of ``total``.

    ``hold`` (a fraction in [0, 1)) keeps the base lr for the first ``round(hold * total)`` steps;
    ``schedule`` then runs over the remaining steps (the l-inf-distance nets' recipe: constant lr
    while p is held at 8, then cosine)."""
    total = max(int(total), 1)
    hold = float(hold)
    if not 0.0 <= hold < 1.0:
        raise ConfigError(f"--lr-hold must be in [0, 1), got {hold}")
    held = min(int(round(hold * total)), total - 1)
    if held:
        rest = lr_factor(schedule, total - held)
        return lambda t: 1.0 if t < held else rest(t - held)
    if schedule == "cosine":
        return lambda t: 0.5 * (1.0 + math.cos(math.pi * min(t, total) / total))
    if schedule == "cyclic":
        # one triangle: 0 -> lr over the first 2/5 of training, back to 0 at the end (Wong et al. 2020)
        peak = 0.4 * total
        return lambda t: float(np.interp(t + 1, [0, peak, total], [0.0, 1.0, 0.0]))
    if schedule == "multistep":
        return lambda t: 0.1 ** ((t >= 0.5 * total) + (t >= 0.75 * total))
    raise ConfigError(f"--schedule must be cosine, cyclic or multistep, got {schedule!r}")


def derive_seed(*parts) -> int:
    """A 63-bit seed mixed from integers (splitmix64 steps), stable across runs and platforms."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) & 0xFFFFFFFFFFFFFFFF
        h = (h * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
        h = (h * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h & 0x7FFFFFFFFFFFFFFF
