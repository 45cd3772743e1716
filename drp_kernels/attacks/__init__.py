"""Attack engine and AutoAttack-grade robustness evaluation (issue 5).

Every attack takes a model returning logits for inputs in [0, 1] (a DRP model is a
``ProtoClassifier``) and returns detached adversarial inputs of x's shape and dtype.
The model runs in eval mode during an attack; its modes are restored afterwards.
"""
from ._common import RobustnessWarning, dlr_loss, dlr_targeted_loss
from .apgd import apgd
from .evaluate import accuracy_vs_eps, evaluate, transfer
from .fgsm_pgd import fgsm, pgd
from .hsj import hop_skip_jump
from .square import square

__all__ = [
    "fgsm",
    "pgd",
    "apgd",
    "square",
    "hop_skip_jump",
    "transfer",
    "evaluate",
    "accuracy_vs_eps",
    "dlr_loss",
    "dlr_targeted_loss",
    "RobustnessWarning",
]
