"""Training objectives: DRP, CE, PGD-AT (Madry et al.), TRADES, Fast-AT (Wong et al. 2020) and
certified training of l-inf-distance prototype networks.

A method turns (network, batch) into a scalar loss and the logits used for the
running training accuracy, and wraps the trained network into the classifier that is
evaluated (``ProtoClassifier`` for DRP, the network itself otherwise).

Adversarial examples during training are built with ``drp_kernels.random_init`` and
``drp_kernels.pgd_step_`` on inputs in [0, 1]. The network is put in eval mode while the
attack runs (``drp_kernels.attacks.eval_mode``) and back in its own modes for the update
(as in the TRADES reference code and torchattacks): BatchNorm then neither uses nor updates batch statistics of the
intermediate attack iterates, and only the final adversarial batch trains the model.
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

import drp_kernels
from drp_kernels.attacks import eval_mode, margin as logit_margin

__all__ = ["Method", "make_method", "Certified", "p_schedule", "ce_schedule"]


class Method:
    """A training objective. Subclasses implement ``loss``."""

    name = "base"
    adversarial = False

    def __init__(self, *, eps: float = 0.0, steps: int = 1, alpha: float = 0.0):
        self.eps, self.steps, self.alpha = float(eps), int(steps), float(alpha)

    def output_dim(self, num_classes: int) -> int:
        return num_classes

    def before_step(self, net: nn.Module, step: int, total: int) -> None:
        """Called before optimiser step ``step`` (0-based, of ``total``), e.g. to anneal p."""

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


# the p schedule of certified training (the l-inf-distance nets' recipe)
P_START, P_END = 8.0, 1000.0
P_HOLD_FRACTION = 0.05   # p = P_START for the first 5% of the steps
P_INF_FRACTION = 0.10    # p = inf for the last 10%


def p_schedule(step: int, total: int, *, hold: float = P_HOLD_FRACTION, inf: float = P_INF_FRACTION) -> float:
    """The p of certified training at optimiser step ``step`` of ``total``: P_START for the first
    ``hold`` fraction of the steps, then rising geometrically to P_END, then inf for the last ``inf``
    fraction (at least the last step). Rounded to integers, which the CPU kernels compute by
    repeated squaring."""
    total = max(int(total), 1)
    hold = int(round(hold * total))
    inf_from = total - max(1, int(round(inf * total)))
    if step >= inf_from:
        return math.inf
    if step < hold or inf_from <= hold:
        return P_START
    frac = (step - hold) / max(1, inf_from - 1 - hold)
    return float(round(P_START * (P_END / P_START) ** min(1.0, frac)))


def ce_schedule(p: float, start: float, final: float) -> float:
    """The CE weight of certified training at p: ``start`` at P_START, ``final`` from P_END on (p = inf
    included), exponential in between along the geometric p schedule (the l-inf-dist v2 recipe)."""
    if start == final or start == 0.0:
        return start
    frac = 1.0 if p == math.inf else min(1.0, max(0.0, math.log(p / P_START) / math.log(P_END / P_START)))
    return start * (final / start) ** frac


class Certified(Method):
    """Certified training of a ``drp_kernels.LinfDistNet`` (Zhang et al. 2021, 2022 recipe).

    The loss is a clipped hinge on the logit margin ``m = (d_c + b_c) - (d_y + b_y)`` (smallest
    over c != y) at the radius ``eps_train``: ``clamp(theta - m, 0, theta)`` with
    ``theta = 2 L eps_train`` and L the network's Lipschitz constant at p = inf, so a point whose
    hinge is zero is certified at eps_train once p = inf. Points with a negative margin get no
    hinge gradient (the clip); the cross-entropy term on ``ce_scale * logits``, weighted by
    ``ce_weight``, pulls them in. p follows ``p_schedule`` (set before every step); with
    ``input_subset < 1`` the hidden layers see random input subsets while p < inf (``LpDist``).
    """

    name = "certified"

    def __init__(self, *, eps: float, eps_train: float, ce_weight: float, ce_final: Optional[float] = None,
                 p_hold: float = P_HOLD_FRACTION, p_inf: float = P_INF_FRACTION, input_subset: float = 1.0):
        super().__init__(eps=eps)
        self.input_subset = float(input_subset)
        self.eps_train = float(eps_train)
        self.ce_start = float(ce_weight)
        self.ce_final = self.ce_start if ce_final is None else float(ce_final)
        self.ce_weight = self.ce_start
        self.p_hold, self.p_inf = float(p_hold), float(p_inf)

    def before_step(self, net, step, total):
        p = p_schedule(step, total, hold=self.p_hold, inf=self.p_inf)
        net.set_p(p)
        if self.input_subset < 1.0:  # subsets while p < inf; the p = inf phase trains on every input
            net.set_input_subset(self.input_subset if math.isfinite(p) else 1.0)
        self.ce_weight = ce_schedule(p, self.ce_start, self.ce_final)

    def loss(self, model, attack_model, x, y, *, generator, autocast):
        with autocast():
            logits = model(x).float()
        theta = 2.0 * attack_model.lipschitz(p=math.inf) * self.eps_train
        margin = logit_margin(logits, y)
        hinge = (theta - margin).clamp(0.0, theta).mean() if theta > 0 else (-margin).clamp_min(0.0).mean()
        if self.ce_weight:
            loss = hinge + self.ce_weight * F.cross_entropy(attack_model.ce_scale * logits, y)
        else:  # a zero gradient for the unused temperature, as DDP expects one for every parameter
            loss = hinge + 0.0 * attack_model.ce_scale
        return loss, logits


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
    if cfg.method == "certified":
        return Certified(eps=cfg.eps, eps_train=cfg.eps_train, ce_weight=cfg.cert_ce_weight,
                         ce_final=cfg.cert_ce_final, p_hold=cfg.p_hold, p_inf=cfg.p_inf,
                         input_subset=cfg.input_subset)
    raise ValueError(f"method must be one of drp, ce, pgd-at, trades, fast-at, certified, got {cfg.method!r}")
