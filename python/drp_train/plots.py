"""Plots for the training layer: accuracy against eps, training curves and a 2-D
projection of the network outputs with the prototypes marked; and ``drp plot``, several
``drp eval`` reports in one figure.

matplotlib runs with the Agg backend (no display is needed). Every figure is written
atomically (``drp_kernels.atomic_write``) in the format its file name's extension
names: PNG, JPEG, PDF or SVG.
"""
import json
import math
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import torch  # noqa: E402

from drp_kernels import atomic_write  # noqa: E402
from drp_kernels.attacks import NORMS  # noqa: E402

from ._cli_utils import PLOT_SUFFIXES, check_output_path, cli_error, one_line  # noqa: E402
from .config import run_label  # noqa: E402
from .evaluation import NORM_NAMES  # noqa: E402

__all__ = [
    "plot_accuracy_vs_eps",
    "plot_training_curves",
    "plot_projection",
    "pca_2d",
    "save_figure",
    "wilson_interval",
    "PLOT_SUFFIXES",
    "add_plot_arguments",
    "run_plot",
]


#: File types a figure can be written as, by extension (matplotlib renders each natively;
#: JPEG goes through Pillow, which matplotlib requires).
_FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".pdf": "pdf", ".svg": "svg"}


def save_figure(fig, path, *, dpi=120):
    """Save ``fig`` atomically to ``path`` in the format its extension names (``PLOT_SUFFIXES``)
    and close it. Returns the path."""
    path = os.fspath(path)
    try:
        ext = os.path.splitext(path)[1].lower()
        if ext not in _FORMATS:
            raise ValueError(f"path: expected a file name ending in {', '.join(PLOT_SUFFIXES)}, got {path!r}")
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise ValueError(f"path: folder {folder!r} does not exist")
        atomic_write(path, lambda f: fig.savefig(f, format=_FORMATS[ext], dpi=dpi, bbox_inches="tight"))
    finally:
        plt.close(fig)
    return path


def wilson_interval(p, n, *, z=1.959963984540054):
    """The Wilson score interval (low, high) of a proportion ``p`` observed on ``n`` trials
    (95% for the default z). Unlike p +- z sqrt(p(1-p)/n) it stays inside [0, 1] and does not
    collapse to a point at p = 0 or 1."""
    if n <= 0:
        raise ValueError(f"n: expected a number of trials >= 1, got {n}")
    p = min(max(float(p), 0.0), 1.0)
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def _check_curve(name, curve):
    if not isinstance(curve, dict) or "results" not in curve:
        raise ValueError(f"curves[{name!r}]: expected an accuracy_vs_eps result with 'results', "
                         f"got {type(curve).__name__}")
    for r in curve["results"]:
        if "eps" not in r or "robust_accuracy" not in r:
            raise ValueError(f"curves[{name!r}]: every result needs 'eps' and 'robust_accuracy'")


def _plot_series(ax, pts, *, label, color, linestyle, marker, count):
    """One accuracy-vs-eps line (fractions -> percent), with 95% Wilson intervals when ``count``
    points were evaluated (a number, or one per point); returns whether intervals were drawn."""
    eps = [e for e, _ in pts]
    acc = [100.0 * a for _, a in pts]
    ax.plot(eps, acc, marker=marker, linestyle=linestyle, color=color, label=label)
    counts = list(count) if isinstance(count, (list, tuple)) else [count] * len(pts)
    if not all(counts):
        return False
    lo, hi = zip(*(wilson_interval(a, int(c)) for (_, a), c in zip(pts, counts)))
    ax.fill_between(eps, [100.0 * v for v in lo], [100.0 * v for v in hi], color=color, alpha=0.15, linewidth=0)
    ax.errorbar(eps, acc, yerr=[[max(a - 100.0 * v, 0.0) for a, v in zip(acc, lo)],
                                [max(100.0 * v - a, 0.0) for a, v in zip(acc, hi)]],
                fmt="none", ecolor=color, capsize=3, linewidth=1)
    return True


_NORM_LABELS = {"linf": "L-inf", "l2": "L2"}


def plot_accuracy_vs_eps(curves, path, *, title="Robust accuracy against L-inf eps", n=None, norm="linf"):
    """Plot robust accuracy against eps for every model in `curves`.

    `curves` maps a model name to an `accuracy_vs_eps` result
    (`{"clean_accuracy": float, "results": [{"eps", "robust_accuracy", ...}, ...]}`).
    A curve whose results carry "certified_accuracy" (a certifiable model) gets a second,
    dashed line of the certified accuracy in the same colour.
    The clean accuracy is drawn at eps 0. Accuracies are fractions in [0, 1] and
    are shown in percent. With the number of evaluated points (`n`, or a curve's own
    "n"; a result's "certified_n" for its certified accuracy) every point gets its 95% Wilson
    interval. `norm` ("linf" or "l2") names the eps axis; an L-inf axis is labelled both as a
    fraction of the [0, 1] input range (bottom) and in /255 pixel steps (top).
    """
    if not curves:
        raise ValueError("curves: expected at least one model, got none")
    if norm not in _NORM_LABELS:
        raise ValueError(f"norm: expected 'linf' or 'l2', got {norm!r}")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"n: expected a number of evaluated points >= 1, got {n!r}")
    fig, ax = plt.subplots(figsize=(6.8, 4.6))
    with_ci = False
    for i, (name, curve) in enumerate(curves.items()):
        _check_curve(name, curve)
        color = f"C{i % 10}"
        count = curve.get("n", n)
        series = [("robust_accuracy", str(name), "-", "o")]
        if any("certified_accuracy" in r for r in curve["results"]):
            series = [("robust_accuracy", f"{name}: robust (attacked)", "-", "o"),
                      ("certified_accuracy", f"{name}: certified", "--", "D")]
        for key, label, style, marker in series:
            nkey = "certified_n" if key == "certified_accuracy" else "n"
            rows = sorted((float(r["eps"]), float(r[key]), r.get(nkey, count)) for r in curve["results"] if key in r)
            pts = [(e, a) for e, a, _ in rows]
            counts = [c for _, _, c in rows]
            if curve.get("clean_accuracy") is not None and not any(e == 0.0 for e, _ in pts):
                pts.insert(0, (0.0, float(curve["clean_accuracy"])))
                counts.insert(0, count)
            with_ci |= _plot_series(ax, pts, label=label, color=color, linestyle=style, marker=marker, count=counts)
    ax.set_xlabel(f"{_NORM_LABELS[norm]} eps (inputs in [0, 1])")
    ax.set_ylabel("accuracy (%)" + (", 95% Wilson interval" if with_ci else ""))
    ax.set_ylim(-2, 102)
    ax.grid(True, alpha=0.3)
    if norm == "linf":
        top = ax.secondary_xaxis("top", functions=(lambda e: e * 255.0, lambda k: k / 255.0))
        top.set_xlabel("eps in /255 pixel steps")
    ax.set_title(title)
    ax.legend()
    return save_figure(fig, path)


def plot_training_curves(metrics, path, *, title="Training curves"):
    """Plot test accuracy, train accuracy and train loss per epoch for every model.

    `metrics` maps a model name to its list of per-epoch records (the lines of
    `metrics.jsonl`: epoch, train_loss, train_accuracy, test_accuracy, ...).
    The losses of different methods live on different scales, so the loss panel
    uses a log scale when every loss is positive.
    """
    if not metrics:
        raise ValueError("metrics: expected at least one model, got none")
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4.2))
    all_pos = True
    for i, (name, rows) in enumerate(metrics.items()):
        if not rows:
            raise ValueError(f"metrics[{name!r}]: no epochs recorded")
        color = f"C{i % 10}"
        epochs = [int(r["epoch"]) for r in rows]
        if any(r.get("test_accuracy") is not None for r in rows):
            ep = [e for e, r in zip(epochs, rows) if r.get("test_accuracy") is not None]
            ax_acc.plot(ep, [100.0 * r["test_accuracy"] for r in rows if r.get("test_accuracy") is not None],
                        marker="o", color=color, label=f"{name} test")
        if any(r.get("train_accuracy") is not None for r in rows):
            ep = [e for e, r in zip(epochs, rows) if r.get("train_accuracy") is not None]
            adversarial = any(r.get("train_on") == "adversarial" for r in rows)
            ax_acc.plot(ep, [100.0 * r["train_accuracy"] for r in rows if r.get("train_accuracy") is not None],
                        linestyle="--", marker="s", markersize=4, color=color, alpha=0.6,
                        label=f"{name} train" + (" (adversarial)" if adversarial else ""))
        losses = [(e, float(r["train_loss"])) for e, r in zip(epochs, rows) if r.get("train_loss") is not None]
        if losses:
            all_pos = all_pos and all(v > 0 and math.isfinite(v) for _, v in losses)
            ax_loss.plot([e for e, _ in losses], [v for _, v in losses], marker="o", color=color, label=name)
    all_epochs = sorted({int(r["epoch"]) for rows in metrics.values() for r in rows})
    for ax in (ax_acc, ax_loss):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if len(all_epochs) == 1:  # one point per series: centre it on its epoch
            ax.set_xlim(all_epochs[0] - 0.5, all_epochs[0] + 0.5)
            ax.set_xticks(all_epochs)
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy (%)")
    ax_acc.set_title("accuracy (solid: clean test, dashed: train)")
    ax_acc.grid(True, alpha=0.3)
    ax_acc.legend(fontsize=8)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("train loss")
    ax_loss.set_title("training loss (each method's own loss)")
    if all_pos and ax_loss.lines:
        ax_loss.set_yscale("log")
    ax_loss.grid(True, alpha=0.3)
    if ax_loss.lines:
        ax_loss.legend(fontsize=8)
    fig.suptitle(title)
    return save_figure(fig, path)


def _as_numpy_2d(a, name):
    if isinstance(a, torch.Tensor):
        a = a.detach().float().cpu().numpy()
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array (N, D), got shape {a.shape}")
    return a


def pca_2d(z, *, extra=None):
    """Project the rows of `z` (N, D) onto their two leading principal components.

    Returns `(z2, extra2)`: `z` and `extra` (e.g. the prototypes, (C, D) or None)
    projected with the mean and components fitted on `z` alone. A one-dimensional
    `z` (D == 1) gets a zero second coordinate.
    """
    z = _as_numpy_2d(z, "z")
    mean = z.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(z - mean, full_matrices=False)
    comps = vt[:2]

    def proj(a):
        out = (a - mean) @ comps.T
        if out.shape[1] < 2:
            out = np.concatenate([out, np.zeros((out.shape[0], 2 - out.shape[1]))], axis=1)
        return out

    z2 = proj(z)
    extra2 = None
    if extra is not None:
        extra = _as_numpy_2d(extra, "prototypes")
        if extra.shape[1] != z.shape[1]:
            raise ValueError(f"prototypes: expected {z.shape[1]} columns like z, got {extra.shape[1]}")
        extra2 = proj(extra)
    return z2, extra2


def plot_projection(z, y, prototypes, path, title, *, class_names=None, max_points=2000):
    """Scatter a 2-D PCA projection of the outputs `z` (N, D) coloured by label `y`.

    `prototypes` ((C, D) or None) are projected with the same PCA and marked with a
    star in the colour of their class. At most `max_points` points are drawn (the
    first ones), so the PNG stays small.
    """
    z = _as_numpy_2d(z, "z")
    y = np.asarray(y.detach().cpu() if isinstance(y, torch.Tensor) else y).reshape(-1)
    if y.shape[0] != z.shape[0]:
        raise ValueError(f"y: expected {z.shape[0]} labels (one per row of z), got {y.shape[0]}")
    if z.shape[0] < 2:
        raise ValueError(f"z: expected at least 2 points to project, got {z.shape[0]}")
    z2, p2 = pca_2d(z, extra=prototypes)
    n_classes = int(max(int(y.max()) + 1, 0 if p2 is None else p2.shape[0]))
    cmap = plt.get_cmap("tab10" if n_classes <= 10 else "tab20")
    color = lambda c: cmap(c % cmap.N)  # noqa: E731
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    keep = slice(0, max_points)
    zs, ys = z2[keep], y[keep]
    for c in np.unique(ys):
        m = ys == c
        label = class_names[int(c)] if class_names is not None else str(int(c))
        ax.scatter(zs[m, 0], zs[m, 1], s=8, alpha=0.6, color=color(int(c)), label=label)
    if p2 is not None:
        for c in range(p2.shape[0]):
            ax.scatter(p2[c, 0], p2[c, 1], marker="*", s=260, color=color(c), edgecolors="black", linewidths=1.0,
                       zorder=5)
        ax.scatter([], [], marker="*", s=120, color="white", edgecolors="black", label="prototypes")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    # outside the axes, so it never covers the points
    ax.legend(fontsize=7, markerscale=1.5, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    return save_figure(fig, path)


# ----------------------------------------------------------------------------- drp plot
def add_plot_arguments(parser):
    """Add the `drp plot` options to an argparse (sub)parser."""
    parser.add_argument("reports", nargs="+", metavar="EVAL_JSON[=LABEL]",
                        help="JSON reports written by `drp eval --json`, each optionally labelled, e.g. "
                             "results/fashion-mnist/pgd-at/eval.json=PGD-AT; all of one norm")
    parser.add_argument("--out", required=True, metavar="FILE", help="the plot to write (.png, .jpg, .pdf, .svg)")
    parser.add_argument("--suite", default=None,
                        help="the suite to plot: picks it from reports holding several, and single-suite reports "
                             "must be of it (default: standard from multi-suite reports, single-suite reports "
                             "as they are)")
    parser.add_argument("--title", default=None, help="plot title")
    return parser


def _read_report(spec, suite):
    path, _, label = spec.partition("=")
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as exc:
        raise cli_error(f"{path}: cannot read the report: {one_line(exc)}") from None
    except ValueError as exc:
        raise cli_error(f"{path}: not a JSON report: {one_line(exc)}") from None
    if not isinstance(data, dict):
        raise cli_error(f"{path}: not a `drp eval` report")
    if "suites" in data:
        suite = suite or "standard"
        if suite not in data["suites"]:
            raise cli_error(f"{path}: no suite {suite!r} in the report (it holds {', '.join(data['suites'])}); "
                             "pick one with --suite")
        curve = dict(data["suites"][suite])
        curve["suite"] = suite
    elif "results" in data:
        if suite is not None and data.get("suite") not in (None, suite):
            raise cli_error(f"{path}: the report is of suite {data.get('suite')!r}, not {suite!r}; "
                             f"pass --suite {data.get('suite')}")
        curve = {"clean_accuracy": data.get("clean_accuracy"), "results": data["results"],
                 "suite": data.get("suite") or "standard"}
    else:
        raise cli_error(f"{path}: not a `drp eval` report (no results)")
    curve["n"] = data.get("n")
    curve["norm"] = data.get("norm", "linf")  # reports before the L2 suite were all L-inf
    if curve["norm"] not in NORMS:
        raise cli_error(f"{path}: unknown norm {curve['norm']!r} (expected linf or l2)")
    if not label:
        label = run_label(data.get("method") or os.path.basename(os.path.dirname(os.path.abspath(path))),
                          data.get("metric"))
    return label, curve


def run_plot(args):
    """`drp plot`: several eval reports in one accuracy-vs-eps plot (certified accuracy dashed)."""
    check_output_path(args.out, "--out", suffixes=PLOT_SUFFIXES)
    curves = {}
    for spec in args.reports:
        label, curve = _read_report(spec, args.suite)
        if label in curves:
            raise cli_error(f"two reports are labelled {label!r}: label them, e.g. FILE.json=NAME")
        curves[label] = curve
    norms = sorted({c["norm"] for c in curves.values()})
    if len(norms) > 1:
        raise cli_error(f"the reports mix norms ({' and '.join(norms)}): eps of different norms cannot share an "
                         "axis; plot each norm on its own")
    ns = {c["n"] for c in curves.values() if c.get("n")}
    suites = sorted({c["suite"] for c in curves.values()})
    title = args.title or f"accuracy against {NORM_NAMES[norms[0]]} eps ({' / '.join(suites)} suite" + (
        f", n={ns.pop()})" if len(ns) == 1 else ")")
    plot_accuracy_vs_eps(curves, args.out, title=title, norm=norms[0])
    print(f"wrote {args.out}")
    return 0
