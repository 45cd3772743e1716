"""Networks: a small CNN for 28x28 inputs, ResNet-18, PreAct-ResNet-18 and WRN-34-10 for CIFAR.

Every network takes inputs in [0, 1] and normalises them itself (a ``Normalize`` module
with the dataset's mean/std buffers), so attacks work in input space. The last layer's
width is the number of classes (CE and the adversarial baselines) or the prototype
dimension (DRP).
"""
import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import drp_kernels

from .data import DATASET_INFO

__all__ = [
    "Normalize",
    "SmallCNN",
    "ResNet18",
    "PreActResNet18",
    "WideResNet",
    "build_model",
    "build_network",
    "build_linf_dist",
    "MODEL_NAMES",
]

MODEL_NAMES = ("cnn", "resnet18", "preact-resnet18", "wrn-34-10", "linf-dist")


class Normalize(nn.Module):
    """(x - mean) / std per channel, with mean and std as buffers."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        mean = torch.as_tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1)
        std = torch.as_tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1)
        if (std <= 0).any():
            raise ValueError(f"std must be > 0, got {std.flatten().tolist()}")
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x):
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def extra_repr(self):
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


class SmallCNN(nn.Module):
    """Conv(32, 4x4, stride 2) - Conv(64, 4x4, stride 2) - FC(128) - FC(out).

    The conv16/conv32/FC100 network of the paper's Fashion-MNIST reference (Wong & Kolter's
    small model) at twice the width, so that plain CE passes 90% in a few epochs while PGD
    adversarial training still fits a 2-core CPU (about 2.1 M multiply-adds per 28x28 image).
    """

    def __init__(self, *, in_channels: int, out_features: int, input_size: int = 28, width: int = 32,
                 hidden: int = 128):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 4, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, 4, stride=2, padding=1), nn.ReLU(inplace=True),
        )
        side = input_size // 4
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * width * side * side, hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, out_features),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


# ----------------------------------------------------------------------------- ResNet-18 (CIFAR variant)
class _BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class _PreActBlock(nn.Module):
    """Pre-activation residual block (BN-ReLU-conv twice), of PreAct-ResNet-18 and WideResNet.

    The shortcut is the identity, or a 1x1 convolution of the pre-activated input where the
    width or the stride changes."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        short = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + short


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 inputs: 3x3 stem without max-pool, four stages of two blocks."""

    def __init__(self, *, in_channels: int, out_features: int, preact: bool = False):
        super().__init__()
        self.preact = preact
        block = _PreActBlock if preact else _BasicBlock
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = None if preact else nn.BatchNorm2d(64)
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers.append(nn.Sequential(block(cin, cout, stride), block(cout, cout, 1)))
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.bn_final = nn.BatchNorm2d(512) if preact else None
        self.linear = nn.Linear(512, out_features)

    def forward(self, x):
        out = self.conv1(x)
        if self.bn1 is not None:
            out = F.relu(self.bn1(out))
        out = self.layers(out)
        if self.bn_final is not None:
            out = F.relu(self.bn_final(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def PreActResNet18(*, in_channels: int, out_features: int) -> ResNet18:
    return ResNet18(in_channels=in_channels, out_features=out_features, preact=True)


# ----------------------------------------------------------------------------- WideResNet
class WideResNet(nn.Module):
    """WRN-depth-widen (pre-activation blocks), WRN-34-10 by default."""

    def __init__(self, *, in_channels: int, out_features: int, depth: int = 34, widen: int = 10):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"depth must be 6n + 4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        stages, cin = [], widths[0]
        for cout, stride in zip(widths[1:], (1, 2, 2)):
            stages.append(nn.Sequential(*[_PreActBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1)
                                          for i in range(n)]))
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(cin)
        self.linear = nn.Linear(cin, out_features)

    def forward(self, x):
        out = F.relu(self.bn(self.stages(self.conv1(x))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


# ----------------------------------------------------------------------------- factory
def build_model(name: str, *, in_channels: int, num_classes_or_dim: int, input_size: int,
                mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None) -> nn.Module:
    """Network ``name`` for inputs (in_channels, input_size, input_size) in [0, 1].

    The output width is ``num_classes_or_dim``. ``mean``/``std`` (per channel) set the
    normalisation inside the model; without them inputs are centred with 0.5 / 0.5.
    Returns ``nn.Sequential(Normalize, body)``.
    """
    if name == "linf-dist":
        raise ValueError("model linf-dist has its own builder: build_linf_dist (or build_network)")
    if name not in MODEL_NAMES:
        raise ValueError(f"model must be one of {', '.join(MODEL_NAMES)}, got {name!r}")
    for arg, v in (("in_channels", in_channels), ("num_classes_or_dim", num_classes_or_dim),
                   ("input_size", input_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{arg} must be a positive integer, got {v!r}")
    if name == "cnn":
        if input_size % 4:
            raise ValueError(f"the cnn model needs input_size divisible by 4, got {input_size}")
        body = SmallCNN(in_channels=in_channels, out_features=num_classes_or_dim, input_size=input_size)
    elif name == "resnet18":
        body = ResNet18(in_channels=in_channels, out_features=num_classes_or_dim)
    elif name == "preact-resnet18":
        body = PreActResNet18(in_channels=in_channels, out_features=num_classes_or_dim)
    else:
        body = WideResNet(in_channels=in_channels, out_features=num_classes_or_dim, depth=34, widen=10)
    mean = (0.5,) * in_channels if mean is None else tuple(mean)
    std = (0.5,) * in_channels if std is None else tuple(std)
    if len(mean) != in_channels or len(std) != in_channels:
        raise ValueError(f"mean and std need {in_channels} values, got {len(mean)} and {len(std)}")
    return nn.Sequential(Normalize(mean, std), body)


def build_linf_dist(*, in_shape: Sequence[int], num_classes: int, depth: int, width: int, head: str,
                    mean: Sequence[float], std: Sequence[float], p: float = 8.0,
                    first_width: Optional[int] = None) -> nn.Module:
    """A ``drp_kernels.LinfDistNet`` for inputs of ``in_shape`` (C, H, W) in [0, 1], standardised
    per channel inside the model (so its Lipschitz constant is ``1 / min(std)`` at p = inf).
    The prototypes start at zero: the trainer sets them (``repulsive_prototypes``)."""
    c = int(in_shape[0])
    per_channel = int(math.prod(in_shape[1:]))
    mean_t = torch.as_tensor(tuple(mean), dtype=torch.float32).repeat_interleave(per_channel)
    std_t = torch.as_tensor(tuple(std), dtype=torch.float32).repeat_interleave(per_channel)
    if mean_t.numel() != c * per_channel or std_t.numel() != c * per_channel:
        raise ValueError(f"mean and std need {c} values, got {len(mean)} and {len(std)}")
    return drp_kernels.LinfDistNet(c * per_channel, num_classes, depth=depth, width=width, head=head,
                                   mean=mean_t, std=std_t, p=p, first_width=first_width)


def build_network(cfg, *, output_dim: int) -> nn.Module:
    """The bare network of a resolved ``TrainConfig`` (normalisation included), with
    ``output_dim`` outputs: the number of classes, or the prototype dimension for DRP.
    For ``linf-dist`` the network is the whole classifier (``output_dim`` classes)."""
    info = DATASET_INFO[cfg.dataset]
    c, h, _ = info["shape"]
    if cfg.model == "linf-dist":
        return build_linf_dist(in_shape=info["shape"], num_classes=info["classes"], depth=cfg.depth,
                               width=cfg.width, head=cfg.head, mean=info["mean"], std=info["std"],
                               first_width=getattr(cfg, "width_first", None))
    return build_model(cfg.model, in_channels=c, num_classes_or_dim=output_dim, input_size=h,
                       mean=info["mean"], std=info["std"])
