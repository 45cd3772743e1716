"""Prototype generation, separation, saving and loading (CPU, reference path unless noted)."""
import math
import os
import warnings

import numpy as np
import pytest
import torch

from drp_kernels import load_prototypes, reference, repulsive_prototypes, save_prototypes, separation


def _quiet(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return repulsive_prototypes(*args, **kwargs)


def _simplex(C, D, seed=0):
    """A regular simplex of C unit vectors in R^D (C <= D + 1), randomly rotated."""
    e = torch.eye(C, dtype=torch.float64) - 1.0 / C  # centred corners span C - 1 dimensions
    q, _ = torch.linalg.qr(torch.randn(D, D, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)))
    basis = torch.linalg.svd(e, full_matrices=False)[2][: C - 1]  # (C-1, C) orthonormal rows
    coords = e @ basis.T  # (C, C-1)
    x = coords @ q[:, : C - 1].T
    return (x / x.norm(dim=1, keepdim=True)).float()


# -------------------------------------------------------------------------- quality
@pytest.mark.parametrize("C,D", [(10, 9), (10, 100), (100, 500)])
def test_cosine_reaches_simplex(C, D):
    P = repulsive_prototypes(C, D, metric="cosine")
    assert P.shape == (C, D) and P.dtype == torch.float32
    s = separation(P, metric="cosine")
    assert s["optimum"] == pytest.approx(-1.0 / (C - 1))
    assert s["max_cosine"] - (-1.0 / (C - 1)) <= 1e-3, s
    assert torch.allclose(P.norm(dim=1), torch.ones(C), atol=1e-5)


def test_l2_on_sphere_reaches_simplex():
    P = repulsive_prototypes(10, 9, metric="l2")
    s = separation(P, metric="l2")
    assert s["optimum"] == pytest.approx(math.sqrt(2 + 2 / 9))
    assert s["gap"] <= 1e-3, s


def test_linf_box_reaches_corners():
    P = repulsive_prototypes(12, 40, metric="linf")
    assert P.abs().max() <= 1.0
    s = separation(P, metric="linf")
    assert s["optimum"] == 2.0 and s["min_distance"] >= 2.0 - 1e-5, s


def test_many_classes_halves_max_cosine():
    """C=1000 in D=64 (no known optimum): the max cosine of random unit vectors is at least halved.

    Fewer steps than the default keep this test quick; the annealing schedule is the same.
    """
    C, D = 1000, 64
    start = torch.randn(C, D, generator=torch.Generator().manual_seed(0))
    c0 = separation(start, metric="cosine")["max_cosine"]
    with pytest.warns(UserWarning, match="simplex"):
        P = repulsive_prototypes(C, D, metric="cosine", steps=150)
    s = separation(P, metric="cosine")
    assert s["optimum"] is None and s["gap"] is None
    assert s["max_cosine"] <= 0.5 * c0, (s["max_cosine"], c0)


def test_paper_method_increases_min_linf_distance():
    start = repulsive_prototypes(20, 30, method="paper", steps=0, seed=3)
    assert start.abs().max() <= 1.0  # uniform in [-1, 1]
    P = repulsive_prototypes(20, 30, method="paper", seed=3)
    assert separation(P, metric="linf")["min_distance"] > separation(start, metric="linf")["min_distance"]
    # no constraint: the paper's prototypes leave the box, so the box optimum does not apply
    assert P.abs().max() > 1.0 and separation(P, metric="linf")["optimum"] is None


def test_paper_method_follows_sgd_on_the_sum_energy():
    """One paper step equals one plain SGD step (lr 0.01) on the reference's sum of L-inf distances."""
    start = repulsive_prototypes(7, 5, method="paper", steps=0, seed=1)
    one = repulsive_prototypes(7, 5, method="paper", steps=1, seed=1)
    p = start.double().requires_grad_(True)
    reference.repulsion_energy(p, metric="linf", kind="sum").backward()
    assert torch.allclose(one.double(), start.double() - 0.01 * p.grad, atol=1e-6)


# ------------------------------------------------------------------ reproducibility
@pytest.mark.parametrize("method,metric", [("default", "cosine"), ("default", "linf"), ("paper", "linf")])
def test_reproducible_per_seed(method, metric):
    a = repulsive_prototypes(6, 6, metric=metric, method=method, steps=30, seed=5)
    b = repulsive_prototypes(6, 6, metric=metric, method=method, steps=30, seed=5)
    c = repulsive_prototypes(6, 6, metric=metric, method=method, steps=30, seed=6)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_triton_path_follows_cpu_path(monkeypatch):
    """Generation through the kernels (interpreter) tracks the CPU fast path step for step."""
    cpu = repulsive_prototypes(6, 5, metric="cosine", steps=15, seed=2)
    lin = repulsive_prototypes(6, 5, metric="linf", steps=15, seed=2)
    monkeypatch.setenv("DRP_BACKEND", "triton")
    assert torch.allclose(repulsive_prototypes(6, 5, metric="cosine", steps=15, seed=2), cpu, atol=1e-4)
    assert torch.allclose(repulsive_prototypes(6, 5, metric="linf", steps=15, seed=2), lin, atol=1e-4)


def test_one_dimensional_sphere():
    P = repulsive_prototypes(2, 1, metric="cosine")
    assert separation(P, metric="cosine")["max_cosine"] == -1.0


# ------------------------------------------------------------------------ warnings
def test_warns_when_simplex_impossible():
    with pytest.warns(UserWarning, match="cross-polytope"):
        repulsive_prototypes(8, 4, metric="cosine", steps=3)
    with pytest.warns(UserWarning, match="no optimum is known"):
        repulsive_prototypes(9, 4, metric="l2", steps=3)
    with pytest.warns(UserWarning, match="2\\*\\*dim"):
        repulsive_prototypes(5, 2, metric="linf", steps=3)


def test_no_warning_when_optimum_reachable():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        repulsive_prototypes(5, 4, metric="cosine", steps=3)
        repulsive_prototypes(4, 2, metric="linf", steps=3)


# ---------------------------------------------------------------------- separation
def test_separation_simplex_and_cross_polytope():
    s = separation(_simplex(6, 8), metric="cosine")
    assert s["max_cosine"] == pytest.approx(-0.2, abs=1e-6)
    assert s["min_distance"] == pytest.approx(1.2, abs=1e-6)
    assert s["mean_distance"] == pytest.approx(1.2, abs=1e-6)
    assert s["optimum_of"] == "max_cosine" and s["gap"] == pytest.approx(0.0, abs=1e-6)
    cross = torch.cat([torch.eye(4), -torch.eye(4)])  # C = 8 = 2D
    s = separation(cross, metric="cosine")
    assert s["optimum"] == 0.0 and s["max_cosine"] == 0.0
    assert separation(cross, metric="l2")["optimum"] == pytest.approx(math.sqrt(2.0))
    assert separation(2 * cross, metric="l2")["optimum"] is None  # not on the unit sphere
    assert separation(torch.randn(9, 4), metric="cosine")["optimum"] is None  # C > 2D


def test_separation_linf_and_blocks():
    corners = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
    s = separation(corners, metric="linf")
    assert s["min_distance"] == 2.0 and s["optimum"] == 2.0 and s["gap"] == 0.0
    assert s["mean_distance"] == 2.0 and s["max_cosine"] == 0.0
    P = torch.randn(50, 7)
    for metric in ("cosine", "l2", "linf"):
        d = reference.pairwise_distance(P.double(), metric=metric)
        off = ~torch.eye(50, dtype=torch.bool)
        for block in (3, 50, 4096):
            s = separation(P, metric=metric, block_rows=block)
            assert s["min_distance"] == pytest.approx(d[off].min().item(), rel=1e-5, abs=1e-6)
            assert s["mean_distance"] == pytest.approx(d[off].mean().item(), rel=1e-5)
            assert s["max_cosine"] == pytest.approx((1 - reference.pairwise_distance(P.double(), metric="cosine"))[off].max().item(), abs=1e-6)


# ---------------------------------------------------------------------- save / load
@pytest.mark.parametrize("ext", [".pt", ".npy"])
def test_save_load_round_trip(tmp_path, ext):
    P = torch.randn(7, 3, dtype=torch.float64)
    path = tmp_path / f"protos{ext}"
    save_prototypes(P, path)
    Q = load_prototypes(path)
    assert Q.dtype == torch.float32 and torch.equal(Q, P.float())
    save_prototypes(2 * P, str(path))  # overwrite in place
    assert torch.equal(load_prototypes(str(path)), (2 * P).float())
    assert sorted(os.listdir(tmp_path)) == [f"protos{ext}"]  # no temporary file left


def test_save_load_errors(tmp_path):
    P = torch.randn(4, 2)
    with pytest.raises(ValueError, match=r"\.pt"):
        save_prototypes(P, tmp_path / "p.txt")
    with pytest.raises(ValueError, match="2-D"):
        save_prototypes(torch.randn(4), tmp_path / "p.pt")
    with pytest.raises(ValueError, match="floating"):
        save_prototypes(torch.ones(4, 2, dtype=torch.int32), tmp_path / "p.pt")
    with pytest.raises(FileNotFoundError, match="directory"):
        save_prototypes(P, tmp_path / "missing" / "p.pt")
    assert os.listdir(tmp_path) == []  # nothing written
    with pytest.raises(FileNotFoundError, match="no prototype file"):
        load_prototypes(tmp_path / "absent.npy")
    with pytest.raises(ValueError, match=r"\.npy"):
        load_prototypes(tmp_path / "p.csv")
    torch.save(torch.randn(5), tmp_path / "vec.pt")
    with pytest.raises(ValueError, match="2-D"):
        load_prototypes(tmp_path / "vec.pt")
    torch.save({"p": P}, tmp_path / "dict.pt")
    with pytest.raises(ValueError, match="dict"):
        load_prototypes(tmp_path / "dict.pt")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError):
        load_prototypes(tmp_path / "obj.npy")  # pickled object arrays are refused


# ------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("args,kwargs,match", [
    ((1, 4), {}, "num_classes"),
    ((True, 4), {}, "num_classes"),
    ((2.0, 4), {}, "num_classes"),
    ((4, 0), {}, "dim"),
    ((4, 3), dict(metric="l1"), "metric"),
    ((4, 3), dict(method="tammes"), "method"),
    ((4, 3), dict(steps=-1), "steps"),
    ((4, 3), dict(lr=0.0), "lr"),
    ((4, 3), dict(lr=float("inf")), "lr"),
    ((4, 3), dict(seed=-1), "seed"),
])
def test_generation_bad_input(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        repulsive_prototypes(*args, **kwargs)


@pytest.mark.parametrize("P,kwargs,match", [
    (torch.randn(5), dict(metric="cosine"), "2-D"),
    (torch.ones(3, 2, dtype=torch.int64), dict(metric="cosine"), "floating"),
    (torch.randn(1, 3), dict(metric="cosine"), "at least 2 rows"),
    (torch.randn(3, 3), dict(metric="hamming"), "metric"),
    (np.zeros((3, 3)), dict(metric="cosine"), "torch.Tensor"),
])
def test_separation_bad_input(P, kwargs, match):
    with pytest.raises(ValueError, match=match):
        separation(P, **kwargs)


@pytest.mark.cuda
def test_cuda_generation_matches_quality():
    P = repulsive_prototypes(100, 500, metric="cosine", device="cuda")
    assert P.is_cuda and P.dtype == torch.float32
    assert separation(P, metric="cosine")["max_cosine"] + 1.0 / 99 <= 1e-3
    Q = repulsive_prototypes(100, 500, metric="cosine", device="cuda")
    assert torch.equal(P, Q)  # the kernels use no atomics: reproducible on the GPU too
    L = repulsive_prototypes(100, 64, metric="linf", device="cuda")
    assert separation(L, metric="linf")["min_distance"] >= 2.0 - 1e-5
