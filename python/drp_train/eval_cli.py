"""``drp eval``: robust accuracy of a trained checkpoint against a list of eps, L-inf or L2.

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
  SIGTERM) writes the partial file and exits 130 with the command that continues; the
  JSON's eval_time_s and stage timings count the runs before a resume too.

The numbers come from ``evaluation.py`` (the attacks, the certificate, the JSON schema); the partial
files and the continuing command from ``eval_partial.py``.
"""
import logging
import math
import os
import sys
import time

import torch

import drp_kernels
from drp_kernels import attacks, is_certifiable

from . import ddp
from ._cli_utils import (
    PLOT_SUFFIXES,
    check_at_least,
    check_eps_list,
    check_output_path as _check_output_path,
    cli_error as _cli_error,
    one_line as _one_line,
    parse_eps,
    pick_device,
    write_json_atomic,
)
from .checkpoint import load_checkpoint, load_classifier, resolve_checkpoint_path
from .config import run_label
from .errors import CheckpointError, DrpTrainError
from .eval_partial import (EvalInterrupted, args_digest, continue_command, file_sha256, partial_path, partial_paths,
                           read_partials, tensors_sha256, write_partial)
from .evaluation import (CERT_BATCH, CERTIFICATE_NOTES, DECISIONS, NORM_NAMES, PAPER_SUITES, SUITES, add_certified,
                         certify_eps, correct_count, format_eval_table, frac, load_eval_data, suite_result)
from .signals import TermAsInterrupt

__all__ = ["add_eval_arguments", "run_eval", "resolve_checkpoint", "portable_path", "NORMS"]

NORMS = attacks.NORMS
DEFAULT_LIMIT = 1000  # test points the attacks use by default


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
    parser.add_argument("--limit", type=int, default=None, metavar="N",
                        help=f"attack the first N test points; 0: all of them (default: {DEFAULT_LIMIT})")
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
    path = os.fspath(path)
    if not os.path.exists(path):
        raise _cli_error(f"--checkpoint: {path} does not exist")
    try:
        return resolve_checkpoint_path(path)
    except CheckpointError as exc:
        raise _cli_error(f"--checkpoint: {_one_line(exc)}") from None


def _load(path):
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


def portable_path(path):
    """`path` relative to the working directory, or `<run folder>/<file>` when it lies outside
    it: results never carry an absolute path of the machine that made them."""
    full = os.path.abspath(path)
    rel = os.path.relpath(full, os.getcwd())
    if rel == os.pardir or rel.startswith(os.pardir + os.sep):
        return os.path.join(os.path.basename(os.path.dirname(full)), os.path.basename(full))
    return rel


def _check_suites(suites, model, config, norm):
    suites = list(dict.fromkeys(suites))  # in the given order, each once
    paper = [s for s in suites if s in PAPER_SUITES]
    if paper and norm != "linf":
        raise _cli_error(f"--suite {' '.join(paper)}: the paper's attack is L-inf only; with --norm {norm} use "
                         f"--suite standard or quick")
    if paper and not isinstance(model, drp_kernels.ProtoClassifier):
        raise _cli_error(f"--suite {' '.join(paper)}: the paper's attack needs a "
                         f"DRP checkpoint (a prototype classifier); this one was trained with method "
                         f"{config.get('method')!r}")
    return suites


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


def _run_eval(args):
    device = pick_device(args.device)
    with ddp.process_group(device.type, timeout=ddp.EVAL_TIMEOUT) as info:
        if info.enabled and device.type == "cuda":
            device = torch.device("cuda", info.local_rank)
        digests = ddp.gather_objects(args_digest(args), info)
        if len(set(digests)) > 1:
            bad = next(r for r, d in enumerate(digests) if d != digests[0])
            raise _cli_error(f"torchrun ranks disagree on the arguments (rank {bad} differs from rank 0); start "
                             "every rank with the same `drp eval` command")
        plan, message, failure = None, None, None
        try:
            plan = _prepare(args, device)
        except DrpTrainError as exc:
            message = " ".join(str(exc).split())
        except Exception as exc:  # noqa: BLE001 - an unexpected error: the other ranks must not wait for it
            if not info.enabled:
                raise
            failure, message = exc, f"rank {info.rank} failed: {type(exc).__name__}: {' '.join(str(exc).split())}"
        message = ddp.first_message(message, info)  # every rank stops if any rank found a problem
        if failure is not None:
            raise failure
        if message is not None:
            raise _cli_error(message)
        return _execute(plan, args, info)


def _prepare(args, device):
    """Everything checked and loaded before any work or any file: returns the plan (a dict)."""
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
    if getattr(args, "all", False) and args.limit not in (None, 0):
        raise _cli_error(f"--limit {args.limit} with --all: --all attacks every test point")
    limit = 0 if getattr(args, "all", False) else (DEFAULT_LIMIT if args.limit is None else args.limit)
    if limit < 0:
        raise _cli_error(f"--limit: expected a number of test points >= 1, or 0 for all of them, got {limit}")
    cert_limit = getattr(args, "certify_limit", None)
    if getattr(args, "all", False) and cert_limit not in (None, 0):
        raise _cli_error(f"--certify-limit {cert_limit} with --all: --all certifies every test point")
    if cert_limit is not None and cert_limit < 0:
        raise _cli_error(f"--certify-limit: expected a number of test points >= 1, or 0 for all of them, got "
                         f"{cert_limit}")
    check_at_least("--batch-size", args.batch_size, 1)
    check_at_least("--seed", args.seed, 0)
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
    meta = {"checkpoint_sha256": file_sha256(path), "dataset": config["dataset"], "eps": list(eps_list),
            "suites": list(suites), "seed": int(args.seed), "norm": norm,
            "decision": model.decision if is_proto else None, "n": int(n),
            "data_sha256": tensors_sha256(x[:max(n, m)], y[:max(n, m)]),
            "engine": f"drp_kernels {getattr(drp_kernels, '__version__', '?')}, torch {torch.__version__}",
            "device": torch.device(device).type, "compile": bool(getattr(args, "compile", False))}
    resumed, prior = {}, None
    found = partial_paths(args.json) if args.json is not None else []
    if not resume and found:
        raise _cli_error(f"--json: partial results of an interrupted evaluation lie beside {args.json} "
                         f"({os.path.basename(found[0])}): continue it with --resume, or delete "
                         "them to start afresh")
    if resume:
        if not found:
            raise _cli_error(f"--resume: no partial file beside {args.json} (expected {args.json}.partial); run "
                             "without --resume to start the evaluation")
        resumed, prior = read_partials(found, meta)
    # wall time of the runs before a --resume (0 for a fresh run), counted into every elapsed figure
    return {"prior": prior, "before_s": 0.0 if prior is None else prior["elapsed_s"], "path": path, "model": model,
            "config": config, "suites": suites, "is_proto": is_proto,
            "certifiable": certifiable, "x": x, "y": y, "n": n, "m": m, "eps": eps_list, "norm": norm,
            "meta": meta, "resumed": resumed, "device": device}


def _execute(plan, args, info):
    model, x, y, n, m = plan["model"], plan["x"], plan["y"], plan["n"], plan["m"]
    device, norm, eps_list, suites = plan["device"], plan["norm"], plan["eps"], plan["suites"]
    model = model.to(device).eval()
    my_partial = partial_path(args.json, info) if args.json is not None else None
    ddp.barrier(info)
    progress = not args.quiet and info.is_main
    shard = torch.arange(n)[info.rank::info.world_size]
    if progress and info.enabled:
        logging.getLogger("drp_train").info("%d points over %d processes; the progress is rank 0's %d points",
                                            n, info.world_size, shard.numel())
    kwargs = {"eps_list": eps_list, "norm": norm, "seed": int(args.seed), "compile": bool(args.compile)}
    if args.batch_size is not None:
        kwargs["batch_size"] = args.batch_size
    # every resumed suite from the start, so that an interrupt before the loop reaches it keeps it
    states = {s: plan["resumed"][s].select(shard) for s in suites if s in plan["resumed"]}
    prior = plan["prior"]
    generation = 0 if prior is None else prior["generation"] + 1
    before = plan["before_s"]
    if prior is not None and info.is_main:  # rank 0 carries the earlier runs' stage times
        for s, tm in prior["timings"].items():
            if s in states:
                states[s].timings = [dict(t) for t in tm]
    t0 = time.perf_counter()

    def save(_state=None):
        if my_partial is not None:
            write_partial(my_partial, plan["meta"], states, info, generation=generation,
                          elapsed_s=before + time.perf_counter() - t0)

    try:
        with TermAsInterrupt():
            for suite in suites:
                if suite not in states:
                    states[suite] = attacks.SweepState(index=shard, eps_list=eps_list, suite=suite, norm=norm,
                                                       seed=int(args.seed))
                st = states[suite]
                if shard.numel():
                    attacks.sweep(model, x[shard], y[shard], suite=suite, index=shard, state=st, progress=progress,
                                  on_batch=save, **kwargs)
            cert, cert_secs = None, [0.0] * len(eps_list)
            if plan["certifiable"]:
                cshard = torch.arange(m)[info.rank::info.world_size]
                cert, cert_secs = certify_eps(model, x[cshard], y[cshard], eps_list,
                                               batch_size=args.batch_size or CERT_BATCH)
    except KeyboardInterrupt:
        if my_partial is None:
            raise EvalInterrupted("interrupted; nothing saved (without --json there is no partial file to resume "
                                  "from)") from None
        save()
        raise EvalInterrupted(f"interrupted; the partial results are in {my_partial}: continue with "
                              f"`{continue_command(args, info)}`") from None
    payload = {"states": {s: states[s].to_dict(starts=False) for s in suites if s in states},  # timings too
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
        # (merge sums the ranks' stage times; rank 0's include the runs before a --resume)
        merged = attacks.SweepState.merge([attacks.SweepState.from_dict(p["states"][suite]) for p in everything])
        report = attacks.sweep_report(model, x[:n], y[:n], merged, checks=True,
                                      return_points=plan["certifiable"], compile=bool(args.compile))
        work = max(p["elapsed"] for p in everything) + time.perf_counter() - ts
        result = suite_result(report, elapsed=work)
        if cert is not None:
            secs = [sum(p["cert_secs"][k] for p in everything) for k in range(len(eps_list))]
            add_certified(result, report, cert, suite=suite, cert_time=secs)
        per_suite[suite] = result
    # wall time of the evaluation, the runs before a --resume included
    elapsed = time.perf_counter() - t0 + plan["before_s"]
    first = per_suite[suites[0]]
    is_proto = plan["is_proto"]
    out = {
        "clean_accuracy": first["clean_accuracy"],
        "clean": first["clean"],
        "checkpoint": portable_path(plan["path"]),
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
                correct = correct_count(model, x[:m], y[:m], batch_size=args.batch_size or CERT_BATCH)
            out["certify_clean_accuracy"] = frac(correct, m)
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
    name = run_label(config.get("method") or "model", config.get("metric"))
    if is_proto and model.decision != "nearest":
        name += f", {model.decision} decision"
    if args.plot is not None:
        from .plots import plot_accuracy_vs_eps  # matplotlib, only when a plot is asked for

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
