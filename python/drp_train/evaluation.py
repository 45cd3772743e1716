"""`drp eval`: robust accuracy of a trained checkpoint against a list of eps, L-inf or L2.

The classifier comes from `drp_train.checkpoint.load_classifier`, the test points
from the dataset named in the checkpoint's config, and the numbers from
`drp_kernels.attacks.sweep` / `sweep_report` (what `accuracy_vs_eps` runs): the quick or the
standard suite, and for a DRP checkpoint also the paper's own protocol ("paper",
"paper-100"), side by side when several suites are given. For a certifiable checkpoint
(`drp_kernels.certify`) the certified accuracy comes beside the robust one.

At scale:
* every point's result is a function of the model, the point, eps, suite, norm and seed
  alone (the attacks' random draws are keyed by the point's index in the test set), so
  the numbers do not depend on --batch-size, on the order of the points or on sharding;
* started by `torchrun --nproc-per-node N -m drp_train eval ...`, the ranks split the
  points (rank r takes points r, r + N, ...), gather the per-point results on rank 0, which
  runs the sanity checks and writes the one JSON and plot, identical to a single process's
  (but for timings and `world_size`); the certificate is sharded the same way;
* with --json, each rank writes its per-point results atomically to a partial file beside
  the JSON after every batch of every stage; `--resume` continues from the partial files
  (whatever world size wrote them) and never attacks a finished point again; Ctrl-C (or
  SIGTERM) writes the partial file and exits 130 with the command that continues.
"""
import glob
import hashlib
import json
import math
import os
import shlex
import signal
import sys
import threading
import time

import torch

from drp_kernels import attacks
from drp_kernels.certified import is_certifiable
from drp_kernels.io import atomic_write

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
from .errors import DrpTrainError

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
    "partial_paths",
    "EvalInterrupted",
    "SUITES",
    "PAPER_SUITES",
    "DECISIONS",
    "NORMS",
    "NORM_NAMES",
    "CERTIFICATE_NOTES",
]

SUITES = ("quick", "standard")  # the suites for any classifier
PAPER_SUITES = ("paper", "paper-100")  # the DRP paper's attack: ProtoClassifier checkpoints only
DECISIONS = ("nearest", "paper")
NORMS = ("linf", "l2")
NORM_NAMES = {"linf": "L-inf", "l2": "L2"}
#: What "certified_accuracy" means under each norm (the JSON's "certificate").
CERTIFICATE_NOTES = {
    "linf": "L-inf certificate of the model (drp_kernels.certify)",
    "l2": "implied by the L-inf certificate (drp_kernels.certify): the L2 ball of radius eps lies inside the "
          "L-inf ball of radius eps",
}
PARTIAL_FORMAT = "drp-eval-partial/1"
_CERT_BATCH = 250


class EvalInterrupted(DrpTrainError, KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) stopped `drp eval` after its partial results were saved; the message
    names the command that continues."""

    exit_code = 130


def add_eval_arguments(parser):
    """Add the `drp eval` options to an argparse (sub)parser."""
    parser.add_argument("--checkpoint", required=True, metavar="DIR_OR_FILE",
                        help="a checkpoint written by `drp train`, or its --out folder")
    parser.add_argument("--eps", type=parse_eps, nargs="+", required=True, metavar="E",
                        help="radii to evaluate, numbers or fractions, e.g. --eps 0.05 0.1 8/255 (L-inf: in "
                             "[0, 1]; L2: from 0 to sqrt(input size))")
    parser.add_argument("--norm", choices=NORMS, default="linf",
                        help="the threat model: linf (default) or l2 (APGD-CE, APGD-T and Square-L2; no paper "
                             "suite)")
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
                        help="attack the first N test points; 0: all of them (default: 1000)")
    parser.add_argument("--all", action="store_true",
                        help="every test point, for the attacks and the certificate (the same as --limit 0)")
    parser.add_argument("--certify-limit", type=int, default=None, metavar="M",
                        help="certifiable checkpoints: certify the first M test points; 0: all of them (default: "
                             "the points the attacks use). E.g. --limit 1000 --certify-limit 0")
    parser.add_argument("--json", default=None, metavar="FILE",
                        help="also write the results to this JSON file (the table always goes to stdout); the "
                             "partial results of a running evaluation go beside it (FILE.partial)")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted evaluation from the partial file(s) beside --json")
    parser.add_argument("--plot", default=None, metavar="FILE", help="also write an accuracy-vs-eps PNG")
    parser.add_argument("--batch-size", type=int, default=None, metavar="B",
                        help="attack batch size (default: the attack engine's); the results do not depend on it")
    parser.add_argument("--data-dir", default=None, metavar="DIR",
                        help="dataset folder (default: the checkpoint's, then the standard location)")
    parser.add_argument("--seed", type=int, default=0, help="attack seed (default: 0)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--compile", action="store_true",
                        help="run the attacks on torch.compile(model) (opt-in: on a CPU the compile time "
                             "did not pay for the small CNN)")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.set_defaults(_argv=None)
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
    """The first `limit` test points of `dataset` (all of them for None) as float [0, 1] inputs and
    int64 labels."""
    from .data import DatasetError, load_dataset

    try:
        x, y = load_dataset(dataset, split="test", data_dir=data_dir, limit=limit)
    except DatasetError as exc:
        raise _cli_error(_one_line(exc)) from None
    return x.float().div_(255.0), y.long()


# ------------------------------------------------------------------------ results
def _frac(count, n):
    return count / n if n else 0.0


def _suite_result(report, *, elapsed):
    """An `attacks.sweep_report` result in the `drp eval` JSON schema."""
    results, timings = [], []
    for r in report["results"]:
        timings.append({str(k): float(v) for k, v in r.get("timings", {}).items()})
        results.append({
            "eps": float(r["eps"]),
            "robust_accuracy": float(r["robust_accuracy"]),
            "robust": int(r["robust_count"]),
            "n": int(r["n"]),
            "per_attack": {str(k): float(v) for k, v in r["per_attack"].items()},
            "per_attack_counts": {str(k): int(v) for k, v in r["per_attack_counts"].items()},
            "flags": [str(f) for f in r.get("flags", [])],
        })
    return {"clean_accuracy": float(report["clean_accuracy"]), "clean": int(report["clean_count"]),
            "n": int(report["n"]), "results": results, "flags": [str(f) for f in report.get("flags", [])],
            "timings": timings, "eval_time_s": float(elapsed)}


def _add_certified(result, report, cert, *, suite, cert_time):
    """Put the certified counts (cert: (K, M) bool, the first M test points, eps_list's order) into a
    `_suite_result`. A certified point that the suite broke would be a bug of the certificate:
    RuntimeError (never a certified number above what the attacks leave)."""
    m = int(cert.shape[1])
    n = result["n"]
    both = min(m, n)
    for k, (entry, raw) in enumerate(zip(result["results"], report["results"])):
        c = cert[k]
        broken = c[:both] & ~raw["robust"][:both]
        if bool(broken.any()):
            idx = broken.nonzero().flatten()[:10].tolist()
            raise RuntimeError(f"certificate bug: {int(broken.sum())} point(s) certified at eps {entry['eps']:g} were "
                               f"broken by the {suite} suite (first indices {idx}); please report it")
        count = int(c.sum())
        entry["certified_accuracy"] = _frac(count, m)
        entry["certified"] = count
        entry["certified_n"] = m
        if m > n:  # on the attacked points too, to read beside the robust count
            entry["certified_on_suite_points"] = int(c[:n].sum())
        result["timings"][k]["certify"] = float(cert_time[k])


def certified_points(model, x, y, eps, *, batch_size=_CERT_BATCH):
    """(N,) bool: `drp_kernels.certify` over `x` in batches, on the model's device."""
    import drp_kernels

    dev = next(iter(model.buffers())).device
    out = [drp_kernels.certify(model, x[i:i + batch_size].to(dev), y[i:i + batch_size].to(dev), eps).cpu()
           for i in range(0, x.shape[0], batch_size)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool)


def _certify_eps(model, x, y, eps_list, *, batch_size):
    """((K, len(x)) bool certified per eps, [seconds per eps])."""
    rows, secs = [], []
    for e in eps_list:
        t0 = time.perf_counter()
        rows.append(certified_points(model, x, y, float(e), batch_size=batch_size))
        secs.append(time.perf_counter() - t0)
    if not rows:
        return torch.zeros((0, x.shape[0]), dtype=torch.bool), secs
    return torch.stack(rows), secs


def evaluate_model(model, x, y, *, eps_list, suite="standard", batch_size=None, seed=0, device=None,
                   progress=True, compile=False, checks=True, norm="linf", index=None):
    """Run the attack suite over `eps_list` (monotone in eps; `attacks.sweep` then `sweep_report`) in
    this process and return its result in the `drp eval` JSON schema.

    Each entry of "results" holds eps, robust_accuracy with its count ("robust") and "n",
    per_attack (cumulative robust accuracy after each stage) with per_attack_counts, and flags;
    for a certifiable model (`is_certifiable`) also certified_accuracy, "certified" and
    "certified_n": the points that `drp_kernels.certify` proves at that eps (under norm "l2" the
    L-inf certificate, whose ball holds the L2 ball). A certified point that the suite broke
    would be a bug of the certificate: it raises RuntimeError.
    Also returned: "clean_accuracy" and "clean", "n", "flags" (the run-level checks), "timings"
    (seconds per attack, one dict per eps) and "eval_time_s" (wall time of the whole evaluation).
    """
    device = torch.device("cpu") if device is None else torch.device(device)
    model = model.to(device).eval()
    certifiable = is_certifiable(model)
    kwargs = {"eps_list": list(eps_list), "suite": suite, "seed": seed, "norm": norm}
    if batch_size is not None:
        kwargs["batch_size"] = batch_size
    t0 = time.perf_counter()
    state = attacks.sweep(model, x, y, index=index, progress=progress, compile=bool(compile), **kwargs)
    report = attacks.sweep_report(model, x, y, state, checks=bool(checks), return_points=certifiable,
                                  compile=bool(compile))
    result = _suite_result(report, elapsed=time.perf_counter() - t0)
    if certifiable:
        cert, secs = _certify_eps(model, x, y, eps_list, batch_size=batch_size or _CERT_BATCH)
        _add_certified(result, report, cert, suite=suite, cert_time=secs)
    result["eval_time_s"] = time.perf_counter() - t0
    return result


def format_eval_table(result, *, suite=None, norm="linf"):
    """A short plain-text table of one `evaluate_model` result (headed by its suite if given)."""
    lines = [] if suite is None else [f"suite {suite}:"]
    cert = any("certified_accuracy" in r for r in result["results"])
    clean = f"clean accuracy: {100 * result['clean_accuracy']:.2f}%"
    if "clean" in result and "n" in result:
        clean += f" ({result['clean']}/{result['n']})"
    lines.append(clean)
    if cert:
        m = next(r["certified_n"] for r in result["results"] if "certified_n" in r)
        if m != result.get("n"):
            lines.append(f"certified on the first {m} test points, attacked on the first {result.get('n')}")
    head = f"eps ({NORM_NAMES.get(norm, norm)})"
    lines.append(f"{head:>10}  {'robust':>8}  " + (f"{'certified':>9}  " if cert else "")
                 + "after each attack (cumulative)")
    for r in result["results"]:
        stages = " -> ".join(f"{k} {100 * v:.1f}%" for k, v in r["per_attack"].items()) or "-"
        c = f"{100 * r['certified_accuracy']:>8.2f}%  " if "certified_accuracy" in r else ""
        lines.append(f"{r['eps']:>10.4g}  {100 * r['robust_accuracy']:>7.2f}%  {c}{stages}")
        for flag in r["flags"]:
            lines.append(f"{'':>10}  flag: {flag}")
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


def _check_suites(suites, model, config, norm):
    suites = list(dict.fromkeys(suites))  # in the given order, each once
    import drp_kernels

    paper = [s for s in suites if s in PAPER_SUITES]
    if paper and norm != "linf":
        raise _cli_error(f"--suite {' '.join(paper)}: the paper's attack is L-inf only; with --norm {norm} use "
                         f"--suite standard or quick")
    if paper and not isinstance(model, drp_kernels.ProtoClassifier):
        raise _cli_error(f"--suite {' '.join(paper)}: the paper's attack needs a "
                         f"DRP checkpoint (a prototype classifier); this one was trained with method "
                         f"{config.get('method')!r}")
    return suites


# ------------------------------------------------------------------ partial files
def partial_paths(json_path):
    """The partial files of an evaluation writing `json_path`: FILE.partial (one process) and
    FILE.partial.rankR-of-W (rank R of a W-process run), those that exist."""
    base = os.fspath(json_path) + ".partial"
    found = ([base] if os.path.isfile(base) else []) + sorted(glob.glob(glob.escape(base) + ".rank*-of-*"))
    return [p for p in found if os.path.isfile(p)]


def _partial_path(json_path, info):
    base = os.fspath(json_path) + ".partial"
    return base if not info.enabled else f"{base}.rank{info.rank}-of-{info.world_size}"


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


_META_CHECKS = (("checkpoint_sha256", "model", "evaluate the checkpoint it was made with"),
                ("dataset", "dataset", "evaluate the same dataset"),
                ("eps", "eps list", "give the same --eps"),
                ("suites", "suite", "give the same --suite"),
                ("seed", "seed", "give the same --seed"),
                ("norm", "norm", "give the same --norm"),
                ("decision", "decision rule", "give the same --decision"),
                ("n", "number of points", "give the same --limit"))


def _short(v):
    if isinstance(v, str) and len(v) == 64:
        return v[:12] + "..."
    return repr(v)


def _read_partials(paths, meta):
    """{suite: merged SweepState} from the partial files at `paths`; a file that cannot be read or
    comes from another evaluation is refused (CLIError naming it and what differs)."""
    states = {}
    for path in paths:
        name = os.path.basename(path)
        try:
            doc = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file: one line, exit 2
            raise _cli_error(f"--resume: cannot read the partial file {name}: {_one_line(exc)}; delete it to "
                             "start over") from None
        if not isinstance(doc, dict) or doc.get("format") != PARTIAL_FORMAT or not isinstance(doc.get("meta"), dict):
            raise _cli_error(f"--resume: {name} is not a `drp eval` partial file; delete it to start over")
        for key, what, fix in _META_CHECKS:
            theirs, ours = doc["meta"].get(key), meta[key]
            if theirs != ours:
                raise _cli_error(f"--resume: {name} is from another {what} ({_short(theirs)} there, {_short(ours)} "
                                 f"here); {fix}, or delete it to start over")
        for suite, d in (doc.get("suites") or {}).items():
            try:
                states.setdefault(suite, []).append(attacks.SweepState.from_dict(d))
            except (ValueError, KeyError, TypeError) as exc:
                raise _cli_error(f"--resume: {name} holds a broken state of suite {suite}: {_one_line(exc)}; "
                                 "delete it to start over") from None
    out = {}
    for suite, sts in states.items():
        try:
            out[suite] = attacks.SweepState.merge(sts)
        except ValueError as exc:
            raise _cli_error(f"--resume: the partial files disagree: {_one_line(exc)}; delete them to start "
                             "over") from None
    return out


def _write_partial(path, meta, states, info):
    doc = {"format": PARTIAL_FORMAT, "meta": meta, "rank": info.rank, "world_size": info.world_size,
           "suites": {suite: st.to_dict() for suite, st in states.items()}}
    atomic_write(path, lambda f: torch.save(doc, f))


# ------------------------------------------------------------------- the command
def _env_rank():
    try:
        return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0
    except ValueError:
        return 0


def run_eval(args):
    """`drp eval`: returns the exit code (0); misuse raises CLIError (one line, exit 2). Under
    torchrun only rank 0 reports an error; the other ranks exit with the same code silently."""
    try:
        return _run_eval(args)
    except DrpTrainError as exc:
        if _env_rank() != 0:
            exc.silent = True
        raise


def _args_digest(args):
    items = {k: v for k, v in sorted(vars(args).items()) if k not in ("run", "_argv")}
    return hashlib.sha256(json.dumps(items, sort_keys=True, default=str).encode()).hexdigest()


def _continue_command(args, info):
    argv = list(args._argv) if getattr(args, "_argv", None) is not None else ["eval"] + _rebuild_argv(args)
    if "--resume" not in argv:
        argv.append("--resume")
    if info.enabled:
        return f"torchrun --nproc-per-node {info.world_size} -m drp_train {shlex.join(argv)}"
    return f"drp {shlex.join(argv)}"


def _rebuild_argv(args):
    """The options of `args` as command-line flags (when the original argv is not known)."""
    out = []
    for key, value in vars(args).items():
        if key in ("run", "_argv", "command") or value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            out.append(flag)
        elif isinstance(value, (list, tuple)):
            out += [flag] + [str(v) for v in value]
        else:
            out += [flag, str(value)]
    return out


def _run_eval(args):
    from . import ddp

    device = pick_device(args.device)
    info = ddp.setup(device.type, timeout=ddp.EVAL_TIMEOUT) if ddp.launched_world_size() > 1 else ddp.DistInfo()
    try:
        if info.enabled and device.type == "cuda":
            device = torch.device("cuda", info.local_rank)
        digests = ddp.gather_objects(_args_digest(args), info)
        if len(set(digests)) > 1:
            bad = next(r for r, d in enumerate(digests) if d != digests[0])
            raise _cli_error(f"torchrun ranks disagree on the arguments (rank {bad} differs from rank 0); start "
                             "every rank with the same `drp eval` command")
        plan, message = None, None
        try:
            plan = _prepare(args, device)
        except DrpTrainError as exc:
            message = " ".join(str(exc).split())
        message = ddp.first_message(message, info)  # every rank stops if any rank found a problem
        if message is not None:
            raise _cli_error(message)
        return _execute(plan, args, info)
    finally:
        ddp.cleanup(info)


def _prepare(args, device):
    """Everything checked and loaded before any work or any file: returns the plan (a dict)."""
    import drp_kernels

    norm = getattr(args, "norm", "linf")
    if norm not in NORMS:
        raise _cli_error(f"--norm: expected linf or l2, got {norm!r}")
    if norm == "linf":
        eps_list = check_eps_list(args.eps)
    else:
        eps_list = [float(e) for e in args.eps]
        if not eps_list or any(not math.isfinite(e) or e < 0 for e in eps_list):
            raise _cli_error(f"--eps: expected L2 radii >= 0 (numbers or fractions), got "
                             f"{' '.join(f'{e:g}' for e in eps_list)}")
    limit = 0 if getattr(args, "all", False) else args.limit
    if limit is None or limit < 0:
        raise _cli_error(f"--limit: expected a number of test points >= 1, or 0 for all of them, got {limit}")
    cert_limit = getattr(args, "certify_limit", None)
    if getattr(args, "all", False) and cert_limit not in (None, 0):
        raise _cli_error(f"--certify-limit {cert_limit} with --all: --all certifies every test point")
    if cert_limit is not None and cert_limit < 0:
        raise _cli_error(f"--certify-limit: expected a number of test points >= 1, or 0 for all of them, got "
                         f"{cert_limit}")
    if args.batch_size is not None and args.batch_size < 1:
        raise _cli_error(f"--batch-size: expected >= 1, got {args.batch_size}")
    if args.seed < 0:
        raise _cli_error(f"--seed: expected an integer >= 0, got {args.seed}")
    resume = bool(getattr(args, "resume", False))
    if resume and args.json is None:
        raise _cli_error("--resume: needs --json (the partial results are written beside the JSON file)")
    if args.json is not None:
        _check_output_path(args.json, "--json")
    if args.plot is not None:
        _check_output_path(args.plot, "--plot", suffixes=PLOT_SUFFIXES)
    path = resolve_checkpoint(args.checkpoint)
    model, _ckpt, config = _load(path)
    suites = _check_suites(args.suite, model, config, norm)
    is_proto = isinstance(model, drp_kernels.ProtoClassifier)
    decision = getattr(args, "decision", None)
    if decision is not None:
        if not is_proto:
            raise _cli_error(f"--decision: only DRP checkpoints (prototype classifiers) have a decision rule; "
                             f"this one was trained with method {config.get('method')!r}")
        model.decision = decision
    certifiable = is_certifiable(model)
    if cert_limit is not None and not certifiable:
        raise _cli_error(f"--certify-limit: only certifiable checkpoints (method certified, model linf-dist) have a "
                         f"certificate; this one was trained with method {config.get('method')!r}")
    if cert_limit is None:
        cert_limit = limit
    data_dir = args.data_dir if args.data_dir is not None else config.get("data_dir")
    need = None if (limit == 0 or (certifiable and cert_limit == 0)) else max(limit, cert_limit if certifiable
                                                                              else 0)
    x, y = load_eval_data(config["dataset"], data_dir=data_dir, limit=need)
    n = x.shape[0] if limit == 0 else min(limit, x.shape[0])
    m = (x.shape[0] if cert_limit == 0 else min(cert_limit, x.shape[0])) if certifiable else 0
    if norm == "l2":
        top = math.sqrt(x[0].numel())
        if any(e > top for e in eps_list):
            raise _cli_error(f"--eps: expected L2 radii in [0, {top:g}] (sqrt of the {x[0].numel()} input values: "
                             f"the largest distance inside [0, 1]), got {max(eps_list):g}")
    meta = {"checkpoint_sha256": _sha256(path), "dataset": config["dataset"], "eps": list(eps_list),
            "suites": list(suites), "seed": int(args.seed), "norm": norm,
            "decision": model.decision if is_proto else None, "n": int(n)}
    resumed = {}
    if resume:
        found = partial_paths(args.json)
        if not found:
            raise _cli_error(f"--resume: no partial file beside {args.json} (expected {args.json}.partial); run "
                             "without --resume to start the evaluation")
        resumed = _read_partials(found, meta)
    return {"path": path, "model": model, "config": config, "suites": suites, "is_proto": is_proto,
            "certifiable": certifiable, "x": x, "y": y, "n": n, "m": m, "eps": eps_list, "norm": norm,
            "meta": meta, "resumed": resumed, "device": device}


class _TermAsInterrupt:
    """SIGTERM raises KeyboardInterrupt in the main thread while active (torchrun stops its workers
    with SIGTERM), so it too saves the partial results."""

    def __enter__(self):
        self.old = None
        if threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGTERM"):
            self.old = signal.signal(signal.SIGTERM, self._raise)
        return self

    @staticmethod
    def _raise(signum, frame):
        raise KeyboardInterrupt

    def __exit__(self, *exc):
        if self.old is not None:
            signal.signal(signal.SIGTERM, self.old)
        return False


def _execute(plan, args, info):
    from . import ddp

    model, x, y, n, m = plan["model"], plan["x"], plan["y"], plan["n"], plan["m"]
    device, norm, eps_list, suites = plan["device"], plan["norm"], plan["eps"], plan["suites"]
    model = model.to(device).eval()
    my_partial = _partial_path(args.json, info) if args.json is not None else None
    if args.json is not None and not args.resume and info.is_main:
        for stale in partial_paths(args.json):  # a fresh evaluation: old partial results would mislead a --resume
            os.unlink(stale)
    ddp.barrier(info)
    progress = not args.quiet and info.is_main
    shard = torch.arange(n)[info.rank::info.world_size]
    if progress and info.enabled:
        import logging

        logging.getLogger("drp_train").info("%d points over %d processes; the progress is rank 0's %d points",
                                            n, info.world_size, shard.numel())
    kwargs = {"eps_list": eps_list, "norm": norm, "seed": int(args.seed), "compile": bool(args.compile)}
    if args.batch_size is not None:
        kwargs["batch_size"] = args.batch_size
    states = {}
    t0 = time.perf_counter()

    def save(_state=None):
        if my_partial is not None:
            _write_partial(my_partial, plan["meta"], states, info)

    try:
        with _TermAsInterrupt():
            for suite in suites:
                prev = plan["resumed"].get(suite)
                st = prev.select(shard) if prev is not None else attacks.SweepState(
                    index=shard, eps_list=eps_list, suite=suite, norm=norm, seed=int(args.seed))
                states[suite] = st
                if shard.numel():
                    attacks.sweep(model, x[shard], y[shard], suite=suite, index=shard, state=st, progress=progress,
                                  on_batch=save, **kwargs)
            cert, cert_secs = None, [0.0] * len(eps_list)
            if plan["certifiable"]:
                cshard = torch.arange(m)[info.rank::info.world_size]
                cert, cert_secs = _certify_eps(model, x[cshard], y[cshard], eps_list,
                                               batch_size=args.batch_size or _CERT_BATCH)
    except KeyboardInterrupt:
        if my_partial is None:
            raise EvalInterrupted("interrupted; nothing saved (without --json there is no partial file to resume "
                                  "from)") from None
        save()
        raise EvalInterrupted(f"interrupted; the partial results are in {my_partial}: continue with "
                              f"`{_continue_command(args, info)}`") from None
    payload = {"states": {s: st.to_dict(starts=False) for s, st in states.items()},
               "timings": {s: st.timings for s, st in states.items()},
               "cert": cert, "cert_secs": cert_secs, "elapsed": time.perf_counter() - t0}
    everything = ddp.gather_objects(payload, info)
    if not info.is_main:
        ddp.barrier(info)  # rank 0 reports; the others are done
        return 0
    try:
        return _report(plan, args, info, everything, t0)
    finally:
        ddp.barrier(info)


def _report(plan, args, info, everything, t0):
    """Rank 0: the merged per-point results -> checks, JSON, plot, table; the partial files go."""
    model, x, y, n, m = plan["model"], plan["x"], plan["y"], plan["n"], plan["m"]
    config, suites, norm, eps_list = plan["config"], plan["suites"], plan["norm"], plan["eps"]
    world = info.world_size
    per_suite = {}
    cert = None
    if plan["certifiable"]:
        cert = torch.zeros((len(eps_list), m), dtype=torch.bool)
        for r, p in enumerate(everything):
            cert[:, r::world] = p["cert"]
    for suite in suites:
        ts = time.perf_counter()
        merged = attacks.SweepState.merge([attacks.SweepState.from_dict(p["states"][suite]) for p in everything])
        for p in everything:
            for k, tk in enumerate(p["timings"][suite]):
                for name, sec in tk.items():
                    merged.timings[k][name] = merged.timings[k].get(name, 0.0) + sec
        report = attacks.sweep_report(model, x[:n], y[:n], merged, checks=True,
                                      return_points=plan["certifiable"], compile=bool(args.compile))
        work = max(p["elapsed"] for p in everything) + time.perf_counter() - ts
        result = _suite_result(report, elapsed=work)
        if cert is not None:
            secs = [sum(p["cert_secs"][k] for p in everything) for k in range(len(eps_list))]
            _add_certified(result, report, cert, suite=suite, cert_time=secs)
        per_suite[suite] = result
    elapsed = time.perf_counter() - t0
    first = per_suite[suites[0]]
    is_proto = plan["is_proto"]
    out = {
        "clean_accuracy": first["clean_accuracy"],
        "clean": first["clean"],
        "checkpoint": _portable_path(plan["path"]),
        "dataset": config["dataset"],
        "method": config.get("method"),
        "metric": config.get("metric"),
        "model": config.get("model"),
        "decision": model.decision if is_proto else None,
        "norm": norm,
        "n": int(n),
        "points": {"suite": {"first": 0, "count": int(n)}},
        "seed": args.seed,
        "device": str(plan["device"].type),
        "world_size": int(world),
    }
    if cert is not None:
        out["points"]["certify"] = {"first": 0, "count": int(m)}
        out["certificate"] = CERTIFICATE_NOTES[norm]
        if m != n:
            with torch.no_grad():
                correct = _correct_count(model, x[:m], y[:m], batch_size=args.batch_size or _CERT_BATCH)
            out["certify_clean_accuracy"] = _frac(correct, m)
            out["certify_clean"] = correct
    if len(suites) == 1:
        out.update({"results": first["results"], "flags": first["flags"], "suite": suites[0],
                    "timings": first["timings"], "eval_time_s": elapsed})
    else:
        out.update({"suite": suites, "suites": per_suite, "eval_time_s": elapsed})
    if args.json is not None:
        write_json_atomic(out, args.json)
        for p in partial_paths(args.json):
            os.unlink(p)
    name = config.get("method") or "model"
    if config.get("method") == "drp" and config.get("metric"):
        name = f"drp-{config['metric']}"
    if is_proto and model.decision != "nearest":
        name += f", {model.decision} decision"
    if args.plot is not None:
        from .plots import plot_accuracy_vs_eps

        curves = {(name if len(suites) == 1 else f"{name} ({s})"): r for s, r in per_suite.items()}
        plot_accuracy_vs_eps(curves, args.plot, n=out["n"], norm=norm,
                             title=f"{config['dataset']}: accuracy against {NORM_NAMES[norm]} eps "
                                   f"({' vs '.join(suites)} suite{'s' if len(suites) > 1 else ''}, n={out['n']})")
    procs = f", {world} processes" if world > 1 else ""
    print(f"{out['checkpoint']}: {name}, {config['dataset']}, {out['n']} test points, {NORM_NAMES[norm]}, "
          f"{', '.join(suites)} suite{'s' if len(suites) > 1 else ''}, {elapsed:.1f} s{procs}")
    for i, (suite, result) in enumerate(per_suite.items()):
        if i:
            print()
        print(format_eval_table(result, suite=suite if len(suites) > 1 else None, norm=norm))
    written = [f for f in (args.json, args.plot) if f is not None]
    if written:
        print("wrote " + " and ".join(written))
    sys.stdout.flush()
    return 0


def _correct_count(model, x, y, *, batch_size):
    dev = next(iter(model.buffers())).device
    return sum(int((model(x[i:i + batch_size].to(dev)).argmax(1).cpu() == y[i:i + batch_size]).sum())
               for i in range(0, x.shape[0], batch_size))


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
    curve["norm"] = data.get("norm", "linf")  # reports before the L2 suite were all L-inf
    if curve["norm"] not in NORMS:
        raise _cli_error(f"{path}: unknown norm {curve['norm']!r} (expected linf or l2)")
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
    norms = sorted({c["norm"] for c in curves.values()})
    if len(norms) > 1:
        raise _cli_error(f"the reports mix norms ({' and '.join(norms)}): eps of different norms cannot share an "
                         "axis; plot each norm on its own")
    ns = {c["n"] for c in curves.values() if c.get("n")}
    suites = sorted({c["suite"] for c in curves.values()})
    title = args.title or f"accuracy against {NORM_NAMES[norms[0]]} eps ({' / '.join(suites)} suite" + (
        f", n={ns.pop()})" if len(ns) == 1 else ")")
    plot_accuracy_vs_eps(curves, args.out, title=title, norm=norms[0])
    print(f"wrote {args.out}")
    return 0

