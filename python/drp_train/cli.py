"""The ``drp`` command line (also ``python -m drp_train``).

Subcommands: ``prototypes``, ``train``, ``eval``, ``compare``. Every misuse (unknown
flag, impossible value, missing dataset, wrong checkpoint) ends with one line on
stderr, ``drp: error: <message>``, and exit code 2; no traceback.
"""
import argparse
import logging
import os
import sys

from tqdm.auto import tqdm

from .errors import CLIError, DrpTrainError

__all__ = ["main", "build_parser", "CLIError"]

log = logging.getLogger("drp_train")


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line: ``drp <sub>: error: <message>``."""

    def error(self, message):
        message = " ".join(str(message).split())
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _add_prototypes_parser(sub):
    p = sub.add_parser("prototypes", help="generate repulsive prototypes and print their separation",
                       description="Generate C repulsive prototypes of dimension D, save them and print "
                                   "the separation report.")
    p.add_argument("--classes", type=int, required=True, help="number of classes C (>= 2)")
    p.add_argument("--dim", type=int, required=True, help="prototype dimension D (>= 1)")
    p.add_argument("--metric", choices=("linf", "cosine", "l2"), default="linf", help="distance (default linf)")
    p.add_argument("--method", choices=("paper", "default"), default="paper",
                   help="paper: maximise the sum of pairwise L-inf distances (SGD); default: the library's method")
    p.add_argument("--steps", type=int, default=None, help="optimisation steps (default: the method's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output file, .pt or .npy")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_prototypes)


_S = argparse.SUPPRESS


def _add_train_parser(sub):
    from .config import DATASETS, METHODS, METRICS, MODELS, PRESETS, SCHEDULES

    p = sub.add_parser(
        "train", help="train a model (drp, ce, pgd-at, trades, fast-at)",
        description="Train one model. Writes config.json, metrics.jsonl (one line per epoch), last.pt "
                    "(every epoch) and final.pt in --out. Options not given come from --preset, else the "
                    "defaults of drp_train.config.TrainConfig; with --resume, from the run's checkpoint.")
    a = p.add_argument
    a("--preset", choices=tuple(PRESETS), default=_S,
      help="named option bundle: paper-cifar10 (ResNet-18, 100-d linf, 200 epochs), paper-cifar100 (500-d), "
           "fmnist (small CNN, 10 epochs); explicit flags override it")
    a("--dataset", choices=DATASETS, default=_S, help="default fashion-mnist")
    a("--data-dir", default=_S, help="dataset folder (default: $DRP_DATA_DIR, then the Debian package's)")
    a("--method", choices=METHODS, default=_S, help="default drp")
    a("--metric", choices=METRICS, default=_S, help="DRP distance (default linf)")
    a("--proto-dim", type=int, default=_S, help="prototype dimension (default 100, 500 for cifar100)")
    a("--prototypes", metavar="FILE", default=_S, help="prototypes from `drp prototypes` (.pt/.npy)")
    a("--proto-method", choices=("paper", "default"), default=_S,
      help="how prototypes are generated (default: paper for linf, default otherwise)")
    a("--drp-ce-weight", type=float, default=_S, help="weight of ProtoLoss' optional CE term (default 0)")
    a("--model", choices=MODELS, default=_S, help="default cnn for 28x28 data, resnet18 for CIFAR")
    a("--epochs", type=int, default=_S, help="default 10")
    a("--batch-size", type=int, default=_S, help="global batch size (default 128)")
    a("--lr", type=float, default=_S, help="peak learning rate (default 0.05; 0.01 for drp; 0.1 on CIFAR)")
    a("--schedule", choices=SCHEDULES, default=_S, help="per-step lr schedule (default cosine)")
    a("--momentum", type=float, default=_S, help="SGD momentum (default 0.9)")
    a("--weight-decay", type=float, default=_S, help="default 5e-5 for drp (the paper's), 5e-4 otherwise")
    a("--eps", type=float, default=_S, help="L-inf budget of adversarial training (default 0.1, 8/255 on CIFAR)")
    a("--attack-steps", type=int, default=_S, help="PGD steps of pgd-at and trades (default 10)")
    a("--attack-alpha", type=float, default=_S, help="PGD step size (default 2.5 eps / steps; 1.25 eps for fast-at)")
    a("--trades-beta", type=float, default=_S, help="TRADES beta (default 6)")
    a("--augment", action=argparse.BooleanOptionalAction, default=_S,
      help="random crop (pad 4) and flip (default: on for CIFAR)")
    a("--amp", choices=("bf16", "fp16", "none"), default=_S, help="mixed precision on CUDA")
    a("--compile", action="store_true", default=_S, help="torch.compile the network")
    a("--channels-last", action="store_true", default=_S, help="channels_last memory format")
    a("--seed", type=int, default=_S, help="default 0")
    a("--limit-train", type=int, default=_S, metavar="N", help="use the first N training samples")
    a("--limit-test", type=int, default=_S, metavar="N", help="use the first N test samples")
    a("--eval-batch-size", type=int, default=_S, help="batch size of the per-epoch test (default 1000)")
    a("--checkpoint-every", type=int, default=_S, metavar="STEPS",
      help="also write last.pt every STEPS optimiser steps (default: every epoch only)")
    a("--device", default=_S, help="cpu or cuda[:N] (default: cuda when available)")
    a("--out", default=_S, help="run folder (default runs/train)")
    a("--resume", action="store_true", default=_S, help="continue the run in --out from its last.pt")
    a("--quiet", action="store_true", default=_S, help="no progress bars or per-epoch log lines")
    p.set_defaults(run=_run_train)


def _add_lazy_parser(sub, name, module, add_name, run_name, help_text):
    p = sub.add_parser(name, help=help_text)
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
    sub = p.add_subparsers(dest="command", metavar="{prototypes,train,eval,compare}")
    _add_prototypes_parser(sub)
    _add_train_parser(sub)
    _add_lazy_parser(sub, "eval", "evaluation", "add_eval_arguments", "run_eval",
                     "evaluate a checkpoint under the attack suite over a list of eps")
    _add_lazy_parser(sub, "compare", "compare", "add_compare_arguments", "run_compare",
                     "train CE, DRP-linf, DRP-cosine and PGD-AT alike and compare their robustness")
    return p


# ----------------------------------------------------------------------------- prototypes
def _run_prototypes(args) -> int:
    import drp_kernels

    if args.classes < 2:
        raise CLIError(f"--classes must be >= 2, got {args.classes}")
    if args.dim < 1:
        raise CLIError(f"--dim must be >= 1, got {args.dim}")
    if args.steps is not None and args.steps < 1:
        raise CLIError(f"--steps must be >= 1, got {args.steps}")
    if args.seed < 0:
        raise CLIError(f"--seed must be >= 0, got {args.seed}")
    ext = os.path.splitext(args.out)[1].lower()
    if ext not in (".pt", ".npy"):
        raise CLIError(f"--out must end in .pt or .npy, got {args.out!r}")
    folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(folder):
        raise CLIError(f"--out folder {folder} does not exist")
    kwargs = dict(metric=args.metric, method=args.method, seed=args.seed)
    if args.steps is not None:
        kwargs["steps"] = args.steps
    P = drp_kernels.repulsive_prototypes(args.classes, args.dim, **kwargs)
    drp_kernels.save_prototypes(P, args.out)
    rep = drp_kernels.separation(P, metric=args.metric)
    lines = [f"prototypes: {args.classes} x {args.dim}, metric {args.metric}, method {args.method}, "
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
    from .checkpoint import load_checkpoint
    from .config import apply_preset
    from .train import train

    explicit = {k: v for k, v in vars(args).items() if k not in ("command", "run", "preset")}
    if explicit.get("amp") == "none":
        explicit["amp"] = None
    preset = getattr(args, "preset", None)
    base = None
    if explicit.get("resume"):
        out = explicit.get("out", "runs/train")
        for name in ("final.pt", "last.pt"):
            path = os.path.join(out, name)
            if os.path.isfile(path):
                base = dict(load_checkpoint(path)["config"])
                break
    cfg = apply_preset(preset, explicit, base=base)
    result = train(cfg, progress=not cfg.quiet)
    if result.get("rank", 0) != 0:
        return 0  # under DDP only rank 0 reports
    final = result["final"]
    print(f"trained {cfg.method} on {cfg.dataset}: test accuracy {final.get('test_accuracy', float('nan')):.4f} "
          f"after {final.get('epoch', 0)} epochs, {result['train_time_s']:.1f}s of training; "
          f"checkpoint {result['checkpoint']}")
    return 0


# ----------------------------------------------------------------------------- main
class _TqdmHandler(logging.Handler):
    def emit(self, record):
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except (OSError, ValueError):  # a closed or broken stream: logging's own fallback
            self.handleError(record)


def _configure_logging(quiet: bool):
    if any(isinstance(h, _TqdmHandler) for h in log.handlers):
        log.setLevel(logging.WARNING if quiet else logging.INFO)
        return
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("drp: %(message)s"))
    log.addHandler(handler)
    log.propagate = False
    log.setLevel(logging.WARNING if quiet else logging.INFO)


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
    _configure_logging(bool(getattr(args, "quiet", False)))
    try:
        return int(args.run(args) or 0)
    except DrpTrainError as e:
        msg = " ".join(str(e).split())
        print(f"drp: error: {msg}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("drp: interrupted", file=sys.stderr)
        return 130
