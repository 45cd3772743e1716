"""Prototype generation. PROVISIONAL: the paper method only, until issue 4 lands."""
import torch

from . import functional as Fn
from . import reference

__all__ = ["repulsive_prototypes", "separation", "save_prototypes", "load_prototypes"]


def repulsive_prototypes(num_classes, dim, *, metric="cosine", method="default", steps=100, lr=0.01, seed=0, device=None):
    g = torch.Generator().manual_seed(seed)
    p = (torch.rand(num_classes, dim, generator=g) * 2 - 1).to(device or "cpu").requires_grad_(True)
    opt = torch.optim.SGD([p], lr=lr, momentum=0.9)
    for _ in range(steps):
        opt.zero_grad()
        Fn.repulsion_energy(p, metric="linf", kind="sum").backward()
        opt.step()
    return p.detach().float()


def separation(P, *, metric):
    d = reference.pairwise_distance(P, metric=metric)
    off = ~torch.eye(P.shape[0], dtype=torch.bool)
    cos = 1 - reference.pairwise_distance(P, metric="cosine")
    return {"min_distance": d[off].min().item(), "mean_distance": d[off].mean().item(),
            "max_cosine": cos[off].max().item(), "optimum": None}


def save_prototypes(P, path):
    torch.save(P, path)


def load_prototypes(path):
    return torch.load(path, weights_only=True)
