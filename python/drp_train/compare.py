"""`drp compare`: train CE, DRP-linf, DRP-cosine and PGD-AT with the same budget,
evaluate each with the attack suite over a list of eps, and report.

Everything goes into `--out`: one run folder per method (checkpoints and
metrics.jsonl from `drp_train.train.train`), `accuracy_vs_eps.png`,
`training_curves.png`, `projection_<method>.png`, `report.md` and `compare.json`.
The ``certified`` method trains its own network (an l-inf-distance net, the preset's
``method_settings``) and gets its certified accuracy as a row of its own; ``--recertify``
re-certifies a committed certified checkpoint beside the table.
"""
import argparse
import math
import os
import platform
import shlex
import sys
import time

import torch

import drp_kernels

from ._cli_utils import (
    atomic_write,
    check_at_least,
    check_eps_list,
    cli_error as _cli_error,
    parse_eps,
    pick_device,
    stderr_is_terminal,
    write_json_atomic,
)
from .checkpoint import load_classifier, resolve_checkpoint_path
from .errors import CheckpointError
from .compare_report import committed_counts, fmt_time, format_report, format_table, recertify_line
from .config import DEFAULT_BATCH_SIZE, TrainConfig
from .evaluation import SUITES, certify_eps, evaluate_model, load_eval_data
from .plots import plot_accuracy_vs_eps, plot_projection, plot_training_curves
from .run_folder import RunFolder, prepare_output_folder, refuse_existing_runs
from .train import train

__all__ = [
    "add_compare_arguments",
    "run_compare",
    "resolve_settings",
    "format_table",
    "format_report",
    "model_outputs",
    "command_line",
    "METHODS",
    "DEFAULT_METHODS",
    "PRESETS",
]

# Name in the table -> TrainConfig fields that select the method.
METHODS = {
    "ce": {"method": "ce"},
    "drp-linf": {"method": "drp", "metric": "linf"},
    "drp-cosine": {"method": "drp", "metric": "cosine"},
    "pgd-at": {"method": "pgd-at"},
    "trades": {"method": "trades"},
    "fast-at": {"method": "fast-at"},
    "certified": {"method": "certified", "model": "linf-dist"},
}
DEFAULT_METHODS = ("ce", "drp-linf", "drp-cosine", "pgd-at")

CLASS_NAMES = {
    "fashion-mnist": ("T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                      "Ankle boot"),
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
}

# Settings of a comparison that are not TrainConfig options.
_EVAL_DEFAULTS = {"eval_limit": 1000, "eps": [0.1], "suite": "standard", "eval_batch_size": 500,
                  "paper_attack": True}
# Training options of one method that differ from the others' (a certified net has its own
# architecture and batch size). A flag given on the command line overrides them too.
_METHOD_SETTINGS = {"certified": {"batch_size": DEFAULT_BATCH_SIZE[True]}}
#: Test points that --recertify certifies (the first ones; eval.json counts them too).
RECERTIFY_POINTS = 1000


def _compare_preset(**settings) -> dict:
    """A `drp compare` preset: TrainConfig's defaults for the training options (None where
    TrainConfig resolves them per dataset and method), the evaluation defaults, then ``settings``."""
    d = TrainConfig()
    base = {"dataset": d.dataset, "model": d.model, "epochs": d.epochs, "batch_size": DEFAULT_BATCH_SIZE[False],
            "lr": d.lr,
            "limit_train": d.limit_train, "limit_test": d.limit_test, "train_eps": d.eps,
            "attack_steps": d.attack_steps, "methods": list(DEFAULT_METHODS), **_EVAL_DEFAULTS,
            "method_settings": {m: dict(v) for m, v in _METHOD_SETTINGS.items()}}
    unknown = sorted(set(settings) - set(base))
    if unknown:
        raise ValueError(f"a compare preset names unknown settings: {', '.join(unknown)}")
    for m, extra in settings.pop("method_settings", {}).items():
        base["method_settings"].setdefault(m, {}).update(extra)
    base.update(settings)
    return base


# Settings a preset fixes; explicit flags override them. None means "drp train's default"
# (resolved per dataset and method) or "no limit" (for the limits).
PRESETS = {
    # `make demo`: the headline in at most 3 minutes on a 2-core CPU (the AMD EPYC of
    # bench/RESULTS.md, the slowest we measure on). CE and DRP-linf 2 epochs, PGD-AT 1 (its
    # steps cost 6 of theirs), on 20k images; the standard suite at eps 0.1 on 50 test points
    # (Square takes half of the evaluation time), and DRP also under the paper's own attack.
    # A small certified net (3 x 128, first layer 256) trains 5 epochs, batch 512, on the same
    # images.
    "demo": _compare_preset(
        methods=["ce", "drp-linf", "pgd-at", "certified"], epochs=2, limit_train=20000, limit_test=1000,
        eval_limit=50, eps=[0.1], attack_steps=5,
        method_settings={"pgd-at": {"epochs": 1}, "certified": {"depth": 3, "width": 128, "epochs": 5}}),
    # The full comparison: full Fashion-MNIST, 20 epochs, eps 0.1 and 0.3 on 1000 test points.
    "full": _compare_preset(epochs=20, eps=[0.1, 0.3], attack_steps=7),
}


def add_compare_arguments(parser):
    """Add the `drp compare` options to an argparse (sub)parser."""
    a = parser.add_argument
    a("--preset", choices=sorted(PRESETS), default="full",
      help="settings to start from; explicit flags override them. demo: CE and DRP-linf 2 epochs and PGD-AT 1 "
           "on 20k images, a small certified net 5 epochs, eps 0.1 on 50 evaluation points (at most 3 minutes on 2 "
           "CPU cores); full: every default "
           "method, 20 epochs on all images, eps 0.1 and 0.3 on 1000 evaluation points (default: full)")
    a("--dataset", default=None, help="fashion-mnist|mnist|cifar10|cifar100 (preset: fashion-mnist)")
    a("--data-dir", default=None, metavar="DIR", help="dataset folder (default: the standard location)")
    a("--out", default=None, metavar="DIR", help="output folder (default: <preset>_out)")
    a("--methods", nargs="+", default=None, metavar="M",
      help=f"subset of {', '.join(METHODS)} (default: the preset's; full: {' '.join(DEFAULT_METHODS)})")
    a("--model", default=None, help="network for every method but certified, which trains linf-dist (preset: cnn)")
    a("--epochs", type=int, default=None, help="training epochs (default: the preset's)")
    a("--batch-size", type=int, default=None, help=f"training batch size (default {DEFAULT_BATCH_SIZE[False]})")
    a("--lr", type=float, default=None, help="learning rate for every method (default: drp train's)")
    a("--weight-decay", type=float, default=None, help="weight decay for every method (default: drp train's)")
    a("--train-eps", type=parse_eps, default=None, metavar="EPS",
      help="L-inf eps of adversarial training, e.g. 0.1 or 8/255 (default: drp train's)")
    a("--attack-steps", type=int, default=None, help="PGD steps of adversarial training")
    a("--limit-train", type=int, default=None, metavar="N", help="train on the first N training points")
    a("--limit-test", type=int, default=None, metavar="N", help="per-epoch test accuracy on the first N test points")
    a("--eps", type=parse_eps, nargs="+", default=None, metavar="E",
      help="eval eps list, numbers or fractions such as 8/255 (default: the preset's)")
    a("--eval-limit", type=int, default=None, metavar="N", help="evaluate on the first N test points")
    a("--suite", choices=SUITES, default=None, help="attack suite for every model (default: standard)")
    a("--paper-attack", action=argparse.BooleanOptionalAction, default=None,
      help="also evaluate each DRP model under the paper's own attack (suite paper; default: on)")
    a("--eval-batch-size", type=int, default=None, metavar="B", help="attack batch size (preset: 500)")
    a("--recertify", default=None, metavar="CHECKPOINT",
      help=f"also re-certify this certified checkpoint (run folder or .pt) on the first {RECERTIFY_POINTS} test "
           "points at each eps, and compare with the eval.json beside it (make demo: the committed model)")
    a("--seed", type=int, default=0, help="default 0")
    a("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    a("--resume", action="store_true",
      help="continue (or reuse, when finished) the runs already in --out instead of refusing them")
    a("--quiet", action="store_true", help="no progress bars")
    return parser


def resolve_settings(args):
    """Merge the preset with the explicit flags and validate. Returns a plain dict."""
    s = dict(PRESETS[args.preset])
    s["method_settings"] = {m: dict(v) for m, v in s["method_settings"].items()}
    s["preset"] = args.preset
    explicit = set()
    for key in ("dataset", "model", "epochs", "batch_size", "lr", "limit_train", "limit_test", "eval_limit",
                "eps", "train_eps", "attack_steps", "suite", "eval_batch_size", "paper_attack"):
        val = getattr(args, key, None)
        if val is not None:
            s[key] = val
            explicit.add(key)
    # an explicit flag applies to every method, also where the preset sets a method's own value
    for extra in s["method_settings"].values():
        for key in explicit & set(extra):
            del extra[key]
    s["recertify"] = getattr(args, "recertify", None)
    s["data_dir"] = args.data_dir
    s["weight_decay"] = getattr(args, "weight_decay", None)
    s["methods"] = list(args.methods) if args.methods else list(s["methods"])
    s["seed"] = args.seed
    s["out"] = args.out if args.out is not None else f"{args.preset}_out"

    unknown = [m for m in s["methods"] if m not in METHODS]
    if unknown:
        raise _cli_error(f"--methods: unknown {', '.join(unknown)}; expected some of {', '.join(METHODS)}")
    if len(set(s["methods"])) != len(s["methods"]):
        raise _cli_error(f"--methods: each method at most once, got {' '.join(s['methods'])}")
    s["eps"] = check_eps_list(s["eps"])
    for key in ("epochs", "batch_size", "eval_limit", "limit_train", "limit_test", "attack_steps", "eval_batch_size"):
        check_at_least("--" + key.replace("_", "-"), s[key], 1)
    if s["lr"] is not None and not (math.isfinite(s["lr"]) and s["lr"] > 0):
        raise _cli_error(f"--lr: expected a positive learning rate, got {s['lr']:g}")
    if s["train_eps"] is not None and not (math.isfinite(s["train_eps"]) and 0 <= s["train_eps"] <= 1):
        raise _cli_error(f"--train-eps: expected eps in [0, 1], got {s['train_eps']:g}")
    return s


def _train_config(settings, name, device):
    wanted = {
        "dataset": settings["dataset"],
        "data_dir": settings["data_dir"],
        "model": settings["model"],
        "epochs": settings["epochs"],
        "batch_size": settings["batch_size"],
        "lr": settings["lr"],
        "weight_decay": settings["weight_decay"],
        "eps": settings["train_eps"],
        "attack_steps": settings["attack_steps"],
        "seed": settings["seed"],
        "limit_train": settings["limit_train"],
        "limit_test": settings["limit_test"],
        "out": os.path.join(settings["out"], name),
        "quiet": settings["quiet"],
        # --resume continues the runs that exist; the others start
        "resume": settings["resume"] and RunFolder(os.path.join(settings["out"], name)).checkpoint() is not None,
        "device": None if device is None else str(device),
        **settings["method_settings"].get(name, {}),
        **METHODS[name],
    }
    # None means "keep drp train's default" for the options compare does not pin.
    kwargs = {k: v for k, v in wanted.items() if v is not None or k in ("limit_train", "limit_test")}
    cfg = TrainConfig(**kwargs)
    cfg.validate()  # ConfigError (one line, exit 2) before any training time is spent
    return cfg


@torch.no_grad()
def model_outputs(model, x, *, batch_size=512):
    """Outputs to project in 2-D: (z, prototypes or None, what z is).

    For a ProtoClassifier z is the network output and the prototypes come with it;
    with the cosine metric both are L2-normalised, since only directions matter.
    For any other classifier z is the logits.
    """
    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if isinstance(model, drp_kernels.ProtoClassifier):
        net, protos, kind = model.net, model.prototypes.detach().float().cpu(), "network outputs z"
    else:
        net, protos, kind = model, None, "logits"
    zs = [net(x[i:i + batch_size].to(device)).float().cpu() for i in range(0, x.shape[0], batch_size)]
    z = torch.cat(zs)
    if protos is not None and getattr(model, "metric", None) == "cosine":
        z = torch.nn.functional.normalize(z, dim=1)
        protos = torch.nn.functional.normalize(protos, dim=1)
        kind = "L2-normalised network outputs z"
    return z, protos, kind


def _environment(device):
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "drp_kernels": getattr(drp_kernels, "__version__", "?"),
        "device": str(device),
        "cpu": f"{platform.machine()}, {os.cpu_count()} cores",
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def run_compare(args):
    """`drp compare`: returns the exit code (0); misuse raises CLIError."""
    settings = resolve_settings(args)
    settings["quiet"] = bool(args.quiet)
    settings["resume"] = bool(getattr(args, "resume", False))
    device = pick_device(args.device)
    out = settings["out"]
    check_at_least("--seed", settings["seed"], 0)
    # Every run's options are checked before anything is created or trained.
    configs = {name: _train_config(settings, name, device) for name in settings["methods"]}
    if settings["model"] is None:  # drp train's default for the dataset, the same for every method but certified
        shared = [c for name, c in configs.items() if name != "certified"] or list(configs.values())
        settings["model"] = shared[0].resolved().model
    recert = _recertify_model(settings["recertify"], device)
    if not settings["resume"]:
        refuse_existing_runs(os.path.join(out, name) for name in settings["methods"])
    prepare_output_folder(out)
    progress = not args.quiet
    bars = progress and stderr_is_terminal()  # redirected output gets the plain lines only
    command = command_line(args)

    # Load the evaluation points first: a missing dataset fails before any training.
    # (once: --recertify takes the first RECERTIFY_POINTS of the same points)
    limit = settings["eval_limit"]
    if recert is not None and limit is not None:
        limit = max(limit, RECERTIFY_POINTS)
    x, y = load_eval_data(settings["dataset"], data_dir=settings["data_dir"], limit=limit)
    if recert is not None:
        recert_data = (x[:RECERTIFY_POINTS], y[:RECERTIFY_POINTS])
    if settings["eval_limit"] is not None:
        x, y = x[:settings["eval_limit"]], y[:settings["eval_limit"]]

    t_start = time.perf_counter()
    rows, files = [], []
    for name in settings["methods"]:
        cfg = configs[name]
        if progress:
            print(f"[compare] training {name} -> {cfg.out}", file=sys.stderr, flush=True)
        info = train(cfg, progress=progress)
        model = load_classifier(info["checkpoint"])
        if progress:
            print(f"[compare] evaluating {name} ({settings['suite']} suite, eps {settings['eps']})",
                  file=sys.stderr, flush=True)
        ev = evaluate_model(model, x, y, eps_list=settings["eps"], suite=settings["suite"],
                            batch_size=settings["eval_batch_size"], seed=settings["seed"], device=device,
                            progress=bars)
        ev["n"] = int(y.shape[0])
        paper_ev = None
        if settings["paper_attack"] and isinstance(model, drp_kernels.ProtoClassifier):
            if progress:
                print(f"[compare] evaluating {name} under the paper's attack", file=sys.stderr, flush=True)
            paper_ev = evaluate_model(model, x, y, eps_list=settings["eps"], suite="paper",
                                      batch_size=settings["eval_batch_size"], seed=settings["seed"], device=device,
                                      progress=bars)
            paper_ev["n"] = int(y.shape[0])
        z, protos, kind = model_outputs(model.to(device), x)
        proj = os.path.join(out, f"projection_{name}.png")
        title = f"{name}: 2-D PCA of the {kind}" + (" (stars: prototypes)" if protos is not None else "")
        plot_projection(z, y, protos, proj, title, class_names=CLASS_NAMES.get(settings["dataset"]))
        files.append(os.path.basename(proj))
        rows.append({
            "name": name,
            "config": {k: v for k, v in METHODS[name].items()},
            "training": _training_summary(cfg),
            "suite": settings["suite"],
            "run_dir": os.path.relpath(cfg.out, out),
            "checkpoint": os.path.relpath(info["checkpoint"], out),
            "train_time_s": float(info["train_time_s"]),
            "final": info.get("final", {}),
            "metrics": RunFolder(cfg.out).read_metrics() or [dict(m) for m in info.get("metrics", [])],
            "eval": ev,
            "paper_eval": paper_ev,
        })
    recertified = None
    if recert is not None:
        if progress:
            print(f"[compare] re-certifying {settings['recertify']}", file=sys.stderr, flush=True)
        recertified = _recertify(recert, *recert_data, settings["eps"], settings["eval_batch_size"])
    total = time.perf_counter() - t_start

    curves = {}
    for r in rows:
        curves[r["name"]] = r["eval"]
        if r.get("paper_eval") is not None:
            curves[f"{r['name']} (paper's attack)"] = r["paper_eval"]
    plot_accuracy_vs_eps(curves, os.path.join(out, "accuracy_vs_eps.png"), n=int(y.shape[0]),
                         title=f"{settings['dataset']}: accuracy against L-inf eps ({settings['suite']} suite, "
                               f"n={int(y.shape[0])})")
    curves = {r["name"]: r["metrics"] for r in rows if r["metrics"]}
    if curves:
        plot_training_curves(curves, os.path.join(out, "training_curves.png"),
                             title=f"{settings['dataset']}: training curves")
        files.insert(0, "training_curves.png")
    files.insert(0, "accuracy_vs_eps.png")
    files += ["compare.json", "report.md"]

    env = _environment(device)
    saved = {k: v for k, v in settings.items()}
    write_json_atomic({"command": command, "settings": saved, "environment": env, "total_time_s": total,
                       "models": {r["name"]: {k: v for k, v in r.items() if k != "name"} for r in rows},
                       "recertified": recertified},
                      os.path.join(out, "compare.json"))
    report = format_report(rows=rows, settings=saved, command=command, total_time_s=total, files=files,
                           environment=env)
    if recertified is not None:
        report = report.replace("\n## Command\n", f"\n{recertify_line(recertified)}\n\n## Command\n", 1)
    _write_text_atomic(report, os.path.join(out, "report.md"))
    print(format_table(rows, settings["eps"]))
    if recertified is not None:
        print(recertify_line(recertified))
    n_flags = sum(len(r["eval"].get("flags", [])) + sum(len(x["flags"]) for x in r["eval"]["results"]) for r in rows)
    if n_flags:
        print(f"{n_flags} evaluation flag(s) raised: see the Flags section of report.md")
    print(f"total {fmt_time(total)}; wrote {', '.join(files)} to {out}")
    return 0


def _training_summary(cfg):
    """What a method trained: network, epochs and batch (a certified net differs from the others)."""
    c = cfg.resolved()
    net = f"{c.model} {c.depth} x {c.width}, first layer {c.width_first}" if c.model == "linf-dist" else c.model
    return {"network": net, "epochs": c.epochs, "batch_size": c.batch_size}


def _recertify_model(path, device):
    """The certified classifier of --recertify, loaded (and refused) before any training."""
    if path is None:
        return None
    try:
        resolved = resolve_checkpoint_path(path)
        model = load_classifier(resolved, device=None if device is None else str(device))
    except CheckpointError as exc:
        raise _cli_error(f"--recertify: {exc}") from None
    if not drp_kernels.is_certifiable(model):
        raise _cli_error(f"--recertify: expected a certified checkpoint (method certified, model linf-dist), got "
                         f"{path}")
    return {"path": path, "resolved": resolved, "model": model}


def _recertify(recert, x, y, eps_list, batch_size):
    """Certify the first len(x) test points at each eps; with the counts its eval.json recorded."""
    t0 = time.perf_counter()
    cert, _ = certify_eps(recert["model"], x, y, eps_list, batch_size=batch_size)
    seconds = time.perf_counter() - t0
    report, committed = committed_counts(recert["resolved"], int(y.shape[0]))
    return {"checkpoint": recert["path"], "n": int(y.shape[0]), "time_s": seconds, "report": report,
            "results": [{"eps": float(e), "certified": int(c.sum()), "committed": committed.get(float(e))}
                        for e, c in zip(eps_list, cert)]}


def command_line(args):
    """The `drp compare` command line equivalent to `args` (explicitly set options only)."""
    parts = ["drp", "compare", "--preset", args.preset]
    for dest in ("dataset", "data_dir", "out", "methods", "model", "epochs", "batch_size", "lr", "weight_decay",
                 "train_eps", "attack_steps", "limit_train", "limit_test", "eps", "eval_limit", "suite",
                 "eval_batch_size", "recertify",
                 "seed", "device"):
        val = getattr(args, dest, None)
        if val is None or (dest == "seed" and val == 0):
            continue
        parts.append("--" + dest.replace("_", "-"))
        parts += [str(v) for v in val] if isinstance(val, (list, tuple)) else [str(val)]
    if getattr(args, "paper_attack", None) is not None:
        parts.append("--paper-attack" if args.paper_attack else "--no-paper-attack")
    if getattr(args, "resume", False):
        parts.append("--resume")
    if args.quiet:
        parts.append("--quiet")
    return " ".join(shlex.quote(p) for p in parts)


def _write_text_atomic(text, path):
    return atomic_write(path, lambda f: f.write(text), binary=False)
