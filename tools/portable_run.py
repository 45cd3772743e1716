"""Make run folders portable before committing them: drop ``out`` (where the run was written) from
``config.json`` and from the config inside every checkpoint, as ``drp train`` itself now writes them.

    python tools/portable_run.py [--drop-optimizer] results/fashion-mnist/certified [more run folders]

--drop-optimizer also drops the optimiser, scheduler and scaler state from the checkpoints (a
committed model is evaluated, not resumed; the issue's size limit is 25 MB).

Files are rewritten atomically and only when they change; everything else in them stays as it was.
tests/test_repository.py fails on any absolute path left under results/.
"""
import json
import os
import sys

from drp_kernels import atomic_write
from drp_train.checkpoint import load_checkpoint, save_checkpoint
from drp_train.run_folder import CHECKPOINT_NAMES, UNSTORED_KEYS


TRAINING_STATE = ("optimizer", "scheduler", "scaler")


def portable(folder: str, drop_optimizer: bool = False) -> list:
    """Rewrite the run folder's config.json and checkpoints without ``out`` (and, with
    ``drop_optimizer``, without the training state); return what changed."""
    changed = []
    path = os.path.join(folder, "config.json")
    if os.path.isfile(path):
        with open(path) as f:
            cfg = json.load(f)
        if any(k in cfg for k in UNSTORED_KEYS):
            cfg = {k: v for k, v in cfg.items() if k not in UNSTORED_KEYS}
            text = json.dumps(cfg, indent=2, sort_keys=True) + "\n"
            atomic_write(path, lambda f: f.write(text.encode()))
            changed.append(path)
    for name in CHECKPOINT_NAMES:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        data = load_checkpoint(path)
        drop = [k for k in TRAINING_STATE if drop_optimizer and data.get(k) is not None]
        if drop or any(k in data["config"] for k in UNSTORED_KEYS):
            data["config"] = {k: v for k, v in data["config"].items() if k not in UNSTORED_KEYS}
            data.update({k: None for k in drop})
            save_checkpoint(path, {k: v for k, v in data.items() if k not in ("kind", "format")})
            changed.append(path)
    return changed


def main(argv) -> int:
    drop = "--drop-optimizer" in argv
    folders = [a for a in argv if a != "--drop-optimizer"]
    if not folders:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    for folder in folders:
        for path in portable(folder, drop_optimizer=drop):
            print(f"rewrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
