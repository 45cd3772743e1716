"""Training objectives: DRP, CE, PGD-AT (Madry et al.), TRADES and Fast-AT (Wong et al. 2020).

A method turns (network, batch) into a scalar loss and the logits used for the
running training accuracy, and wraps the trained network into the classifier that is
evaluated (``ProtoClassifier`` for DRP, the network itself otherwise).

Adversarial examples during training are built with ``drp_kernels.random_init`` and
``drp_kernels.pgd_step_`` on inputs in [0, 1]. The network is put in eval mode while the
attack runs (``drp_kernels.attacks.eval_mode``) and back in its own modes for the update
(as in the TRADES reference code and torchattacks): BatchNorm then neither uses nor updates batch statistics of the
intermediate attack iterates, and only the final adversarial batch trains the model.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

import drp_kernels
from drp_kernels.attacks import eval_mode

__all__ = ["Method", "make_method"]


class Method:
    """A training objective. Subclasses implement ``loss``."""

    name = "base"
    adversarial = False

    def __init__(self, *, eps: float = 0.0, steps: int = 1, alpha: float = 0.0):
        self.eps, self.steps, self.alpha = float(eps), int(steps), float(alpha)

    def output_dim(self, num_classes: int) -> int:
        return num_classes

    def logits(self, out: torch.Tensor) -> torch.Tensor:
        """Class scores from network outputs."""
        return out

    def classifier(self, net: nn.Module) -> nn.Module:
        """The module evaluated and attacked: inputs in [0, 1] -> logits."""
        return net

    def loss(self, model: nn.Module, attack_model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
             generator: torch.Generator, autocast) -> tuple:
        """Return (loss, logits of the batch that trained the model).

        ``model`` runs the training forward (it may be DDP-wrapped), ``attack_model`` is the
        bare network used to craft adversarial examples; ``autocast`` is a context factory.
        """
        raise NotImplementedError

    # -- shared PGD on the CE loss of the classifier's logits
    def _pgd(self, attack_model, x, y, *, generator, autocast, steps, alpha, random_start=True):
        with eval_mode(attack_model):
            x_adv = drp_kernels.random_init(x, self.eps, generator=generator) if random_start else x.clone()
            for _ in range(steps):
                x_adv.requires_grad_(True)
                with autocast():
                    loss = F.cross_entropy(self.logits(attack_model(x_adv)).float(), y)
                (grad,) = torch.autograd.grad(loss, x_adv)
                x_adv = x_adv.detach()
                drp_kernels.pgd_step_(x_adv, x, grad, self.eps, alpha)
        return x_adv.detach()


class CE(Method):
    name = "ce"

    def loss(self, model, attack_model, x, y, *, generator, autocast):
        with autocast():
            logits = model(x).float()
            return F.cross_entropy(logits, y), logits


class DRP(Method):
    """Deep Repulsive Prototypes: the network's output is pulled to its class prototype."""

    name = "drp"

    def __init__(self, prototypes: torch.Tensor, *, metric: str, ce_weight: float = 0.0):
        super().__init__()
        self.prototypes = prototypes.detach().float()
        self.metric = metric
        self.criterion = drp_kernels.ProtoLoss(self.prototypes, metric=metric, ce_weight=ce_weight)

    def to(self, device):
        self.prototypes = self.prototypes.to(device)
        self.criterion = self.criterion.to(device)
        return self

    def output_dim(self, num_classes):
        return int(self.prototypes.shape[1])

    def logits(self, out):
        return self.criterion.logits(out.float())

    def classifier(self, net):
        return drp_kernels.ProtoClassifier(net, self.prototypes, metric=self.metric)

    def loss(self, model, attack_model, x, y, *, generator, autocast):
        with autocast():
            z = model(x)
        z = z.float()
        return self.criterion(z, y), self.criterion.logits(z.detach())


class PGDAT(Method):
    """Madry et al.: train on L-inf PGD (random start, ``steps`` steps of ``alpha``) on the CE loss."""

    name = "pgd-at"
    adversarial = True

    def loss(self, model, attack_model, x, y, *, generator, autocast):
        x_adv = self._pgd(attack_model, x, y, generator=generator, autocast=autocast,
                          steps=self.steps, alpha=self.alpha)
        with autocast():
            logits = model(x_adv).float()
            return F.cross_entropy(logits, y), logits


class FastAT(PGDAT):
    """Wong et al. 2020: PGD-AT with one step of 1.25 eps (by default) from a uniform random start."""

    name = "fast-at"

    def __init__(self, *, eps: float, alpha: float):
        super().__init__(eps=eps, steps=1, alpha=alpha)


class TRADES(Method):
    """Zhang et al. 2019: CE(f(x), y) + beta * KL(f(x) || f(x_adv)), x_adv maximising the KL term."""

    name = "trades"
    adversarial = True

    def __init__(self, *, eps, steps, alpha, beta):
        super().__init__(eps=eps, steps=steps, alpha=alpha)
        self.beta = float(beta)

    def loss(self, model, attack_model, x, y, *, generator, autocast):
        with eval_mode(attack_model):
            with torch.no_grad(), autocast():
                p_clean = F.softmax(attack_model(x).float(), dim=1)
            # the reference implementation starts from x + 0.001 * N(0, 1)
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
            x_adv = (x + 0.001 * noise.to(x.dtype)).clamp(0.0, 1.0)
            for _ in range(self.steps):
                x_adv.requires_grad_(True)
                with autocast():
                    log_p_adv = F.log_softmax(attack_model(x_adv).float(), dim=1)
                kl = F.kl_div(log_p_adv, p_clean, reduction="sum")
                (grad,) = torch.autograd.grad(kl, x_adv)
                x_adv = x_adv.detach()
                drp_kernels.pgd_step_(x_adv, x, grad, self.eps, self.alpha)
        x_adv = x_adv.detach()
        with autocast():
            logits = model(x).float()
            logits_adv = model(x_adv).float()
        natural = F.cross_entropy(logits, y)
        robust = F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits, dim=1), reduction="batchmean")
        return natural + self.beta * robust, logits_adv


def make_method(cfg, *, prototypes: Optional[torch.Tensor] = None) -> Method:
    """The Method of a resolved TrainConfig (``prototypes`` is required for drp)."""
    if cfg.method == "drp":
        if prototypes is None:
            raise ValueError("method drp needs prototypes")
        return DRP(prototypes, metric=cfg.metric, ce_weight=cfg.drp_ce_weight)
    if cfg.method == "ce":
        return CE()
    if cfg.method == "pgd-at":
        return PGDAT(eps=cfg.eps, steps=cfg.attack_steps, alpha=cfg.attack_alpha)
    if cfg.method == "fast-at":
        return FastAT(eps=cfg.eps, alpha=cfg.attack_alpha)
    if cfg.method == "trades":
        return TRADES(eps=cfg.eps, steps=cfg.attack_steps, alpha=cfg.attack_alpha, beta=cfg.trades_beta)
    raise ValueError(f"method must be one of drp, ce, pgd-at, trades, fast-at, got {cfg.method!r}")
