"""Checkpoints of plain data, written atomically and read with ``torch.load(weights_only=True)``.

A checkpoint is a dict holding only tensors, numbers, strings, bools, None, lists and
dicts::

    {"kind": "drp_train.checkpoint", "format": 1, "final": bool,
     "config": TrainConfig.to_dict(), "epoch": epochs completed, "step": steps done in
     the current epoch (0 at an epoch boundary), "global_step": int,
     "model": state_dict of the bare network, "optimizer": ..., "scheduler": ...,
     "scaler": GradScaler state or None, "prototypes": (C, D) tensor or None,
     "rng": {"torch": ByteTensor, "cuda": [ByteTensor] , "python": [...], "numpy": {...}},
     "metrics": [one dict per completed epoch], "epoch_sums": [loss * n, correct, n] or None,
     "train_time_s": float, "versions": {"torch": str, "drp_kernels": str}}

The config is ``run_folder.portable_config``: it leaves ``out`` out.

``training_payload`` builds that dict from a trainer's state. Writes go to a temporary file in
the same folder, are fsync'ed and then renamed over the target (``drp_kernels.atomic_write``), so
a crash at any moment leaves either the old or the new complete file.
"""
import os
import pickle
import random
import re
import warnings
from typing import Optional

import numpy as np
import torch
from torch import nn

import drp_kernels
from drp_kernels import atomic_write
from drp_kernels.io import TMP_PREFIX

from .config import TrainConfig
from .data import DATASET_INFO
from .errors import CheckpointError, ConfigError
from .models import build_network
from .run_folder import CHECKPOINT_NAMES, portable_config

__all__ = [
    "CheckpointError",
    "CHECKPOINT_KIND",
    "CHECKPOINT_FORMAT",
    "save_checkpoint",
    "training_payload",
    "load_checkpoint",
    "stored_config",
    "load_classifier",
    "resolve_checkpoint_path",
    "rng_state",
    "set_rng_state",
]

CHECKPOINT_KIND = "drp_train.checkpoint"
CHECKPOINT_FORMAT = 1


def remove_stale_temporaries(folder: str) -> list:
    """Delete temporary files left by a writer that was killed; return their names."""
    removed = []
    if not os.path.isdir(folder):
        return removed
    for name in os.listdir(folder):
        if name.startswith(TMP_PREFIX):
            try:
                os.unlink(os.path.join(folder, name))
                removed.append(name)
            except OSError:
                pass
    return removed


_PLAIN_SCALARS = (str, int, float, bool, type(None))


def check_plain(obj, where="checkpoint"):
    """Raise TypeError unless ``obj`` is tensors, numbers, strings, bools, None, lists, tuples and dicts."""
    if type(obj) in _PLAIN_SCALARS or type(obj) is torch.Tensor:
        return
    if type(obj) in (list, tuple):
        for i, v in enumerate(obj):
            check_plain(v, f"{where}[{i}]")
        return
    if type(obj) is dict:
        for k, v in obj.items():
            if type(k) not in (str, int):
                raise TypeError(f"{where} has a key of type {type(k).__name__}; only str and int keys are plain data")
            check_plain(v, f"{where}[{k!r}]")
        return
    raise TypeError(f"{where} holds a {type(obj).__module__}.{type(obj).__qualname__}, which is not plain data")


def save_checkpoint(path: str, payload: dict) -> None:
    """Save ``payload`` (plain data only, checked) atomically, adding the kind marker and format version."""
    check_plain(payload)
    data = dict(payload)
    data["kind"] = CHECKPOINT_KIND
    data["format"] = CHECKPOINT_FORMAT
    atomic_write(path, lambda f: torch.save(data, f))


def training_payload(*, cfg, net, optimizer, scheduler, scaler, prototypes, epoch: int, step: int,
                     global_step: int, metrics, epoch_sums, train_time_s: float, final: bool) -> dict:
    """The checkpoint of a trainer's state after ``step`` steps of epoch ``epoch`` (plain data)."""
    return {
        "final": final,
        "config": portable_config(cfg),
        "epoch": epoch,
        "step": step,
        "global_step": global_step,
        "model": {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in net.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),  # LambdaLR stores None for its plain-function lambdas
        "scaler": scaler.state_dict() if scaler is not None else None,
        "prototypes": prototypes.cpu() if prototypes is not None else None,
        "rng": rng_state(),
        "metrics": [dict(m) for m in metrics],
        "epoch_sums": epoch_sums.detach().cpu().tolist() if epoch_sums is not None else None,
        "train_time_s": float(train_time_s),
        "versions": {"torch": str(torch.__version__), "drp_kernels": str(drp_kernels.__version__)},
    }


def resolve_checkpoint_path(path: str) -> str:
    """``path`` itself if a file, else ``final.pt`` or ``last.pt`` inside the run folder."""
    path = os.fspath(path)
    if os.path.isdir(path):
        for name in CHECKPOINT_NAMES:
            p = os.path.join(path, name)
            if os.path.isfile(p):
                return p
        raise CheckpointError(f"no checkpoint in {path}: expected final.pt or last.pt written by `drp train`")
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    return path


def load_checkpoint(path: str) -> dict:
    """Load a checkpoint dict written by ``drp train`` (a file, or a run folder).

    Uses ``torch.load(weights_only=True)``: a file that needs anything beyond tensors and
    plain Python data is refused, as is a file of another kind.
    """
    path = resolve_checkpoint_path(path)
    try:
        with warnings.catch_warnings():
            # torch warns about the pickle protocol byte of a file that is not a checkpoint at all
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"unsupported GLOBAL [\w.]+", str(e), flags=re.IGNORECASE)
        if found:  # a well-formed file that names code to run
            raise CheckpointError(f"{path} was refused: it needs more than plain data (tensors, numbers, strings, "
                                  f"lists, dicts) to load, so it may run code ({found.group(0)})") from None
        # anything else the weights-only reader stops at is not a file torch.save wrote
        op = re.search(r"Unsupported operand \d+", str(e))
        raise CheckpointError(f"{path} is corrupt or unreadable: not a checkpoint written by torch.save "
                              f"({op.group(0) if op else type(e).__name__})") from None
    except (RuntimeError, EOFError, OSError, ValueError, IndexError, KeyError) as e:
        # the weights-only reader meets garbage with any of these (IndexError, KeyError: an
        # opcode stream that pops an empty stack or reads an unknown memo entry)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        first = first.split(". ")[0].rstrip(".")  # torch's first sentence says what failed
        if isinstance(e, EOFError):
            first = "the file ends early"
        raise CheckpointError(f"{path} is corrupt or unreadable ({first})") from None
    if not isinstance(data, dict) or data.get("kind") != CHECKPOINT_KIND:
        what = data.get("kind") if isinstance(data, dict) else type(data).__name__
        raise CheckpointError(f"{path} is not a drp_train checkpoint (kind {what!r}); "
                              "pass a run folder or a .pt file written by `drp train`")
    if data.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} has checkpoint format {data.get('format')!r}; "
                              f"this version reads format {CHECKPOINT_FORMAT}")
    for key in ("config", "model"):
        if key not in data:
            raise CheckpointError(f"{path} lacks its {key!r} entry")
    return data


def stored_config(data: dict) -> dict:
    """The config dict of a checkpoint, with what older runs left implicit written out: a
    ``linf-dist`` net trained before ``width_first`` had its own default has a first layer
    ``width`` wide."""
    cfg = dict(data["config"])
    if cfg.get("model") == "linf-dist" and cfg.get("width_first") is None:
        cfg["width_first"] = cfg.get("width", TrainConfig.width)
    return cfg


def config_of(data: dict, path: str = "checkpoint") -> TrainConfig:
    try:
        return TrainConfig.from_dict(stored_config(data))
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{path} holds an unusable config: {e}") from None


def load_classifier(path: str, *, device: Optional[str] = None) -> nn.Module:
    """An eval-mode module mapping inputs in [0, 1] to logits, from a run folder or a .pt file.

    DRP runs give a ``drp_kernels.ProtoClassifier`` (network + prototypes + metric), the
    other methods the network itself (a ``drp_kernels.LinfDistNet`` for ``certified``, which
    ``drp_kernels.certify`` accepts).
    """
    resolved = resolve_checkpoint_path(path)
    data = load_checkpoint(resolved)
    cfg = config_of(data, resolved)
    prototypes = data.get("prototypes")
    if cfg.method == "drp":
        if not isinstance(prototypes, torch.Tensor) or prototypes.ndim != 2:
            raise CheckpointError(f"{resolved} is a drp run without its (C, D) prototypes")
        out_dim = int(prototypes.shape[1])
    else:
        out_dim = DATASET_INFO[cfg.dataset]["classes"]
    net = build_network(cfg, output_dim=out_dim)
    try:
        net.load_state_dict(data["model"])
    except (RuntimeError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointError(f"{resolved}: the weights do not fit model {cfg.model} ({first})") from None
    model = drp_kernels.ProtoClassifier(net, prototypes, metric=cfg.metric) if cfg.method == "drp" else net
    if device is not None:
        model = model.to(device)
    return model.eval()


# ----------------------------------------------------------------------------- RNG state as plain data
def rng_state() -> dict:
    """Every global RNG state as plain data (tensors, ints, lists)."""
    version, state, gauss = random.getstate()
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": [int(version), [int(v) for v in state], None if gauss is None else float(gauss)],
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, values, gauss = state["python"]
    random.setstate((version, tuple(values), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
