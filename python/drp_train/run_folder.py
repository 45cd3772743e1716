"""Run folders: what ``drp train`` writes into ``--out`` and what ``drp compare`` reads back.

A run folder holds ``config.json`` (the resolved configuration), ``metrics.jsonl`` (one JSON line
per epoch) and the checkpoints ``last.pt`` and ``final.pt``. Every file is written atomically
(``drp_kernels.atomic_write``). ``config.json`` and the checkpoints' config leave ``out`` out: a run
folder is found by where it lies, so a copied or committed run carries no path of the machine
that made it.

Before any training time is spent, ``RunFolder.probe`` creates the folder, refuses one that already
holds a run (unless resuming) and writes a few MiB to prove it writable; ``check_space`` refuses a
disk too full for the checkpoints.
"""
import json
import os
import shutil

import torch

from drp_kernels import atomic_write

from ._cli_utils import cli_error, one_line
from .errors import OutputDirError

__all__ = ["RunFolder", "CHECKPOINT_NAMES", "UNSTORED_KEYS", "portable_config", "prepare_output_folder",
           "refuse_existing_runs"]

#: The checkpoints of a run, the one a finished run is read from first.
CHECKPOINT_NAMES = ("final.pt", "last.pt")
#: Keys of a TrainConfig that are not stored with a run (where it lies is not part of it).
UNSTORED_KEYS = ("out",)
_PROBE_BYTES = 4 << 20


def portable_config(cfg) -> dict:
    """``cfg.to_dict()`` without ``out``: the configuration as a run folder and its checkpoints store it."""
    return {k: v for k, v in cfg.to_dict().items() if k not in UNSTORED_KEYS}


class RunFolder:
    """The files of one run folder (``out``, made absolute)."""

    def __init__(self, out):
        self.out = os.path.abspath(os.fspath(out))
        self.last = os.path.join(self.out, "last.pt")
        self.final = os.path.join(self.out, "final.pt")
        self.metrics = os.path.join(self.out, "metrics.jsonl")
        self.config = os.path.join(self.out, "config.json")

    def checkpoint(self):
        """The newest checkpoint of the run (``final.pt``, else ``last.pt``), or None."""
        return next((p for p in (self.final, self.last) if os.path.isfile(p)), None)

    def probe(self, *, resume: bool) -> None:
        """Create the folder and prove it writable; refuse a folder that holds a run unless ``resume``."""
        try:
            os.makedirs(self.out, exist_ok=True)
        except OSError as e:
            raise OutputDirError(f"--out {self.out} cannot be created: {e.strerror or e}") from None
        if not os.path.isdir(self.out):
            raise OutputDirError(f"--out {self.out} is not a folder")
        existing = [p for p in (self.final, self.last) if os.path.exists(p)]
        if existing and not resume:
            raise OutputDirError(f"--out {self.out} already holds a run ({os.path.basename(existing[0])}); "
                                 "pass --resume to continue it or choose another --out")
        probe = os.path.join(self.out, f".drp-probe-{os.getpid()}")
        try:
            with open(probe, "wb") as f:
                chunk = b"\0" * (1 << 20)
                for _ in range(_PROBE_BYTES // len(chunk)):
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise OutputDirError(f"--out {self.out} is not writable: {e.strerror or e}") from None
        finally:
            try:
                os.unlink(probe)
            except OSError:
                pass

    def check_space(self, net: torch.nn.Module) -> None:
        """Refuse a disk without room for the checkpoints of ``net`` (model and momentum, in last.pt and
        final.pt, plus a temporary file while writing)."""
        param_bytes = sum(p.numel() * p.element_size() for p in net.state_dict().values()
                          if isinstance(p, torch.Tensor))
        needed = 3 * 2 * param_bytes + (64 << 20)
        free = shutil.disk_usage(self.out).free
        if free < needed:
            raise OutputDirError(f"--out {self.out} has {free / 2**20:.1f} MiB free but the checkpoints need "
                                 f"about {needed / 2**20:.1f} MiB: free some space or choose another --out")

    def write_config(self, cfg) -> None:
        text = json.dumps(portable_config(cfg), indent=2, sort_keys=True) + "\n"
        atomic_write(self.config, lambda f: f.write(text.encode()))

    def rewrite_metrics(self, rows) -> None:
        text = "".join(json.dumps(m) + "\n" for m in rows)
        atomic_write(self.metrics, lambda f: f.write(text.encode()))

    def append_metrics(self, row: dict) -> None:
        with open(self.metrics, "a") as f:
            f.write(json.dumps(row) + "\n")

    def read_metrics(self) -> list:
        """The rows of ``metrics.jsonl`` ([] when there is none). A last line that a killed run
        left unfinished is skipped (the checkpoint, written after it, is what a resume trusts)."""
        rows = []
        if os.path.isfile(self.metrics):
            with open(self.metrics) as f:
                lines = [line for line in f if line.strip()]
            for i, line in enumerate(lines):
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    if i != len(lines) - 1:
                        raise ValueError(f"{self.metrics}: line {i + 1} is not JSON") from None
        return rows


def prepare_output_folder(out) -> None:
    """``drp compare``'s ``--out``: created if missing, refused (CLIError) if it is a file or unwritable."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise cli_error(f"--out: {out!r} exists and is not a folder")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as exc:
        raise cli_error(f"--out: cannot create {out!r}: {one_line(exc)}") from None
    if not os.access(out, os.W_OK):
        raise cli_error(f"--out: folder {out!r} is not writable")


def refuse_existing_runs(run_dirs) -> None:
    """Refuse, before any training, run folders that already hold a run (CLIError naming the first)."""
    for run_dir in run_dirs:
        for name in CHECKPOINT_NAMES:
            if os.path.exists(os.path.join(run_dir, name)):
                raise cli_error(f"--out: {run_dir} already holds a run ({name}); pass --resume to reuse or "
                                "continue it, or choose another --out")
