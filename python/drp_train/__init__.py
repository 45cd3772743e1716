"""drp_train: the thin training layer over drp_kernels' public API.

Python API: ``TrainConfig`` and ``drp_train.train.train`` (training), ``load_classifier`` and
``load_checkpoint`` (checkpoints), ``load_dataset`` (data), ``build_model`` (networks).
The ``drp`` command line lives in ``drp_train.cli``.
"""
from .checkpoint import load_checkpoint, load_classifier
from .config import PRESETS, TrainConfig
from .data import load_dataset, num_classes
from . import errors as _errors
from .errors import *  # noqa: F403  (every error class; the list is errors.__all__)
from .models import build_model
from . import train as _train_module  # noqa: F401  (drp_train.train stays the module)

__all__ = [
    "TrainConfig",
    "PRESETS",
    "load_classifier",
    "load_checkpoint",
    "load_dataset",
    "num_classes",
    "build_model",
]
__all__ += _errors.__all__
