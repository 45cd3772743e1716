"""Training configuration: one dataclass of plain data, its defaults and presets.

Options left as ``None`` are filled by :meth:`TrainConfig.resolved` from the dataset
and the method (see ``_resolve``), so a stored config always holds concrete values.
"""
import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Optional

from drp_kernels import DEFAULT_METRIC, HEADS, METRICS, PROTOTYPE_METHODS as PROTO_METHODS

from .errors import ConfigError

__all__ = [
    "TrainConfig",
    "DATASETS",
    "METHODS",
    "METRICS",
    "PROTO_METHODS",
    "MODELS",
    "SCHEDULES",
    "AMP_MODES",
    "HEADS",
    "OPTIMIZERS",
    "PRESETS",
    "apply_preset",
    "run_label",
]

DATASETS = ("fashion-mnist", "mnist", "cifar10", "cifar100")
METHODS = ("drp", "ce", "pgd-at", "trades", "fast-at", "certified")
MODELS = ("cnn", "resnet18", "preact-resnet18", "wrn-34-10", "linf-dist")
OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("cosine", "cyclic", "multistep")
AMP_MODES = (None, "bf16", "fp16")

@dataclass
class TrainConfig:
    """Every option of a training run. Plain data only (str, int, float, bool, None)."""

    dataset: str = "fashion-mnist"
    data_dir: Optional[str] = None
    method: str = "drp"
    metric: str = DEFAULT_METRIC
    proto_dim: Optional[int] = None        # default: 100, 500 for cifar100; a --prototypes file's own dimension
    prototypes: Optional[str] = None       # a .pt/.npy file from `drp prototypes`
    proto_method: Optional[str] = None     # default: see DEFAULT_PROTO_METHOD
    drp_ce_weight: float = 0.0             # optional cross-entropy term of ProtoLoss
    model: Optional[str] = None            # default: "cnn" for 28x28, "resnet18" for CIFAR, linf-dist for certified
    depth: int = 5                         # linf-dist: hidden LpDist layers
    width: int = 512                       # linf-dist: neurons per hidden layer (= prototype dimension)
    head: str = "learnable"                # linf-dist: learnable prototypes + offsets, or fixed DRP prototypes
    width_first: Optional[int] = None      # linf-dist: neurons of the first hidden layer; default: 2 x width
    eps_train: Optional[float] = None      # certified: hinge margin radius; default EPS_TRAIN_FACTOR * eps
    cert_ce_weight: float = 0.05           # certified: weight of the cross-entropy term (at the start)
    cert_ce_final: Optional[float] = None  # certified: CE weight at the end of the p schedule; default: constant
    p_hold: float = 0.05                   # certified: fraction of the steps at p = 8
    p_inf: float = 0.10                    # certified: fraction of the steps at p = inf (the last ones)
    input_subset: float = 1.0              # certified: each neuron group sees this fraction of its inputs (1: all)
    crop_padding: int = 0                  # random crop with this zero padding, no flip (0: off)
    val_split: int = 0                     # training images held out (a fixed split) for validation
    optimizer: Optional[str] = None        # default: adam for certified, sgd otherwise
    epochs: int = 10
    batch_size: Optional[int] = None       # global batch (split over DDP ranks); default DEFAULT_BATCH_SIZE
    lr: Optional[float] = None             # default: see _DEFAULT_LR
    schedule: str = "cosine"
    lr_hold: float = 0.0                   # fraction of the steps at the base lr before --schedule starts
    momentum: float = 0.9
    weight_decay: Optional[float] = None   # default: 5e-5 for drp (the paper's), 5e-4 otherwise
    eps: Optional[float] = None            # default: 0.1 for (Fashion-)MNIST, 8/255 for CIFAR
    attack_steps: int = 10
    attack_alpha: Optional[float] = None   # default: 2.5 eps / steps; 1.25 eps for fast-at
    trades_beta: float = 6.0
    augment: Optional[bool] = None         # random crop (pad 4) + flip; default on for CIFAR
    amp: Optional[str] = None
    compile: bool = False
    channels_last: bool = False
    seed: int = 0
    limit_train: Optional[int] = None
    limit_test: Optional[int] = None
    eval_batch_size: int = 1000
    checkpoint_every: int = 0              # also checkpoint every N optimiser steps (0: each epoch only)
    out: str = "runs/train"
    resume: bool = False
    quiet: bool = False
    device: Optional[str] = None           # default: cuda when available, else cpu
    preset: Optional[str] = None           # the preset the options came from (informative)

    # ------------------------------------------------------------------ plain data
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"a training config must be a dict, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown training config keys: {', '.join(map(str, unknown))}")
        return cls(**d)

    # ------------------------------------------------------------------ defaults
    def resolved(self) -> "TrainConfig":
        """A copy with every ``None`` default filled in, validated."""
        c = dataclasses.replace(self)
        c.validate()
        cifar = c.dataset.startswith("cifar")
        if c.model is None:
            c.model = "linf-dist" if c.method == "certified" else "resnet18" if cifar else "cnn"
        if c.batch_size is None:
            c.batch_size = DEFAULT_BATCH_SIZE[c.method == "certified"]
        if c.optimizer is None:
            c.optimizer = "adam" if c.method == "certified" else "sgd"
        if c.proto_method is None:
            c.proto_method = DEFAULT_PROTO_METHOD[c.metric]
        if c.proto_dim is None and c.prototypes is None:
            c.proto_dim = DEFAULT_PROTO_DIM[c.dataset == "cifar100"]
        if c.eps is None:
            c.eps = DEFAULT_EPS[cifar]
        if c.width_first is None and c.model == "linf-dist":
            # the measured best: a first layer twice as wide (>= 784 inputs, so identity init reaches it)
            c.width_first = c.width if c.depth == 1 else 2 * c.width
        if c.eps_train is None:
            c.eps_train = min(1.0, EPS_TRAIN_FACTOR * c.eps)
        if c.attack_alpha is None:
            c.attack_alpha = 1.25 * c.eps if c.method == "fast-at" else 2.5 * c.eps / c.attack_steps
        if c.augment is None:
            c.augment = cifar
        if c.weight_decay is None:
            c.weight_decay = 0.0 if c.method == "certified" else DEFAULT_WEIGHT_DECAY[c.method == "drp"]
        if c.lr is None:
            c.lr = default_lr(dataset=c.dataset, method=c.method, proto_method=c.proto_method)
        c.validate()
        return c

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Raise ConfigError naming the first impossible option."""
        _choice("--dataset", self.dataset, DATASETS)
        _choice("--method", self.method, METHODS)
        _choice("--metric", self.metric, METRICS)
        if self.model is not None:
            _choice("--model", self.model, MODELS)
        if self.proto_method is not None:
            _choice("--proto-method", self.proto_method, PROTO_METHODS)
        _choice("--schedule", self.schedule, SCHEDULES)
        _float_range("--lr-hold", self.lr_hold, low=0.0, high=1.0, high_open=True)
        _choice("--amp", self.amp, AMP_MODES)
        _choice("--head", self.head, HEADS)
        if self.optimizer is not None:
            _choice("--optimizer", self.optimizer, OPTIMIZERS)
        _int_at_least("--depth", self.depth, 1)
        _int_at_least("--width", self.width, 1)
        _float_range("--cert-ce-weight", self.cert_ce_weight, low=0.0)
        if self.width_first is not None:
            _int_at_least("--width-first", self.width_first, 1)
            if self.depth == 1 and self.width_first != self.width:
                raise ConfigError(f"--width-first {self.width_first} with --depth 1: the only hidden layer is the "
                                  f"last one, whose width (--width {self.width}) is the prototype dimension")
        if self.cert_ce_final is not None:
            _float_range("--cert-ce-final", self.cert_ce_final, low=0.0)
            if (self.cert_ce_final == 0) != (self.cert_ce_weight == 0):
                raise ConfigError("--cert-ce-final and --cert-ce-weight must both be 0 or both > 0 (the CE weight "
                                  f"decays exponentially from one to the other), got {self.cert_ce_weight} and "
                                  f"{self.cert_ce_final}")
        _float_range("--p-hold", self.p_hold, low=0.0, high=1.0)
        _float_range("--p-inf", self.p_inf, low=0.0, high=1.0)
        if self.p_hold + self.p_inf > 1.0:
            raise ConfigError(f"--p-hold {self.p_hold} plus --p-inf {self.p_inf} exceed 1 (fractions of the steps)")
        _float_range("--input-subset", self.input_subset, low=0.0, high=1.0, low_open=True)
        if self.input_subset < 1.0 and self.method != "certified":
            raise ConfigError(f"--input-subset {self.input_subset} needs --method certified (it subsamples the "
                              f"inputs of linf-dist layers), got --method {self.method}")
        _int_at_least("--crop-padding", self.crop_padding, 0)
        _int_at_least("--val-split", self.val_split, 0)
        if self.eps_train is not None:
            _float_range("--eps-train", self.eps_train, low=0.0, high=1.0)
        if self.method == "certified" and self.model not in (None, "linf-dist"):
            raise ConfigError(f"--method certified needs --model linf-dist (a network with a known Lipschitz "
                              f"constant), got --model {self.model}")
        if self.model == "linf-dist" and self.method != "certified":
            raise ConfigError(f"--model linf-dist is trained with --method certified, got --method {self.method}")
        _int_at_least("--epochs", self.epochs, 1)
        if self.batch_size is not None:
            _int_at_least("--batch-size", self.batch_size, 1)
        _int_at_least("--attack-steps", self.attack_steps, 1)
        _int_at_least("--seed", self.seed, 0)
        _int_at_least("--eval-batch-size", self.eval_batch_size, 1)
        _int_at_least("--checkpoint-every", self.checkpoint_every, 0)
        if self.proto_dim is not None:
            _int_at_least("--proto-dim", self.proto_dim, 1)
        for name, value in (("--limit-train", self.limit_train), ("--limit-test", self.limit_test)):
            if value is not None:
                _int_at_least(name, value, 1)
        if self.lr is not None:
            _float_range("--lr", self.lr, low=0.0, low_open=True)
        _float_range("--momentum", self.momentum, low=0.0, high=1.0, high_open=True)
        if self.weight_decay is not None:
            _float_range("--weight-decay", self.weight_decay, low=0.0)
        _float_range("--drp-ce-weight", self.drp_ce_weight, low=0.0)
        _float_range("--trades-beta", self.trades_beta, low=0.0)
        if self.eps is not None:
            _float_range("--eps", self.eps, low=0.0, high=1.0)
        if self.attack_alpha is not None:
            _float_range("--attack-alpha", self.attack_alpha, low=0.0, low_open=True)
        if self.method in ("pgd-at", "trades", "fast-at", "certified") and self.eps is not None and self.eps <= 0:
            raise ConfigError(f"--eps must be > 0 for --method {self.method}, got {self.eps}")
        if self.method == "drp" and self.metric in ("cosine", "l2") and self.proto_dim == 1:
            raise ConfigError(f"--proto-dim 1 with --metric {self.metric}: in one dimension every unit vector is "
                              "+1 or -1, so most classes would share a prototype; use --proto-dim >= 2")
        if self.prototypes is not None and self.method != "drp":
            raise ConfigError(f"--prototypes is only used by --method drp, not {self.method}")
        if not isinstance(self.out, str) or not self.out:
            raise ConfigError("--out must name a folder")
        for name in ("compile", "channels_last", "resume", "quiet"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be a bool, got {getattr(self, name)!r}")


# ----------------------------------------------------------------------------- resolved defaults
# The defaults that depend on the dataset or the method. `resolved()`, the `drp train`
# help and `drp compare` all read them from here.
# Prototypes DRP trains with when --proto-method is not given: bounded sets. For linf the
# softmin packing of the box [-1, 1]^D ("box"), not the +-1 corners ("hypercube"): the L-inf
# distance from an output to a corner is set by the output's single largest coordinate, so
# most classes tie and DRP-linf training stays at chance (measured on Fashion-MNIST).
DEFAULT_PROTO_METHOD = {"linf": "box", "cosine": "default", "l2": "default"}
DEFAULT_BATCH_SIZE = {False: 128, True: 512}         # certified? -> batch size (512: the l-inf-distance nets')
DEFAULT_PROTO_DIM = {False: 100, True: 500}          # cifar100? -> prototype dimension
DEFAULT_EPS = {False: 0.1, True: 8 / 255}            # cifar? -> L-inf budget of adversarial training
DEFAULT_WEIGHT_DECAY = {True: 5e-5, False: 5e-4}     # drp? -> weight decay (5e-5 is the paper's); 0 for certified
# certified: the hinge's training radius as a multiple of --eps (the l-inf-distance nets train
# Fashion-MNIST at 0.225 for 0.1)
EPS_TRAIN_FACTOR = 2.25
# Learning rates on 28x28 data (measured on Fashion-MNIST). DRP with the paper's unbounded
# L-inf prototypes (entries up to ~80) diverges or stalls at CE's 0.05 and trains best
# around 0.01; with the library's bounded prototypes it wants a larger step.
_LR_28 = {"ce": 0.05, "drp-paper": 0.01, "drp": 0.2}
_LR_CIFAR = 0.1
_LR_CERTIFIED = 0.02  # Adam, as the l-inf-distance nets


def default_lr(*, dataset: str, method: str, proto_method: Optional[str] = None) -> float:
    """The learning rate `resolved()` picks when --lr is not given."""
    if method == "certified":
        return _LR_CERTIFIED
    if dataset.startswith("cifar"):
        return _LR_CIFAR
    if method != "drp":
        return _LR_28["ce"]
    return _LR_28["drp-paper" if proto_method == "paper" else "drp"]


def describe_default(name: str) -> str:
    """The default of TrainConfig field ``name`` in words, for the command line's help."""
    rules = {
        "lr": f"{_LR_28['ce']:g}; {_LR_28['drp']:g} for drp, {_LR_28['drp-paper']:g} for drp with paper "
              f"prototypes; {_LR_CIFAR:g} on CIFAR; {_LR_CERTIFIED:g} for certified",
        "weight_decay": f"{DEFAULT_WEIGHT_DECAY[True]:g} for drp (the paper's), 0 for certified, "
                        f"{DEFAULT_WEIGHT_DECAY[False]:g} otherwise",
        "eps_train": f"{EPS_TRAIN_FACTOR:g} eps",
        "optimizer": "adam for certified, sgd otherwise",
        "batch_size": f"{DEFAULT_BATCH_SIZE[False]}; {DEFAULT_BATCH_SIZE[True]} for certified",
        "eps": f"{DEFAULT_EPS[False]:g}, 8/255 on CIFAR",
        "proto_dim": f"{DEFAULT_PROTO_DIM[False]}, {DEFAULT_PROTO_DIM[True]} for cifar100; a --prototypes file's own",
        "proto_method": "box for linf, default (the sphere) for cosine and l2",
        "model": "cnn for 28x28 data, resnet18 for CIFAR, linf-dist for certified",
        "augment": "on for CIFAR",
        "attack_alpha": "2.5 eps / steps; 1.25 eps for fast-at",
        "device": "cuda when available, else cpu",
        "limit_train": "all",
        "limit_test": "all",
        "checkpoint_every": "every epoch only",
    }
    if name in rules:
        return rules[name]
    value = getattr(TrainConfig(), name)
    return "none" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def _preset(**options) -> dict:
    """A preset: TrainConfig fields only (checked here, so a typo fails at import)."""
    unknown = sorted(set(options) - {f.name for f in fields(TrainConfig)})
    if unknown:
        raise ConfigError(f"a preset names unknown options: {', '.join(unknown)}")
    return options


# Named bundles of options. Options given explicitly (CLI flags, keyword
# arguments) override the preset's values.
PRESETS = {
    # Section "Training" of the paper: ResNet-18, 100-d L-inf prototypes, 200 epochs,
    # batch 128, SGD momentum 0.9, weight decay 5e-5, multistep lr from 0.1, mixed precision.
    "paper-cifar10": _preset(
        dataset="cifar10", method="drp", metric="linf", proto_dim=100, proto_method="paper",
        model="resnet18", epochs=200, batch_size=128, lr=0.1, schedule="multistep",
        momentum=0.9, weight_decay=5e-5, augment=True, amp="bf16",
    ),
    # The same with 100 classes and 500-d prototypes.
    "paper-cifar100": _preset(
        dataset="cifar100", method="drp", metric="linf", proto_dim=500, proto_method="paper",
        model="resnet18", epochs=200, batch_size=128, lr=0.1, schedule="multistep",
        momentum=0.9, weight_decay=5e-5, augment=True, amp="bf16",
    ),
    # Fashion-MNIST with every TrainConfig default (small CNN, a few CPU minutes).
    "fmnist": _preset(dataset="fashion-mnist"),
    # The committed certified headline (results/fashion-mnist/certified): linf-dist 5 x 1024 with
    # identity init in every layer, p held at 8 for 12.5% of the steps, the CE weight decaying
    # 0.05 -> 0.0002 along the p schedule (l-inf-dist v2), eps 0.1 (eps_train 0.225).
    "certified-fmnist": _preset(
        dataset="fashion-mnist", method="certified", model="linf-dist", depth=5, width=1024,
        width_first=1024, eps=0.1, epochs=90, p_hold=0.125, cert_ce_weight=0.05,
        cert_ce_final=0.0002,
    ),
}



def apply_preset(name: Optional[str], overrides: dict, *, base: Optional[dict] = None) -> TrainConfig:
    """A TrainConfig from ``base`` (or the defaults), then preset ``name``, then ``overrides``."""
    values = dict(base or {})
    if name is not None:
        if name not in PRESETS:
            raise ConfigError(f"--preset must be one of {', '.join(PRESETS)}, got {name!r}")
        values.update(PRESETS[name])
        values["preset"] = name
    values.update(overrides)
    return TrainConfig.from_dict(values)


def run_label(method: str, metric=None) -> str:
    """The name of a run in log lines, tables and plots: its method (ce, pgd-at, ...), or
    drp-<metric> for DRP (``drp compare`` names its DRP runs the same way)."""
    return f"drp-{metric}" if method == "drp" and metric else method


def _choice(flag, value, allowed):
    if value not in allowed:
        shown = ", ".join("none" if a is None else a for a in allowed)
        raise ConfigError(f"{flag} must be one of {shown}, got {value!r}")


def _int_at_least(flag, value, low):
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{flag} must be an integer >= {low}, got {value!r}")
    if value < low:
        raise ConfigError(f"{flag} must be >= {low}, got {value}")


def _float_range(flag, value, *, low=None, high=None, low_open=False, high_open=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{flag} must be a finite number, got {value!r}")
    if low is not None and (value < low or (low_open and value == low)):
        raise ConfigError(f"{flag} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and (value > high or (high_open and value == high)):
        raise ConfigError(f"{flag} must be {'<' if high_open else '<='} {high}, got {value}")
