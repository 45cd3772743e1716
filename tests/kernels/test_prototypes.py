"""Prototype generation, separation, saving and loading (CPU, reference path unless noted)."""
import math
import os
import warnings

import numpy as np
import pytest
import torch

from _helpers import DEVICE
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
    P = repulsive_prototypes(12, 40, metric="linf", method="box")
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


def _min_hamming(P):
    b = P > 0
    h = (b[:, None, :] != b[None, :, :]).sum(-1)
    h.fill_diagonal_(P.shape[1] + 1)
    return int(h.min())


def test_hypercube_code_is_far_apart():
    """+-1 corners (L-inf distance 2, the box optimum) with large Hamming distances."""
    P, info = repulsive_prototypes(10, 100, method="hypercube", with_info=True)
    assert info == {"metric": "linf", "method": "hypercube"}
    assert P.shape == (10, 100) and P.dtype == torch.float32
    assert torch.equal(P.abs(), torch.ones_like(P))
    s = separation(P, metric="linf")
    assert s["optimum"] == 2.0 and s["min_distance"] == 2.0 and s["gap"] == 0.0
    # Plotkin: the mean pairwise Hamming distance of 10 words is at most 100 * 10 / 18 = 55.6;
    # random signs reach a minimum of about 34 (asserted below for this seed)
    assert _min_hamming(P) >= 50
    rand = torch.where(torch.rand(10, 100, generator=torch.Generator().manual_seed(0)) < 0.5, 1.0, -1.0)
    assert _min_hamming(rand) < 40
    assert torch.equal(repulsive_prototypes(10, 100, method="hypercube"), P)
    assert not torch.equal(repulsive_prototypes(10, 100, method="hypercube", seed=1), P)


@pytest.mark.parametrize("C,D,min_hamming", [(16, 4, 1), (8, 3, 1), (2, 1, 1), (10, 8, 3), (4, 2, 1), (3, 20, 12)])
def test_hypercube_small_dims_are_distinct_corners(C, D, min_hamming):
    P = repulsive_prototypes(C, D, metric="linf", method="hypercube")
    assert torch.equal(P.abs(), torch.ones_like(P))
    assert torch.unique(P, dim=0).shape[0] == C
    assert _min_hamming(P) >= min_hamming
    assert separation(P, metric="linf")["min_distance"] == 2.0


def test_linf_default_is_the_box_and_warns_beyond_the_corners():
    with pytest.warns(UserWarning, match="2\\*\\*dim"):
        P, info = repulsive_prototypes(5, 2, steps=20, with_info=True)
    assert info == {"metric": "linf", "method": "box"} and P.abs().max() <= 1.0


@pytest.mark.parametrize("metric,method", [("cosine", "sphere"), ("l2", "sphere"), ("linf", "box")])
def test_default_method_per_metric(metric, method):
    P, info = repulsive_prototypes(4, 6, metric=metric, steps=5, with_info=True)
    assert info == {"metric": metric, "method": method}
    assert torch.equal(P, repulsive_prototypes(4, 6, metric=metric, method=method, steps=5))
    assert info["method"] == repulsive_prototypes(4, 6, metric=metric, with_info=True, steps=1)[1]["method"]


def test_linf_default_stays_in_the_box_unlike_the_paper():
    """The default linf prototypes are a bounded target; the paper's grow without bound."""
    P = repulsive_prototypes(10, 100, steps=200)
    assert P.abs().max() <= 1.0 and separation(P, metric="linf")["min_distance"] >= 2.0 - 1e-5
    assert (P.abs() < 0.999).float().mean() > 0.5  # mostly inside the box: not the tie-prone corners
    assert repulsive_prototypes(10, 100, method="paper").abs().max() > 10.0


def test_paper_method_records_itself():
    P, info = repulsive_prototypes(4, 6, method="paper", steps=2, with_info=True)
    assert info == {"metric": "linf", "method": "paper"}
    assert torch.equal(P, repulsive_prototypes(4, 6, method="paper", steps=2))


def test_generation_runs_single_threaded_and_restores(monkeypatch):
    """CPU generation of small problems sees one thread, and the caller's thread count comes back."""
    import drp_kernels.prototypes.generation as protos
    from drp_kernels._contexts import single_thread

    seen = []
    real = protos._energy

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(protos, "_energy", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        repulsive_prototypes(6, 5, metric="cosine", steps=3)
        assert seen == [1, 1, 1]
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError, match="boom"):
            with single_thread():
                assert torch.get_num_threads() == 1
                raise RuntimeError("boom")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------ reproducibility
@pytest.mark.parametrize("method,metric", [("default", "cosine"), ("box", "linf"), ("paper", "linf")])
def test_reproducible_per_seed(method, metric):
    a = repulsive_prototypes(6, 6, metric=metric, method=method, steps=30, seed=5)
    b = repulsive_prototypes(6, 6, metric=metric, method=method, steps=30, seed=5)
    c = repulsive_prototypes(6, 6, metric=metric, method=method, steps=30, seed=6)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_triton_path_follows_cpu_path(monkeypatch):
    """Generation through the kernels (interpreter) tracks the CPU fast path step for step."""
    cpu = repulsive_prototypes(6, 5, metric="cosine", steps=15, seed=2)
    lin = repulsive_prototypes(6, 5, metric="linf", method="box", steps=15, seed=2)
    monkeypatch.setenv("DRP_BACKEND", "triton")  # the interpreter on CPU, the GPU when there is one
    kern = repulsive_prototypes(6, 5, metric="cosine", steps=15, seed=2, device=DEVICE)
    assert torch.allclose(kern.to("cpu"), cpu, atol=1e-4)
    kern = repulsive_prototypes(6, 5, metric="linf", method="box", steps=15, seed=2, device=DEVICE)
    assert torch.allclose(kern.to("cpu"), lin, atol=1e-4)


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
        repulsive_prototypes(4, 2, metric="linf", method="box", steps=3)
        repulsive_prototypes(4, 2, metric="linf", method="hypercube")


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
            cos = 1 - reference.pairwise_distance(P.double(), metric="cosine")
            assert s["max_cosine"] == pytest.approx(cos[off].max().item(), abs=1e-6)


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


@pytest.mark.parametrize("ext", [".pt", ".npy"])
def test_save_load_records_metric_and_method(tmp_path, ext):
    P, info = repulsive_prototypes(5, 8, method="hypercube", with_info=True)
    path = tmp_path / f"protos{ext}"
    save_prototypes(P, path, **info)
    Q, got = load_prototypes(path, with_info=True)
    assert torch.equal(Q, P) and got == {"metric": "linf", "method": "hypercube"}
    assert torch.equal(load_prototypes(path), P)  # without with_info: the tensor alone
    if ext == ".npy":
        assert sorted(os.listdir(tmp_path)) == ["protos.npy", "protos.npy.json"]
        assert np.load(path).dtype == np.float32  # still a plain array for numpy users
    else:
        assert sorted(os.listdir(tmp_path)) == ["protos.pt"]
    save_prototypes(P, path)  # no metadata: the file records none
    assert load_prototypes(path, with_info=True)[1] == {"metric": None, "method": None}
    assert sorted(os.listdir(tmp_path)) == [f"protos{ext}"]


def test_old_plain_files_load_without_metadata(tmp_path):
    P = torch.randn(4, 3)
    torch.save(P, tmp_path / "old.pt")
    np.save(tmp_path / "old.npy", P.numpy())
    for name in ("old.pt", "old.npy"):
        Q, info = load_prototypes(tmp_path / name, with_info=True)
        assert torch.equal(Q, P) and info == {"metric": None, "method": None}


def test_npy_sidecar_of_other_prototypes_is_ignored(tmp_path):
    path = tmp_path / "p.npy"
    save_prototypes(torch.ones(3, 2), path, metric="cosine", method="sphere")
    np.save(path, np.zeros((3, 2), dtype=np.float32))  # replaced behind save_prototypes' back
    with pytest.warns(UserWarning, match="other prototypes"):
        P, info = load_prototypes(path, with_info=True)
    assert info == {"metric": None, "method": None} and torch.equal(P, torch.zeros(3, 2))
    (tmp_path / "p.npy.json").write_text("{not json")
    with pytest.warns(UserWarning, match="unreadable"):
        assert load_prototypes(path, with_info=True)[1] == {"metric": None, "method": None}


def test_save_load_metadata_errors(tmp_path):
    P = torch.randn(4, 2)
    with pytest.raises(ValueError, match="metric"):
        save_prototypes(P, tmp_path / "p.pt", metric="cos")
    with pytest.raises(ValueError, match="method"):
        save_prototypes(P, tmp_path / "p.pt", method="default")  # record the method actually run
    with pytest.raises(TypeError, match="metric"):
        save_prototypes(P, tmp_path / "p.pt", metric=1)
    with pytest.raises(TypeError, match="path"):
        save_prototypes(P, 3)
    with pytest.raises(TypeError, match="torch.Tensor"):
        save_prototypes(P.numpy(), tmp_path / "p.pt")
    assert os.listdir(tmp_path) == []  # nothing written
    torch.save({"prototypes": P, "metric": "hamming", "method": None}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="metric in"):
        load_prototypes(tmp_path / "bad.pt", with_info=True)


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
@pytest.mark.parametrize("args,kwargs,exc,match", [
    ((1, 4), {}, ValueError, "num_classes"),
    ((True, 4), {}, TypeError, "num_classes"),
    ((2.0, 4), {}, TypeError, "num_classes"),
    ((4, 0), {}, ValueError, "dim"),
    ((4, 3), dict(metric="l1"), ValueError, "metric"),
    ((4, 3), dict(metric=None), TypeError, "metric"),
    ((4, 3), dict(method="tammes"), ValueError, "method"),
    ((4, 3), dict(steps=-1), ValueError, "steps"),
    ((4, 3), dict(method="box", lr=0.0), ValueError, "lr"),
    ((4, 3), dict(method="box", lr=float("inf")), ValueError, "lr"),
    ((4, 3), dict(method="box", lr="0.1"), TypeError, "lr"),
    ((4, 3), dict(seed=-1), ValueError, "seed"),
    ((4, 3), dict(method="hypercube", steps=10), ValueError, "hypercube"),  # it optimises nothing
    ((4, 3), dict(metric="linf", method="sphere"), ValueError, "sphere"),
    ((4, 3), dict(metric="cosine", method="box"), ValueError, "box"),
    ((9, 3), dict(method="hypercube"), ValueError, "2\\*\\*dim"),
])
def test_generation_bad_input(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        repulsive_prototypes(*args, **kwargs)


@pytest.mark.parametrize("P,kwargs,exc,match", [
    (torch.randn(5), dict(metric="cosine"), ValueError, "2-D"),
    (torch.ones(3, 2, dtype=torch.int64), dict(metric="cosine"), ValueError, "floating"),
    (torch.randn(1, 3), dict(metric="cosine"), ValueError, "at least 2 rows"),
    (torch.randn(3, 3), dict(metric="hamming"), ValueError, "metric"),
    (np.zeros((3, 3)), dict(metric="cosine"), TypeError, "torch.Tensor"),
])
def test_separation_bad_input(P, kwargs, exc, match):
    with pytest.raises(exc, match=match):
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
