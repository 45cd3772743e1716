"""`drp eval`: robust accuracy of a trained checkpoint against a list of L-inf eps.

The classifier comes from `drp_train.checkpoint.load_classifier`, the test points
from the dataset named in the checkpoint's config, and the numbers from
`drp_kernels.attacks.accuracy_vs_eps` (the quick or the standard suite).
"""
import json
import math
import os
import tempfile
import time

import torch

from drp_kernels import attacks

from .errors import CLIError

__all__ = [
    "add_eval_arguments",
    "run_eval",
    "evaluate_model",
    "resolve_checkpoint",
    "load_eval_data",
    "format_eval_table",
    "write_json_atomic",
    "pick_device",
    "SUITES",
]

SUITES = ("quick", "standard")

def _cli_error(message):
    return CLIError(message)


def add_eval_arguments(parser):
    """Add the `drp eval` options to an argparse (sub)parser."""
    parser.add_argument("--checkpoint", required=True, metavar="DIR_OR_FILE",
                        help="a checkpoint written by `drp train`, or its --out folder")
    parser.add_argument("--eps", type=float, nargs="+", required=True, metavar="E",
                        help="L-inf radii to evaluate, e.g. --eps 0.05 0.1 0.2")
    parser.add_argument("--suite", choices=SUITES, default="standard",
                        help="attack suite (default: standard)")
    parser.add_argument("--limit", type=int, default=1000, metavar="N",
                        help="evaluate the first N test points (default: 1000)")
    parser.add_argument("--json", required=True, metavar="FILE", help="write the results to this JSON file")
    parser.add_argument("--plot", default=None, metavar="FILE", help="also write an accuracy-vs-eps PNG")
    parser.add_argument("--batch-size", type=int, default=None, metavar="B",
                        help="attack batch size (default: the attack engine's)")
    parser.add_argument("--data-dir", default=None, metavar="DIR",
                        help="dataset folder (default: the checkpoint's, then the standard location)")
    parser.add_argument("--seed", type=int, default=0, help="attack seed (default: 0)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def pick_device(name):
    """`name` as a torch.device, or cuda when available and cpu otherwise."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise _cli_error(f"--device: expected a torch device such as cpu or cuda, got {name!r} ({exc})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise _cli_error(f"--device: {name!r} was asked for but CUDA is not available on this machine")
    return dev


def write_json_atomic(obj, path):
    """Write `obj` as indented JSON to `path` through a temporary file and a rename."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _check_output_path(path, option):
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise _cli_error(f"{option}: {path!r} is a folder; expected a file name")
    if not os.path.isdir(folder):
        raise _cli_error(f"{option}: folder {folder!r} does not exist")
    if not os.access(folder, os.W_OK):
        raise _cli_error(f"{option}: folder {folder!r} is not writable")


def check_eps_list(eps, option="--eps"):
    """Validate a list of L-inf radii for [0, 1] inputs; returns them as floats."""
    if not eps:
        raise _cli_error(f"{option}: expected at least one eps")
    out = []
    for e in eps:
        e = float(e)
        if not math.isfinite(e) or e < 0 or e > 1:
            raise _cli_error(f"{option}: expected eps in [0, 1] (inputs live in [0, 1]), got {e:g}")
        out.append(e)
    return out


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


def _one_line(exc):
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())


def load_eval_data(dataset, *, data_dir=None, limit=None):
    """The first `limit` test points of `dataset` as float [0, 1] inputs and int64 labels."""
    from .data import DatasetError, load_dataset

    try:
        x, y = load_dataset(dataset, split="test", data_dir=data_dir, limit=limit)
    except DatasetError as exc:
        raise _cli_error(_one_line(exc)) from None
    return x.float().div_(255.0), y.long()


def evaluate_model(model, x, y, *, eps_list, suite="standard", batch_size=None, seed=0, device=None,
                   progress=True):
    """Run `attacks.accuracy_vs_eps` and return its result in the `drp eval` JSON schema.

    Each entry of "results" holds exactly eps, robust_accuracy, per_attack and flags.
    Also returned: "flags" (the curve-level checks: model sanity, chance at large eps,
    accuracy rising with eps), "timings" (seconds per attack, one dict per eps) and
    "eval_time_s" (wall time of the whole evaluation).
    """
    device = torch.device("cpu") if device is None else torch.device(device)
    model = model.to(device).eval()
    x, y = x.to(device), y.to(device)
    kwargs = {"eps_list": list(eps_list), "suite": suite, "seed": seed, "progress": progress}
    if batch_size is not None:
        kwargs["batch_size"] = batch_size
    t0 = time.perf_counter()
    raw = attacks.accuracy_vs_eps(model, x, y, **kwargs)
    elapsed = time.perf_counter() - t0
    results, timings = [], []
    for r in raw["results"]:
        timings.append({str(k): float(v) for k, v in r.get("timings", {}).items()})
        results.append({
            "eps": float(r["eps"]),
            "robust_accuracy": float(r["robust_accuracy"]),
            "per_attack": {str(k): float(v) for k, v in r.get("per_attack", {}).items()},
            "flags": [str(f) for f in r.get("flags", [])],
        })
    return {"clean_accuracy": float(raw["clean_accuracy"]), "results": results,
            "flags": [str(f) for f in raw.get("flags", [])], "timings": timings, "eval_time_s": elapsed}


def format_eval_table(result):
    """A short plain-text table of one `evaluate_model` result."""
    lines = [f"clean accuracy: {100 * result['clean_accuracy']:.2f}%",
             f"{'eps':>8}  {'robust':>8}  after each attack (cumulative)"]
    for r in result["results"]:
        stages = " -> ".join(f"{k} {100 * v:.1f}%" for k, v in r["per_attack"].items()) or "-"
        lines.append(f"{r['eps']:>8.4g}  {100 * r['robust_accuracy']:>7.2f}%  {stages}")
        for flag in r["flags"]:
            lines.append(f"{'':>8}  flag: {flag}")
    for flag in result.get("flags", []):
        lines.append(f"flag: {flag}")
    return "\n".join(lines)


def run_eval(args):
    """`drp eval`: returns the exit code (0); misuse raises CLIError."""
    eps_list = check_eps_list(args.eps)
    if args.limit is None or args.limit < 1:
        raise _cli_error(f"--limit: expected a number of test points >= 1, got {args.limit}")
    if args.batch_size is not None and args.batch_size < 1:
        raise _cli_error(f"--batch-size: expected >= 1, got {args.batch_size}")
    if args.seed < 0:
        raise _cli_error(f"--seed: expected an integer >= 0, got {args.seed}")
    _check_output_path(args.json, "--json")
    if args.plot is not None:
        _check_output_path(args.plot, "--plot")
    device = pick_device(args.device)
    path = resolve_checkpoint(args.checkpoint)
    model, _ckpt, config = _load(path)
    data_dir = args.data_dir if args.data_dir is not None else config.get("data_dir")
    x, y = load_eval_data(config["dataset"], data_dir=data_dir, limit=args.limit)

    result = evaluate_model(model, x, y, eps_list=eps_list, suite=args.suite, batch_size=args.batch_size,
                            seed=args.seed, device=device, progress=not args.quiet)
    out = {
        "clean_accuracy": result["clean_accuracy"],
        "results": result["results"],
        "flags": result["flags"],
        "checkpoint": os.path.abspath(path),
        "dataset": config["dataset"],
        "method": config.get("method"),
        "metric": config.get("metric"),
        "model": config.get("model"),
        "suite": args.suite,
        "n": int(y.shape[0]),
        "seed": args.seed,
        "device": str(device),
        "timings": result["timings"],
        "eval_time_s": result["eval_time_s"],
    }
    write_json_atomic(out, args.json)
    if args.plot is not None:
        from .plots import plot_accuracy_vs_eps

        name = config.get("method") or "model"
        if config.get("method") == "drp" and config.get("metric"):
            name = f"drp-{config['metric']}"
        plot_accuracy_vs_eps({name: result}, args.plot,
                             title=f"{config['dataset']}: accuracy against eps ({args.suite} suite, n={out['n']})")
    print(f"{os.path.abspath(path)}: {config['dataset']}, {out['n']} test points, {args.suite} suite, "
          f"{result['eval_time_s']:.1f} s")
    print(format_eval_table(result))
    print(f"wrote {args.json}" + (f" and {args.plot}" if args.plot else ""))
    return 0
