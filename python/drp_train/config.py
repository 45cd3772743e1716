"""Training configuration: one dataclass of plain data, its defaults and presets.

Options left as ``None`` are filled by :meth:`TrainConfig.resolved` from the dataset
and the method (see ``_resolve``), so a stored config always holds concrete values.
"""
import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Optional

from .errors import ConfigError

__all__ = [
    "TrainConfig",
    "DATASETS",
    "METHODS",
    "METRICS",
    "MODELS",
    "SCHEDULES",
    "AMP_MODES",
    "PRESETS",
    "apply_preset",
]

DATASETS = ("fashion-mnist", "mnist", "cifar10", "cifar100")
METHODS = ("drp", "ce", "pgd-at", "trades", "fast-at")
METRICS = ("linf", "cosine", "l2")
MODELS = ("cnn", "resnet18", "preact-resnet18", "wrn-34-10")
SCHEDULES = ("cosine", "cyclic", "multistep")
AMP_MODES = (None, "bf16", "fp16")
PROTO_METHODS = ("paper", "default")

# Named bundles of options. Options given explicitly (CLI flags, keyword
# arguments) override the preset's values.
PRESETS = {
    # Section "Training" of the paper: ResNet-18, 100-d L-inf prototypes, 200 epochs,
    # batch 128, SGD momentum 0.9, weight decay 5e-5, multistep lr from 0.1, mixed precision.
    "paper-cifar10": dict(
        dataset="cifar10", method="drp", metric="linf", proto_dim=100, proto_method="paper",
        model="resnet18", epochs=200, batch_size=128, lr=0.1, schedule="multistep",
        momentum=0.9, weight_decay=5e-5, augment=True, amp="bf16",
    ),
    # The same with 100 classes and 500-d prototypes.
    "paper-cifar100": dict(
        dataset="cifar100", method="drp", metric="linf", proto_dim=500, proto_method="paper",
        model="resnet18", epochs=200, batch_size=128, lr=0.1, schedule="multistep",
        momentum=0.9, weight_decay=5e-5, augment=True, amp="bf16",
    ),
    # The Fashion-MNIST runs measured for issue 6 (small CNN, a few CPU minutes each).
    "fmnist": dict(dataset="fashion-mnist", model="cnn", epochs=10, batch_size=128, schedule="cosine"),
}


@dataclass
class TrainConfig:
    """Every option of a training run. Plain data only (str, int, float, bool, None)."""

    dataset: str = "fashion-mnist"
    data_dir: Optional[str] = None
    method: str = "drp"
    metric: str = "linf"
    proto_dim: Optional[int] = None        # default: 100 for <= 10 classes, 500 otherwise (paper presets)
    prototypes: Optional[str] = None       # a .pt/.npy file from `drp prototypes`; overrides proto_dim
    proto_method: Optional[str] = None     # "paper" for linf, "default" for the other metrics
    drp_ce_weight: float = 0.0             # optional cross-entropy term of ProtoLoss
    model: Optional[str] = None            # default: "cnn" for 28x28 data, "resnet18" for CIFAR
    epochs: int = 10
    batch_size: int = 128                  # global batch (split over DDP ranks)
    lr: Optional[float] = None             # default: see _DEFAULT_LR
    schedule: str = "cosine"
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
            c.model = "resnet18" if cifar else "cnn"
        if c.proto_method is None:
            c.proto_method = "paper" if c.metric == "linf" else "default"
        if c.proto_dim is None and c.prototypes is None:
            c.proto_dim = 500 if c.dataset == "cifar100" else 100
        if c.eps is None:
            c.eps = 8 / 255 if cifar else 0.1
        if c.attack_alpha is None:
            c.attack_alpha = 1.25 * c.eps if c.method == "fast-at" else 2.5 * c.eps / c.attack_steps
        if c.augment is None:
            c.augment = cifar
        if c.weight_decay is None:
            c.weight_decay = 5e-5 if c.method == "drp" else 5e-4
        if c.lr is None:
            c.lr = _DEFAULT_LR[(cifar, c.method == "drp")]
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
        _choice("--amp", self.amp, AMP_MODES)
        _int_at_least("--epochs", self.epochs, 1)
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
        if self.method in ("pgd-at", "trades", "fast-at") and self.eps is not None and self.eps <= 0:
            raise ConfigError(f"--eps must be > 0 for --method {self.method}, got {self.eps}")
        if self.prototypes is not None and self.method != "drp":
            raise ConfigError(f"--prototypes is only used by --method drp, not {self.method}")
        if not isinstance(self.out, str) or not self.out:
            raise ConfigError("--out must name a folder")
        for name in ("compile", "channels_last", "resume", "quiet"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be a bool, got {getattr(self, name)!r}")


# (cifar?, drp?) -> learning rate. On Fashion-MNIST, DRP with the paper's far-apart L-inf
# prototypes diverges or stalls at CE's 0.05 and trains best around 0.01 (measured).
_DEFAULT_LR = {(False, False): 0.05, (False, True): 0.01, (True, False): 0.1, (True, True): 0.1}


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
