"""Attack engine and AutoAttack-grade robustness evaluation.

Every attack takes a model returning logits for inputs in [0, 1] (a DRP model is a
``ProtoClassifier``) and returns detached adversarial inputs of x's shape and dtype.
The model runs in eval mode during an attack; its modes are restored afterwards.
"""
from .._constants import NORMS
from ._common import RobustnessWarning, dlr_loss, dlr_targeted_loss, eval_mode, margin
from .apgd import apgd
from .evaluate import accuracy_vs_eps, evaluate, sweep_report, transfer
from .fgsm_pgd import fgsm, pgd
from .hsj import hop_skip_jump
from .paper import paper_pgd
from .square import square
from .sweep import sweep
from .sweep_state import SUITES, SweepState

__all__ = [
    "fgsm",
    "pgd",
    "apgd",
    "square",
    "hop_skip_jump",
    "paper_pgd",
    "transfer",
    "evaluate",
    "accuracy_vs_eps",
    "sweep",
    "sweep_report",
    "SweepState",
    "SUITES",
    "dlr_loss",
    "dlr_targeted_loss",
    "margin",
    "NORMS",
    "RobustnessWarning",
    "eval_mode",
]
