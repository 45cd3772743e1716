"""drp_train.plots on synthetic data: valid PNGs, atomic writes, PCA, intervals, bad input."""
import math
import os
import stat

import numpy as np
import pytest
import torch

from _helpers import assert_png
from drp_train import plots

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


# ----------------------------------------------------------------------------- what the figures show
@pytest.fixture
def captured(monkeypatch):
    """The figures the plot functions build, kept open instead of written."""
    figs = []

    def keep(fig, path, **kw):
        figs.append(fig)
        return os.fspath(path)
    monkeypatch.setattr(plots, "save_figure", keep)
    yield figs
    for fig in figs:
        plots.plt.close(fig)


def test_one_epoch_curves_show_every_series_and_label_adversarial_training(captured, tmp_path):
    rows = {"ce": [{"epoch": 1, "train_loss": 0.5, "train_accuracy": 0.8, "test_accuracy": 0.82,
                    "train_on": "clean"}],
            "pgd-at": [{"epoch": 1, "train_loss": 1.0, "train_accuracy": 0.6, "test_accuracy": 0.75,
                        "train_on": "adversarial"}]}
    plots.plot_training_curves(rows, tmp_path / "c.png")
    ax_acc = captured[0].axes[0]
    lines = {line.get_label(): line for line in ax_acc.get_lines()}
    assert set(lines) == {"ce test", "ce train", "pgd-at test", "pgd-at train (adversarial)"}
    for label, line in lines.items():
        # a single point is only visible through its marker
        assert line.get_marker() not in (None, "None", "", " "), label
    lo, hi = ax_acc.get_xlim()
    assert lo < 1 < hi


def test_projection_legend_lies_outside_the_data(captured, tmp_path):
    g = torch.Generator().manual_seed(0)
    protos = torch.randn(10, 8, generator=g)
    y = torch.arange(200) % 10
    z = protos[y] + 0.2 * torch.randn(200, 8, generator=g)
    plots.plot_projection(z, y, protos, tmp_path / "p.png", "t")
    fig = captured[0]
    fig.canvas.draw()
    ax = fig.axes[0]
    legend = ax.get_legend().get_window_extent()
    axes_box = ax.get_window_extent()
    assert legend.x0 >= axes_box.x1, (legend, axes_box)


def test_wilson_interval_known_values():
    # 50 of 100: the textbook 95% Wilson interval is [0.4038, 0.5962], about +-10 points
    lo, hi = plots.wilson_interval(0.5, 100)
    assert (round(lo, 4), round(hi, 4)) == (0.4038, 0.5962)
    # at the edges it stays inside [0, 1] and does not collapse: 0 of 100 -> [0, 0.037]
    lo, hi = plots.wilson_interval(0.0, 100)
    assert lo == pytest.approx(0.0, abs=1e-12) and round(hi, 4) == 0.037
    lo, hi = plots.wilson_interval(1.0, 100)
    assert round(lo, 4) == 0.963 and hi == pytest.approx(1.0, abs=1e-12)
    # the half-width is the normal-approximation one, shrunk towards 1/2, and falls as 1/sqrt(n)
    for n in (100, 400, 10000):
        lo, hi = plots.wilson_interval(0.9, n)
        z = 1.959963984540054
        centre = (0.9 + z * z / (2 * n)) / (1 + z * z / n)
        assert math.isclose((lo + hi) / 2, centre, rel_tol=1e-12)
    with pytest.raises(ValueError, match="n"):
        plots.wilson_interval(0.5, 0)


def test_accuracy_vs_eps_shows_intervals_and_a_per_255_axis(captured, tmp_path):
    curve = _curve(0.9, [0.5, 0.2, 0.0])
    plots.plot_accuracy_vs_eps({"ce": curve}, tmp_path / "a.png", n=100)
    ax = captured[0].axes[0]
    # one error bar per point (clean at eps 0 plus three eps), spanning the Wilson interval
    bars = [c for c in ax.containers if c.__class__.__name__ == "ErrorbarContainer"]
    assert len(bars) == 1
    segments = bars[0].lines[2][0].get_segments()
    assert len(segments) == 4
    by_eps = {round(float(seg[0][0]), 6): (seg[0][1], seg[1][1]) for seg in segments}
    lo, hi = plots.wilson_interval(0.5, 100)
    assert by_eps[0.05] == pytest.approx((100 * lo, 100 * hi))
    # the secondary axis reads eps in /255 steps
    top = [child for child in ax.child_axes]
    assert top and "255" in top[0].get_xlabel()
    assert top[0]._functions[0](8 / 255) == pytest.approx(8.0)
    # without n there are no intervals
    plots.plot_accuracy_vs_eps({"ce": _curve(0.9, [0.5, 0.2, 0.0])}, tmp_path / "b.png")
    assert not [c for c in captured[1].axes[0].containers if c.__class__.__name__ == "ErrorbarContainer"]


@pytest.mark.parametrize("name, magic", [("a.jpg", b"\xff\xd8\xff"), ("a.jpeg", b"\xff\xd8\xff"),
                                         ("a.pdf", b"%PDF"), ("a.svg", b"<?xml")])
def test_figures_are_written_in_the_format_their_name_says(tmp_path, name, magic):
    path = tmp_path / name
    plots.plot_accuracy_vs_eps({"ce": _curve(0.9, [0.3, 0.05, 0.0])}, path)
    assert path.read_bytes()[:len(magic)] == magic


def test_unknown_figure_type_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match=r"\.png"):
        plots.plot_accuracy_vs_eps({"ce": _curve(0.9, [0.3, 0.05, 0.0])}, tmp_path / "a.txt")
    assert list(tmp_path.iterdir()) == []


def test_figures_respect_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = tmp_path / "a.png"
        plots.plot_accuracy_vs_eps({"ce": _curve(0.9, [0.3, 0.05, 0.0])}, path)
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        os.umask(0o077)
        plots.plot_accuracy_vs_eps({"ce": _curve(0.9, [0.3, 0.05, 0.0])}, tmp_path / "b.png")
        assert stat.S_IMODE((tmp_path / "b.png").stat().st_mode) == 0o600
    finally:
        os.umask(old)


def test_l2_plot_names_the_norm_and_certified_points_use_their_own_n(captured, tmp_path):
    curve = {"clean_accuracy": 0.9, "n": 100, "results": [
        {"eps": 0.5, "robust_accuracy": 0.5, "certified_accuracy": 0.5, "certified_n": 1000},
        {"eps": 1.0, "robust_accuracy": 0.2, "certified_accuracy": 0.1, "certified_n": 1000}]}
    plots.plot_accuracy_vs_eps({"m": curve}, tmp_path / "a.png", norm="l2")
    ax = captured[0].axes[0]
    assert ax.get_xlabel().startswith("L2 eps") and not ax.child_axes  # no /255 axis for L2
    bars = [c for c in ax.containers if c.__class__.__name__ == "ErrorbarContainer"]
    robust, certified = ({round(float(s[0][0]), 6): (s[0][1], s[1][1]) for s in b.lines[2][0].get_segments()}
                         for b in bars)
    # the same 50% at eps 0.5: the robust interval is of 100 points, the certified one of 1000
    assert robust[0.5] == pytest.approx(tuple(100 * v for v in plots.wilson_interval(0.5, 100)))
    assert certified[0.5] == pytest.approx(tuple(100 * v for v in plots.wilson_interval(0.5, 1000)))
    with pytest.raises(ValueError, match="norm"):
        plots.plot_accuracy_vs_eps({"m": curve}, tmp_path / "b.png", norm="l1")
