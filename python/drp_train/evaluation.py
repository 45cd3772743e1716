"""`drp eval`: robust accuracy of a trained checkpoint against a list of L-inf eps.

The classifier comes from `drp_train.checkpoint.load_classifier`, the test points
from the dataset named in the checkpoint's config, and the numbers from
`drp_kernels.attacks.accuracy_vs_eps`: the quick or the standard suite, and for a DRP
checkpoint also the paper's own protocol ("paper", "paper-100"), side by side when
several suites are given.
"""
import os
import time

import torch

from drp_kernels import attacks
from drp_kernels.certified import is_certifiable

from ._cli_utils import (
    PLOT_SUFFIXES,
    check_eps_list,
    check_output_path as _check_output_path,
    cli_error as _cli_error,
    one_line as _one_line,
    parse_eps,
    pick_device,
    write_json_atomic,
)

__all__ = [
    "add_eval_arguments",
    "run_eval",
    "evaluate_model",
    "resolve_checkpoint",
    "load_eval_data",
    "format_eval_table",
    "certified_points",
    "is_certifiable",
    "add_plot_arguments",
    "run_plot",
    "SUITES",
    "PAPER_SUITES",
    "DECISIONS",
]

SUITES = ("quick", "standard")  # the suites for any classifier
PAPER_SUITES = ("paper", "paper-100")  # the DRP paper's attack: ProtoClassifier checkpoints only
DECISIONS = ("nearest", "paper")

def add_eval_arguments(parser):
    """Add the `drp eval` options to an argparse (sub)parser."""
    parser.add_argument("--checkpoint", required=True, metavar="DIR_OR_FILE",
                        help="a checkpoint written by `drp train`, or its --out folder")
    parser.add_argument("--eps", type=parse_eps, nargs="+", required=True, metavar="E",
                        help="L-inf radii to evaluate, e.g. --eps 0.05 0.1 0.2")
    parser.add_argument("--suite", choices=SUITES + PAPER_SUITES, nargs="+", default=["standard"],
                        metavar="SUITE",
                        help="attack suites, reported side by side: standard (APGD-CE, APGD-T, Square), "
                             "quick, and for DRP checkpoints paper / paper-100 (the paper's PGD-20 / PGD-100 "
                             "on the distance to the true prototype); e.g. --suite paper standard "
                             "(default: standard)")
    parser.add_argument("--decision", choices=DECISIONS, default=None,
                        help="DRP checkpoints: the decision rule to evaluate, nearest prototype or the "
                             "paper's normalised dot product (default: the checkpoint's, nearest)")
    parser.add_argument("--limit", type=int, default=1000, metavar="N",
                        help="evaluate the first N test points (default: 1000)")
    parser.add_argument("--json", default=None, metavar="FILE",
                        help="also write the results to this JSON file (the table always goes to stdout)")
    parser.add_argument("--plot", default=None, metavar="FILE", help="also write an accuracy-vs-eps PNG")
    parser.add_argument("--batch-size", type=int, default=None, metavar="B",
                        help="attack batch size (default: the attack engine's)")
    parser.add_argument("--data-dir", default=None, metavar="DIR",
                        help="dataset folder (default: the checkpoint's, then the standard location)")
    parser.add_argument("--seed", type=int, default=0, help="attack seed (default: 0)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--compile", action="store_true",
                        help="run the attacks on torch.compile(model) (opt-in: on a CPU the compile time "
                             "did not pay for the small CNN)")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    return parser


def resolve_checkpoint(path):
    """The checkpoint file for `path`: the file itself, or final.pt / last.pt in a run folder."""
    from .checkpoint import resolve_checkpoint_path
    from .errors import CheckpointError

    path = os.fspath(path)
    if not os.path.exists(path):
        raise _cli_error(f"--checkpoint: {path} does not exist")
    try:
        return resolve_checkpoint_path(path)
    except CheckpointError as exc:
        raise _cli_error(f"--checkpoint: {_one_line(exc)}") from None


def _load(path):
    from .checkpoint import CheckpointError, load_checkpoint, load_classifier

    try:
        ckpt = load_checkpoint(path)
        model = load_classifier(path)
    except CheckpointError as exc:
        raise _cli_error(f"--checkpoint: {_one_line(exc)}") from None
    except OSError as exc:
        raise _cli_error(f"--checkpoint: cannot read {path!r}: {_one_line(exc)}") from None
    config = ckpt.get("config") if isinstance(ckpt, dict) else None
    if not isinstance(config, dict) or "dataset" not in config:
        raise _cli_error(f"--checkpoint: {path!r} is not a `drp train` checkpoint (no config with a dataset)")
    return model, ckpt, config


def load_eval_data(dataset, *, data_dir=None, limit=None):
    """The first `limit` test points of `dataset` as float [0, 1] inputs and int64 labels."""
    from .data import DatasetError, load_dataset

    try:
        x, y = load_dataset(dataset, split="test", data_dir=data_dir, limit=limit)
    except DatasetError as exc:
        raise _cli_error(_one_line(exc)) from None
    return x.float().div_(255.0), y.long()


def evaluate_model(model, x, y, *, eps_list, suite="standard", batch_size=None, seed=0, device=None,
                   progress=True, compile=False, checks=True):
    """Run `attacks.accuracy_vs_eps` (monotone in eps) and return its result in the `drp eval`
    JSON schema.

    Each entry of "results" holds exactly eps, robust_accuracy, per_attack and flags, and for a
    certifiable model (`is_certifiable`) also certified_accuracy: the fraction of points that
    `drp_kernels.certify` proves at that eps. A certified point that the suite broke would be a
    bug of the certificate: it raises RuntimeError (never a certified number above what the
    attacks leave).
    Also returned: "flags" (the run-level checks: model sanity, chance at large eps),
    "timings" (seconds per attack, one dict per eps) and "eval_time_s" (wall time of the
    whole evaluation).
    """
    device = torch.device("cpu") if device is None else torch.device(device)
    model = model.to(device).eval()
    x, y = x.to(device), y.to(device)
    kwargs = {"eps_list": list(eps_list), "suite": suite, "seed": seed, "progress": progress,
              "compile": bool(compile), "checks": bool(checks)}
    if batch_size is not None:
        kwargs["batch_size"] = batch_size
    certifiable = is_certifiable(model)
    t0 = time.perf_counter()
    raw = attacks.accuracy_vs_eps(model, x, y, return_points=certifiable, **kwargs)
    elapsed = time.perf_counter() - t0
    results, timings = [], []
    for r in raw["results"]:
        timings.append({str(k): float(v) for k, v in r.get("timings", {}).items()})
        entry = {
            "eps": float(r["eps"]),
            "robust_accuracy": float(r["robust_accuracy"]),
            "per_attack": {str(k): float(v) for k, v in r.get("per_attack", {}).items()},
            "flags": [str(f) for f in r.get("flags", [])],
        }
        if certifiable:
            t1 = time.perf_counter()
            cert = certified_points(model, x, y, float(r["eps"]), batch_size=batch_size or 250).cpu()
            broken = cert & ~r["robust"]
            if bool(broken.any()):
                idx = broken.nonzero().flatten()[:10].tolist()
                raise RuntimeError(f"certificate bug: {int(broken.sum())} point(s) certified at eps {r['eps']:g} were "
                                   f"broken by the {suite} suite (first indices {idx}); please report it")
            entry["certified_accuracy"] = float(cert.float().mean()) if cert.numel() else 0.0
            timings[-1]["certify"] = time.perf_counter() - t1
        results.append(entry)
    return {"clean_accuracy": float(raw["clean_accuracy"]), "results": results,
            "flags": [str(f) for f in raw.get("flags", [])], "timings": timings, "eval_time_s": elapsed}


def certified_points(model, x, y, eps, *, batch_size=250):
    """(N,) bool: `drp_kernels.certify` over `x` in batches, on the model's device."""
    import drp_kernels

    dev = next(iter(model.buffers())).device
    out = [drp_kernels.certify(model, x[i:i + batch_size].to(dev), y[i:i + batch_size].to(dev), eps)
           for i in range(0, x.shape[0], batch_size)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool)


def format_eval_table(result, *, suite=None):
    """A short plain-text table of one `evaluate_model` result (headed by its suite if given)."""
    lines = [] if suite is None else [f"suite {suite}:"]
    cert = any("certified_accuracy" in r for r in result["results"])
    lines += [f"clean accuracy: {100 * result['clean_accuracy']:.2f}%",
              f"{'eps':>8}  {'robust':>8}  " + (f"{'certified':>9}  " if cert else "")
              + "after each attack (cumulative)"]
    for r in result["results"]:
        stages = " -> ".join(f"{k} {100 * v:.1f}%" for k, v in r["per_attack"].items()) or "-"
        c = f"{100 * r['certified_accuracy']:>8.2f}%  " if "certified_accuracy" in r else ""
        lines.append(f"{r['eps']:>8.4g}  {100 * r['robust_accuracy']:>7.2f}%  {c}{stages}")
        for flag in r["flags"]:
            lines.append(f"{'':>8}  flag: {flag}")
    for flag in result.get("flags", []):
        lines.append(f"flag: {flag}")
    return "\n".join(lines)


def _portable_path(path):
    """`path` relative to the working directory, or `<run folder>/<file>` when it lies outside
    it: results never carry an absolute path of the machine that made them."""
    full = os.path.abspath(path)
    rel = os.path.relpath(full, os.getcwd())
    if rel == os.pardir or rel.startswith(os.pardir + os.sep):
        return os.path.join(os.path.basename(os.path.dirname(full)), os.path.basename(full))
    return rel


def _check_suites(suites, model, config):
    suites = list(dict.fromkeys(suites))  # in the given order, each once
    import drp_kernels

    if any(s in PAPER_SUITES for s in suites) and not isinstance(model, drp_kernels.ProtoClassifier):
        raise _cli_error(f"--suite {' '.join(s for s in suites if s in PAPER_SUITES)}: the paper's attack needs a "
                         f"DRP checkpoint (a prototype classifier); this one was trained with method "
                         f"{config.get('method')!r}")
    return suites


def run_eval(args):
    """`drp eval`: returns the exit code (0); misuse raises CLIError."""
    import drp_kernels

    eps_list = check_eps_list(args.eps)
    if args.limit is None or args.limit < 1:
        raise _cli_error(f"--limit: expected a number of test points >= 1, got {args.limit}")
    if args.batch_size is not None and args.batch_size < 1:
        raise _cli_error(f"--batch-size: expected >= 1, got {args.batch_size}")
    if args.seed < 0:
        raise _cli_error(f"--seed: expected an integer >= 0, got {args.seed}")
    if args.json is not None:
        _check_output_path(args.json, "--json")
    if args.plot is not None:
        _check_output_path(args.plot, "--plot", suffixes=PLOT_SUFFIXES)
    device = pick_device(args.device)
    path = resolve_checkpoint(args.checkpoint)
    model, _ckpt, config = _load(path)
    suites = _check_suites(args.suite, model, config)
    is_proto = isinstance(model, drp_kernels.ProtoClassifier)
    decision = getattr(args, "decision", None)
    if decision is not None:
        if not is_proto:
            raise _cli_error(f"--decision: only DRP checkpoints (prototype classifiers) have a decision rule; "
                             f"this one was trained with method {config.get('method')!r}")
        model.decision = decision
    data_dir = args.data_dir if args.data_dir is not None else config.get("data_dir")
    x, y = load_eval_data(config["dataset"], data_dir=data_dir, limit=args.limit)

    t0 = time.perf_counter()
    per_suite = {}
    for suite in suites:
        per_suite[suite] = evaluate_model(model, x, y, eps_list=eps_list, suite=suite, batch_size=args.batch_size,
                                          seed=args.seed, device=device, progress=not args.quiet,
                                          compile=bool(getattr(args, "compile", False)))
    elapsed = time.perf_counter() - t0
    first = per_suite[suites[0]]
    out = {
        "clean_accuracy": first["clean_accuracy"],
        "checkpoint": _portable_path(path),
        "dataset": config["dataset"],
        "method": config.get("method"),
        "metric": config.get("metric"),
        "model": config.get("model"),
        "decision": model.decision if is_proto else None,
        "n": int(y.shape[0]),
        "seed": args.seed,
        "device": str(device),
    }
    if len(suites) == 1:
        out.update({"results": first["results"], "flags": first["flags"], "suite": suites[0],
                    "timings": first["timings"], "eval_time_s": first["eval_time_s"]})
    else:
        out.update({"suite": suites, "suites": per_suite, "eval_time_s": elapsed})
    if args.json is not None:
        write_json_atomic(out, args.json)
    name = config.get("method") or "model"
    if config.get("method") == "drp" and config.get("metric"):
        name = f"drp-{config['metric']}"
    if is_proto and model.decision != "nearest":
        name += f", {model.decision} decision"
    if args.plot is not None:
        from .plots import plot_accuracy_vs_eps

        curves = {(name if len(suites) == 1 else f"{name} ({s})"): r for s, r in per_suite.items()}
        plot_accuracy_vs_eps(curves, args.plot, n=out["n"],
                             title=f"{config['dataset']}: accuracy against eps ({' vs '.join(suites)} suite"
                                   f"{'s' if len(suites) > 1 else ''}, n={out['n']})")
    print(f"{out['checkpoint']}: {name}, {config['dataset']}, {out['n']} test points, "
          f"{', '.join(suites)} suite{'s' if len(suites) > 1 else ''}, {elapsed:.1f} s")
    for i, (suite, result) in enumerate(per_suite.items()):
        if i:
            print()
        print(format_eval_table(result, suite=suite if len(suites) > 1 else None))
    written = [f for f in (args.json, args.plot) if f is not None]
    if written:
        print("wrote " + " and ".join(written))
    return 0


# ----------------------------------------------------------------------------- drp plot
def add_plot_arguments(parser):
    """Add the `drp plot` options to an argparse (sub)parser."""
    parser.add_argument("reports", nargs="+", metavar="EVAL_JSON[=LABEL]",
                        help="JSON reports written by `drp eval --json`, each optionally labelled, e.g. "
                             "results/fashion-mnist/pgd-at/eval.json=PGD-AT")
    parser.add_argument("--out", required=True, metavar="FILE", help="the plot to write (.png, .jpg, .pdf, .svg)")
    parser.add_argument("--suite", default=None,
                        help="the suite to plot: picks it from reports holding several, and single-suite reports "
                             "must be of it (default: standard from multi-suite reports, single-suite reports "
                             "as they are)")
    parser.add_argument("--title", default=None, help="plot title")
    return parser


def _read_report(spec, suite):
    import json

    path, _, label = spec.partition("=")
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as exc:
        raise _cli_error(f"{path}: cannot read the report: {_one_line(exc)}") from None
    except ValueError as exc:
        raise _cli_error(f"{path}: not a JSON report: {_one_line(exc)}") from None
    if not isinstance(data, dict):
        raise _cli_error(f"{path}: not a `drp eval` report")
    if "suites" in data:
        suite = suite or "standard"
        if suite not in data["suites"]:
            raise _cli_error(f"{path}: no suite {suite!r} in the report (it holds {', '.join(data['suites'])}); "
                             "pick one with --suite")
        curve = dict(data["suites"][suite])
        curve["suite"] = suite
    elif "results" in data:
        if suite is not None and data.get("suite") not in (None, suite):
            raise _cli_error(f"{path}: the report is of suite {data.get('suite')!r}, not {suite!r}; "
                             f"pass --suite {data.get('suite')}")
        curve = {"clean_accuracy": data.get("clean_accuracy"), "results": data["results"],
                 "suite": data.get("suite") or "standard"}
    else:
        raise _cli_error(f"{path}: not a `drp eval` report (no results)")
    curve["n"] = data.get("n")
    if not label:
        method = data.get("method") or os.path.basename(os.path.dirname(os.path.abspath(path)))
        label = f"drp-{data['metric']}" if method == "drp" and data.get("metric") else method
    return label, curve


def run_plot(args):
    """`drp plot`: several eval reports in one accuracy-vs-eps plot (certified accuracy dashed)."""
    from .plots import plot_accuracy_vs_eps

    _check_output_path(args.out, "--out", suffixes=PLOT_SUFFIXES)
    curves = {}
    for spec in args.reports:
        label, curve = _read_report(spec, args.suite)
        if label in curves:
            raise _cli_error(f"two reports are labelled {label!r}: label them, e.g. FILE.json=NAME")
        curves[label] = curve
    ns = {c["n"] for c in curves.values() if c.get("n")}
    suites = sorted({c["suite"] for c in curves.values()})
    title = args.title or f"accuracy against L-inf eps ({' / '.join(suites)} suite" + (
        f", n={ns.pop()})" if len(ns) == 1 else ")")
    plot_accuracy_vs_eps(curves, args.out, title=title)
    print(f"wrote {args.out}")
    return 0
