"""drp_train.plots on synthetic data: valid PNGs, atomic writes, PCA, bad input."""
import os
import struct

import numpy as np
import pytest
import torch

from drp_train import plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path):
    """(width, height) of a PNG file, checking its signature and IHDR chunk."""
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def assert_png(path, *, min_bytes=5000):
    assert os.path.isfile(path), path
    w, h = png_size(path)
    assert w > 200 and h > 200, (w, h)
    assert os.path.getsize(path) > min_bytes, os.path.getsize(path)
    # nothing temporary is left next to it
    assert not [f for f in os.listdir(os.path.dirname(path)) if f.startswith(".tmp-")]


def _curve(clean, robust, eps=(0.05, 0.1, 0.3)):
    return {"clean_accuracy": clean,
            "results": [{"eps": e, "robust_accuracy": r, "per_attack": {"apgd-ce": r}, "flags": []}
                        for e, r in zip(eps, robust)]}


def test_accuracy_vs_eps_png(tmp_path):
    path = tmp_path / "acc.png"
    curves = {"ce": _curve(0.9, [0.3, 0.05, 0.0]), "pgd-at": _curve(0.85, [0.8, 0.72, 0.1])}
    assert plots.plot_accuracy_vs_eps(curves, path) == str(path)
    assert_png(str(path))


def test_accuracy_vs_eps_replaces_existing_file_atomically(tmp_path):
    path = tmp_path / "acc.png"
    path.write_bytes(b"old")
    plots.plot_accuracy_vs_eps({"ce": _curve(0.9, [0.3, 0.05, 0.0])}, path)
    assert_png(str(path))


def test_training_curves_png(tmp_path):
    rng = np.random.default_rng(0)
    metrics = {
        name: [{"epoch": e, "lr": 0.05, "train_loss": float(2.0 / (e + 1) + rng.random() * 0.01),
                "train_accuracy": 0.5 + 0.1 * e, "test_accuracy": 0.45 + 0.1 * e, "epoch_time_s": 1.0}
               for e in range(1, 5)]
        for name in ("ce", "drp-linf", "pgd-at")
    }
    plots.plot_training_curves(metrics, tmp_path / "curves.png")
    assert_png(str(tmp_path / "curves.png"))


def test_projection_png_with_prototypes(tmp_path):
    g = torch.Generator().manual_seed(0)
    protos = torch.randn(10, 16, generator=g) * 5
    y = torch.arange(300) % 10
    z = protos[y] + 0.3 * torch.randn(300, 16, generator=g)
    plots.plot_projection(z, y, protos, tmp_path / "proj.png", "synthetic")
    assert_png(str(tmp_path / "proj.png"))
    plots.plot_projection(z.numpy(), y.numpy(), None, tmp_path / "proj_logits.png", "no prototypes")
    assert_png(str(tmp_path / "proj_logits.png"))


def test_pca_2d_recovers_the_leading_plane():
    # Points spread along e0 (std 10) and e1 (std 3) with tiny noise elsewhere: the
    # projection must keep the distances within that plane and map prototypes alike.
    g = torch.Generator().manual_seed(1)
    n, d = 400, 6
    z = torch.zeros(n, d, dtype=torch.float64)
    z[:, 0] = 10 * torch.randn(n, generator=g, dtype=torch.float64)
    z[:, 1] = 3 * torch.randn(n, generator=g, dtype=torch.float64)
    z[:, 2:] = 1e-3 * torch.randn(n, d - 2, generator=g, dtype=torch.float64)
    z += torch.tensor([1.0, -2.0, 3.0, 0.0, 0.5, 7.0], dtype=torch.float64)
    protos = z[:5].clone()
    z2, p2 = plots.pca_2d(z, extra=protos)
    assert z2.shape == (n, 2) and p2.shape == (5, 2)
    np.testing.assert_allclose(p2, z2[:5], atol=1e-9)
    # centred, and pairwise distances preserved up to the discarded noise
    np.testing.assert_allclose(z2.mean(axis=0), 0.0, atol=1e-9)
    full = torch.cdist(z[:50], z[:50]).numpy()
    flat = np.linalg.norm(z2[:50, None] - z2[None, :50], axis=-1)
    np.testing.assert_allclose(flat, full, atol=1e-2)
    # the first component carries the larger variance
    assert z2[:, 0].var() > 5 * z2[:, 1].var()


def test_pca_2d_one_dimensional_outputs():
    z = torch.arange(6, dtype=torch.float32).reshape(6, 1)
    z2, _ = plots.pca_2d(z)
    assert z2.shape == (6, 2)
    np.testing.assert_allclose(np.abs(z2[:, 0]), np.abs(np.arange(6) - 2.5), atol=1e-6)
    np.testing.assert_allclose(z2[:, 1], 0.0)


def test_bad_input_names_the_argument(tmp_path):
    with pytest.raises(ValueError, match="curves"):
        plots.plot_accuracy_vs_eps({}, tmp_path / "a.png")
    with pytest.raises(ValueError, match="curves"):
        plots.plot_accuracy_vs_eps({"x": {"clean_accuracy": 0.5}}, tmp_path / "a.png")
    with pytest.raises(ValueError, match="metrics"):
        plots.plot_training_curves({"ce": []}, tmp_path / "b.png")
    with pytest.raises(ValueError, match="y"):
        plots.plot_projection(torch.zeros(5, 3), torch.zeros(4), None, tmp_path / "c.png", "t")
    with pytest.raises(ValueError, match="prototypes"):
        plots.plot_projection(torch.randn(5, 3), torch.zeros(5), torch.zeros(2, 4), tmp_path / "d.png", "t")
    with pytest.raises(ValueError, match="path"):
        plots.plot_accuracy_vs_eps({"ce": _curve(0.9, [0.3, 0.05, 0.0])}, tmp_path / "missing" / "a.png")
    assert list(tmp_path.iterdir()) == []
