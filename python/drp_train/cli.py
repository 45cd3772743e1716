"""The ``drp`` command line (also ``python -m drp_train``).

Subcommands: ``prototypes``, ``train``, ``eval``, ``compare``. Every misuse (unknown
flag, impossible value, missing dataset, wrong checkpoint) ends with one line on
stderr, ``drp: error: <message>``, and exit code 2; no traceback.
"""
import argparse
import contextlib
import logging
import os
import sys
import warnings

from tqdm.auto import tqdm

import drp_kernels
from drp_kernels.attacks import RobustnessWarning

from ._cli_utils import check_at_least, check_output_path, parse_eps, stderr_is_terminal
from .checkpoint import load_checkpoint, stored_config
from .config import (DATASETS, DEFAULT_PROTO_METHOD, HEADS, METHODS, METRICS, MODELS, OPTIMIZERS, PRESETS,
                     PROTO_METHODS, SCHEDULES, TrainConfig, apply_preset, describe_default as d)
from .errors import CLIError, DrpTrainError
from .run_folder import RunFolder
from .train import train

__all__ = ["main", "build_parser", "CLIError"]

log = logging.getLogger("drp_train")


def _is_rank_zero() -> bool:
    """False in the processes of ranks 1, 2, ... when started by torchrun with several processes."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) <= 1 or int(os.environ.get("RANK", "0")) == 0
    except ValueError:
        return True


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line: ``drp <sub>: error: <message>``."""

    def error(self, message):
        message = " ".join(str(message).split())
        # under torchrun every rank parses the same command line: only rank 0 reports the error
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n" if _is_rank_zero() else None)


_PROTO_METHOD_HELP = (
    "box: a softmin packing of the box [-1, 1]^D (min L-inf distance 2, the optimum), what DRP-linf trains with "
    "by default; sphere: points on the unit sphere, the default for cosine and l2; hypercube: +-1 corners of the "
    "box (the library's default for linf), under which the L-inf distance from an output to every corner is set by "
    "the output's largest coordinate, so classes tie and DRP-linf training stays near chance; paper: the paper's "
    "SGD on the sum of pairwise L-inf distances, unconstrained, so the entries grow to tens (about -77..54 for "
    "10 x 100) and DRP trains slower (measured on the first 20k Fashion-MNIST images, 2 epochs, seed 0: 74.3%% "
    "clean with paper prototypes at lr 0.01, 83.0%% with box prototypes at lr 0.2); default: the library's choice "
    "for the metric")


def _add_prototypes_parser(sub):
    p = sub.add_parser("prototypes", help="generate repulsive prototypes and print their separation",
                       description="Generate C repulsive prototypes of dimension D, save them (with their metric "
                                   "and method) and print the separation report.")
    p.add_argument("--classes", type=int, required=True, help="number of classes C (>= 2)")
    p.add_argument("--dim", type=int, required=True, help="prototype dimension D (>= 1; >= 2 for cosine and l2)")
    p.add_argument("--metric", choices=METRICS, default=TrainConfig.metric,
                   help=f"distance (default {TrainConfig.metric})")
    p.add_argument("--method", choices=PROTO_METHODS, default=None,
                   help=f"{_PROTO_METHOD_HELP} (default: what drp train uses, box for linf, default for cosine and l2)")
    p.add_argument("--steps", type=int, default=None, help="optimisation steps (default: the method's)")
    p.add_argument("--seed", type=int, default=TrainConfig.seed, help=f"default {TrainConfig.seed}")
    p.add_argument("--out", required=True, help="output file, .pt or .npy")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_prototypes)


_S = argparse.SUPPRESS


def _add_train_parser(sub):
    p = sub.add_parser(
        "train", help="train a model (drp, ce, pgd-at, trades, fast-at, certified)",
        description="Train one model. Writes config.json, metrics.jsonl (one line per epoch), last.pt "
                    "(every epoch) and final.pt in --out. Options not given come from --preset, else the "
                    "defaults of drp_train.config.TrainConfig; with --resume, from the run's checkpoint. "
                    "Ctrl-C saves last.pt and stops; --resume continues from it.")
    a = p.add_argument
    a("--preset", choices=tuple(PRESETS), default=_S,
      help="named option bundle: paper-cifar10 (ResNet-18, 100-d linf with the paper's prototypes, 200 epochs), "
           "paper-cifar100 (500-d), fmnist (the defaults on Fashion-MNIST), certified-fmnist (the committed "
           "certified headline: linf-dist 5 x 1024, --p-hold 0.125 --cert-ce-final 0.0002, eps 0.1); explicit "
           "flags override it")
    a("--dataset", choices=DATASETS, default=_S, help=f"default {d('dataset')}")
    a("--data-dir", default=_S, help="dataset folder (default: $DRP_DATA_DIR, then the Debian package's)")
    a("--method", choices=METHODS, default=_S, help=f"default {d('method')}")
    a("--metric", choices=METRICS, default=_S, help=f"DRP distance (default {d('metric')})")
    a("--proto-dim", type=int, default=_S, help=f"prototype dimension (default {d('proto_dim')})")
    a("--prototypes", metavar="FILE", default=_S,
      help="prototypes from `drp prototypes` (.pt/.npy); their metric must match --metric")
    a("--proto-method", choices=PROTO_METHODS, default=_S,
      help=f"how prototypes are generated: {_PROTO_METHOD_HELP} (default {d('proto_method')})")
    a("--drp-ce-weight", type=float, default=_S,
      help=f"weight of ProtoLoss' optional CE term (default {d('drp_ce_weight')})")
    a("--model", choices=MODELS, default=_S, help=f"default {d('model')}")
    a("--depth", type=int, default=_S, help=f"linf-dist: hidden LpDist layers (default {d('depth')})")
    a("--width", type=int, default=_S,
      help=f"linf-dist: neurons per hidden layer, also the prototype dimension (default {d('width')})")
    a("--width-first", type=int, default=_S, metavar="N",
      help="linf-dist: neurons of the first hidden layer (default: 2 x --width, the best measured; --width "
           "with --depth 1); at >= the input size (784 on Fashion-MNIST) the identity initialisation reaches "
           "the first layer too")
    a("--head", choices=HEADS, default=_S,
      help=f"linf-dist: learnable prototypes with per-class offsets, or fixed DRP box prototypes "
           f"(default {d('head')})")
    a("--eps-train", type=parse_eps, default=_S, metavar="EPS",
      help=f"certified: the radius of the training margin (default {d('eps_train')})")
    a("--cert-ce-weight", type=float, default=_S,
      help=f"certified: weight of the cross-entropy term beside the clipped hinge (default {d('cert_ce_weight')})")
    a("--cert-ce-final", type=float, default=_S, metavar="W",
      help="certified: the CE weight at the end of the p schedule; it decays exponentially from --cert-ce-weight "
           "as p rises (the l-inf-dist v2 recipe: 0.05 -> 0.0002; default: constant)")
    a("--p-hold", type=float, default=_S, metavar="FRACTION",
      help=f"certified: fraction of the steps held at p = 8 before p rises geometrically to 1000 "
           f"(default {d('p_hold')})")
    a("--p-inf", type=float, default=_S, metavar="FRACTION",
      help=f"certified: fraction of the steps, the last ones, at p = inf (default {d('p_inf')})")
    a("--input-subset", type=float, default=_S, metavar="Q",
      help="certified: while p < inf, each of 16 groups of neurons per layer sees a random fraction Q of its "
           "inputs, drawn every step and shared by the batch (SortNet-style; the p = inf phase and evaluation "
           f"use all inputs; default {d('input_subset')}: all)")
    a("--crop-padding", type=int, default=_S, metavar="PIXELS",
      help="random crop with this much zero padding, no flip (the l-inf-dist nets' Fashion-MNIST augmentation "
           f"uses 1; default {d('crop_padding')}: off)")
    a("--val-split", type=int, default=_S, metavar="N",
      help="hold N training images out as a fixed validation split: metrics.jsonl records the validation "
           "accuracy each epoch, and for certified runs at p = inf the certified accuracy at --eps "
           f"(default {d('val_split')})")
    a("--optimizer", choices=OPTIMIZERS, default=_S, help=f"default {d('optimizer')}")
    a("--epochs", type=int, default=_S, help=f"default {d('epochs')}")
    a("--batch-size", type=int, default=_S, help=f"global batch size (default {d('batch_size')})")
    a("--lr", type=float, default=_S, help=f"peak learning rate (default {d('lr')})")
    a("--schedule", choices=SCHEDULES, default=_S, help=f"per-step lr schedule (default {d('schedule')})")
    a("--lr-hold", type=float, default=_S, metavar="FRACTION",
      help="keep the base lr for this fraction of the steps; --schedule then runs over the rest (the l-inf-dist "
           f"nets' recipe: constant while p is held at 8, then cosine; default {d('lr_hold')}: from the start)")
    a("--momentum", type=float, default=_S, help=f"SGD momentum, or Adam beta1 (default {d('momentum')})")
    a("--weight-decay", type=float, default=_S, help=f"default {d('weight_decay')}")
    a("--eps", type=parse_eps, default=_S, metavar="EPS",
      help=f"L-inf budget of adversarial training, a number or a fraction such as 8/255 (default {d('eps')})")
    a("--attack-steps", type=int, default=_S, help=f"PGD steps of pgd-at and trades (default {d('attack_steps')})")
    a("--attack-alpha", type=parse_eps, default=_S, metavar="ALPHA",
      help=f"PGD step size (default {d('attack_alpha')})")
    a("--trades-beta", type=float, default=_S, help=f"TRADES beta (default {d('trades_beta')})")
    a("--augment", action=argparse.BooleanOptionalAction, default=_S,
      help=f"random crop (pad 4) and flip (default: {d('augment')})")
    a("--amp", choices=("bf16", "fp16", "none"), default=_S, help="mixed precision on CUDA (default none)")
    a("--compile", action="store_true", default=_S, help="torch.compile the network")
    a("--channels-last", action="store_true", default=_S, help="channels_last memory format")
    a("--seed", type=int, default=_S, help=f"default {d('seed')}")
    a("--limit-train", type=int, default=_S, metavar="N", help="use the first N training samples (default all)")
    a("--limit-test", type=int, default=_S, metavar="N", help="use the first N test samples (default all)")
    a("--eval-batch-size", type=int, default=_S,
      help=f"batch size of the per-epoch test (default {d('eval_batch_size')})")
    a("--checkpoint-every", type=int, default=_S, metavar="STEPS",
      help=f"also write last.pt every STEPS optimiser steps (default: {d('checkpoint_every')})")
    a("--device", default=_S, help=f"cpu or cuda[:N] (default: {d('device')})")
    a("--out", default=_S, help=f"run folder (default {d('out')})")
    a("--resume", action="store_true", default=_S,
      help="continue the run in --out from its last.pt (an error when --out holds no run)")
    a("--quiet", action="store_true", default=_S, help="no progress bars or per-epoch log lines")
    p.set_defaults(run=_run_train)


def _add_lazy_parser(sub, name, module, add_name, run_name, help_text, description):
    p = sub.add_parser(name, help=help_text, description=description)
    try:
        mod = __import__(f"drp_train.{module}", fromlist=[add_name])
    except ImportError as e:
        # keep `drp --help` and the other subcommands usable; this one reports the problem
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(run=lambda args, _e=e: _unavailable(name, _e))
        return
    getattr(mod, add_name)(p)
    p.set_defaults(run=getattr(mod, run_name))


def _unavailable(name, error):
    raise CLIError(f"`drp {name}` is unavailable: {error}")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="drp", description="Deep Repulsive Prototypes: train and evaluate robust models")
    sub = p.add_subparsers(dest="command", metavar="{prototypes,train,eval,plot,compare}")
    _add_prototypes_parser(sub)
    _add_train_parser(sub)
    _add_lazy_parser(sub, "eval", "eval_cli", "add_eval_arguments", "run_eval",
                     "evaluate a checkpoint under the attack suite over a list of eps",
                     "Evaluate a checkpoint written by `drp train`: clean accuracy, then robust accuracy under "
                     "the attack suites (--suite, e.g. `paper standard` side by side) at each eps (--norm linf or "
                     "l2), on the first --limit test points, and for certifiable checkpoints the certified "
                     "accuracy. Prints the table; --json writes the report and --plot an accuracy-vs-eps plot. "
                     "Each point's result depends on the point, eps, suite and seed alone, not on --batch-size. "
                     "Started by `torchrun --nproc-per-node N -m drp_train eval ...`, the processes split the "
                     "points and rank 0 writes the same report. With --json, Ctrl-C keeps the partial results "
                     "beside it and --resume continues.")
    _add_lazy_parser(sub, "plot", "plots", "add_plot_arguments", "run_plot",
                     "plot several `drp eval` reports together",
                     "Draw the accuracy-vs-eps curves of several `drp eval --json` reports in one plot, with "
                     "95%% Wilson intervals; certified accuracy (linf-dist models) is drawn dashed.")
    _add_lazy_parser(sub, "compare", "compare", "add_compare_arguments", "run_compare",
                     "train CE, DRP-linf, DRP-cosine and PGD-AT alike and compare their robustness",
                     "Train several methods with the same network, data and budget, evaluate each under the "
                     "attack suite over a list of eps, and write a table, plots, report.md and compare.json to "
                     "--out. --preset demo is the few-minute version `make demo` runs; --preset full is the "
                     "full comparison.")
    return p


# ----------------------------------------------------------------------------- prototypes
def _run_prototypes(args) -> int:
    for option, value, low in (("--classes", args.classes, 2), ("--dim", args.dim, 1), ("--steps", args.steps, 1),
                               ("--seed", args.seed, 0)):
        check_at_least(option, value, low)
    if args.metric in ("cosine", "l2") and args.dim == 1 and args.classes > 2:
        raise CLIError(f"--dim 1 with --metric {args.metric}: in one dimension every unit vector is +1 or -1, so "
                       f"{args.classes} classes cannot have distinct prototypes; use --dim >= 2")
    ext = os.path.splitext(args.out)[1].lower()
    if ext not in (".pt", ".npy"):
        raise CLIError(f"--out must end in .pt or .npy, got {args.out!r}")
    check_output_path(args.out, "--out")
    method = args.method if args.method is not None else DEFAULT_PROTO_METHOD[args.metric]
    kwargs = dict(metric=args.metric, method=method, seed=args.seed, progress=not args.quiet and stderr_is_terminal(),
                  with_info=True)
    if args.steps is not None:
        kwargs["steps"] = args.steps
    try:
        P, info = drp_kernels.repulsive_prototypes(args.classes, args.dim, **kwargs)
    except ValueError as e:  # e.g. a --method made for another geometry than --metric
        raise CLIError(f"--method {method} with --metric {args.metric}, --classes {args.classes}, "
                       f"--dim {args.dim}: {e}") from None
    drp_kernels.save_prototypes(P, args.out, metric=info["metric"], method=info["method"])
    rep = drp_kernels.separation(P, metric=args.metric)
    lines = [f"prototypes: {args.classes} x {args.dim}, metric {args.metric}, method {info['method']}, "
             f"seed {args.seed} -> {args.out}"]
    for key, value in rep.items():
        if isinstance(value, float):
            lines.append(f"  {key:<16} {value:.6g}")
        elif value is None or isinstance(value, (int, str, bool)):
            lines.append(f"  {key:<16} {value}")
    print("\n".join(lines))
    return 0


# ----------------------------------------------------------------------------- train
def _run_train(args) -> int:
    explicit = {k: v for k, v in vars(args).items() if k not in ("command", "run", "preset")}
    if explicit.get("amp") == "none":
        explicit["amp"] = None
    preset = getattr(args, "preset", None)
    base = None
    if explicit.get("resume"):
        out = explicit.get("out", TrainConfig.out)
        path = RunFolder(out).checkpoint()
        if path is None:
            raise CLIError(f"--resume: no run to continue in {out} (no last.pt or final.pt); "
                           "drop --resume to start a new run there")
        base = stored_config(load_checkpoint(path))
    cfg = apply_preset(preset, explicit, base=base)
    result = train(cfg, progress=not cfg.quiet)
    if result.get("rank", 0) != 0:
        return 0  # under DDP only rank 0 reports
    final = result["final"]
    epochs = final.get("epoch", 0)
    print(f"trained {cfg.method} on {cfg.dataset}: test accuracy {final.get('test_accuracy', float('nan')):.4f} "
          f"after {epochs} epoch{'' if epochs == 1 else 's'}, {result['train_time_s']:.1f}s of training; "
          f"checkpoint {result['checkpoint']}")
    return 0


# ----------------------------------------------------------------------------- main
class _TqdmHandler(logging.Handler):
    def emit(self, record):
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except (OSError, ValueError):  # a closed or broken stream: logging's own fallback
            self.handleError(record)


# The training layer's log and the attack engine's progress lines (when stderr is not a terminal).
_ATTACKS_LOG = logging.getLogger("drp_kernels.attacks")
_LOGGERS = (log, _ATTACKS_LOG)


@contextlib.contextmanager
def _library_logging_restored():
    # The library's logger is the caller's to configure: `main` borrows it for one command and
    # hands it back as it found it (handlers, level, propagation), so an in-process caller
    # (a notebook, a test) keeps its own logging set-up.
    state = (list(_ATTACKS_LOG.handlers), _ATTACKS_LOG.level, _ATTACKS_LOG.propagate)
    try:
        yield
    finally:
        _ATTACKS_LOG.handlers[:] = state[0]
        _ATTACKS_LOG.setLevel(state[1])
        _ATTACKS_LOG.propagate = state[2]


def _configure_logging(quiet: bool):
    # Messages carry their own subject (a run's label such as "ce: epoch 1/10 ..."), so no prefix here.
    for logger in _LOGGERS:
        logger.setLevel(logging.WARNING if quiet else logging.INFO)
        if any(isinstance(h, _TqdmHandler) for h in logger.handlers):
            continue
        handler = _TqdmHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.propagate = False


def _show_warning(message, category, filename, lineno, file=None, line=None):
    # the CLI's warnings: one line on stderr, no internal file path
    try:
        print(f"drp: warning: {' '.join(str(message).split())}", file=sys.stderr if file is None else file)
    except (OSError, ValueError):  # a closed stream: nothing to report to
        pass


def main(argv=None) -> int:
    """Run the ``drp`` command; return its exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error already reported in one line (2)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    if args.command is None:
        print("drp: error: choose a subcommand: prototypes, train, eval, compare", file=sys.stderr)
        return 2
    with _library_logging_restored(), warnings.catch_warnings():
        _configure_logging(bool(getattr(args, "quiet", False)))
        # the evaluation's flags are printed once, in its result table and report
        warnings.filterwarnings("ignore", category=RobustnessWarning)
        warnings.showwarning = _show_warning  # restored by catch_warnings
        if hasattr(args, "_argv"):  # `drp eval` names the command that continues an interrupted run
            args._argv = list(sys.argv[1:] if argv is None else argv)
        try:
            return int(args.run(args) or 0)
        except DrpTrainError as e:
            if not getattr(e, "silent", False):  # e.g. rank 1, 2, ... of a torchrun evaluation
                msg = " ".join(str(e).split())
                print(f"drp: error: {msg}", file=sys.stderr)
            return e.exit_code
        except KeyboardInterrupt:
            print("drp: interrupted", file=sys.stderr)
            return 130
