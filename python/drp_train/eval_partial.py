"""The partial files of ``drp eval --json``: each rank's per-point results, written atomically after
every batch of every stage, read back by ``--resume`` (whatever world size wrote them), and the
command that continues an interrupted evaluation."""
import glob
import hashlib
import json
import os
import shlex

import torch

from drp_kernels import atomic_write, attacks

from ._cli_utils import cli_error as _cli_error, one_line as _one_line
from .errors import DrpTrainError

__all__ = ["EvalInterrupted", "PARTIAL_FORMAT", "partial_paths", "partial_path", "read_partials", "write_partial",
           "file_sha256", "continue_command", "args_digest"]

PARTIAL_FORMAT = "drp-eval-partial/1"


class EvalInterrupted(DrpTrainError, KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) stopped `drp eval` after its partial results were saved; the message
    names the command that continues."""

    exit_code = 130


def partial_paths(json_path):
    """The partial files of an evaluation writing `json_path`: FILE.partial (one process) and
    FILE.partial.rankR-of-W (rank R of a W-process run), those that exist."""
    base = os.fspath(json_path) + ".partial"
    found = ([base] if os.path.isfile(base) else []) + sorted(glob.glob(glob.escape(base) + ".rank*-of-*"))
    return [p for p in found if os.path.isfile(p)]


def partial_path(json_path, info):
    base = os.fspath(json_path) + ".partial"
    return base if not info.enabled else f"{base}.rank{info.rank}-of-{info.world_size}"


def tensors_sha256(*tensors):
    """One digest of the tensors' bytes (the test points a partial file was made with)."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


_META_CHECKS = (("checkpoint_sha256", "model", "evaluate the checkpoint it was made with"),
                ("dataset", "dataset", "evaluate the same dataset"),
                ("eps", "eps list", "give the same --eps"),
                ("suites", "suite", "give the same --suite"),
                ("seed", "seed", "give the same --seed"),
                ("norm", "norm", "give the same --norm"),
                ("decision", "decision rule", "give the same --decision"),
                ("n", "number of points", "give the same --limit"),
                ("data_sha256", "copy of the test points", "give the same --data-dir"),
                ("engine", "engine (drp_kernels, torch)", "resume with the versions it was made with"),
                ("device", "device type", "give the same --device"),
                ("compile", "--compile setting", "give the same --compile"))


def _short(v):
    if isinstance(v, str) and len(v) == 64:
        return v[:12] + "..."
    return repr(v)


def read_partials(paths, meta):
    """(states, prior) from the partial files at `paths`: states is {suite: merged SweepState};
    prior is {"generation", "elapsed_s", "timings": {suite: per-eps stage seconds}}, what the
    evaluation spent so far. A file that cannot be read or comes from another evaluation is refused
    (CLIError naming it and what differs).

    Each run of an evaluation is a generation (0, then one more per --resume); rank 0 of a
    generation carries the earlier ones' time, so the time comes from the newest generation's files
    only (a resume under another process count leaves the older files beside the new ones)."""
    states, gens = {}, []
    for path in paths:
        name = os.path.basename(path)
        try:
            doc = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file: one line, exit 2
            raise _cli_error(f"--resume: cannot read the partial file {name}: {_one_line(exc)}; delete it to "
                             "start over") from None
        if not isinstance(doc, dict) or doc.get("format") != PARTIAL_FORMAT or not isinstance(doc.get("meta"), dict):
            raise _cli_error(f"--resume: {name} is not a `drp eval` partial file; delete it to start over")
        for key, what, fix in _META_CHECKS:
            theirs, ours = doc["meta"].get(key), meta[key]
            if theirs != ours:
                raise _cli_error(f"--resume: {name} is from another {what} ({_short(theirs)} there, {_short(ours)} "
                                 f"here); {fix}, or delete it to start over")
        gen = {"generation": int(doc.get("generation", 0)), "elapsed_s": float(doc.get("elapsed_s", 0.0)),
               "states": {}}
        for suite, d in (doc.get("suites") or {}).items():
            try:
                st = attacks.SweepState.from_dict(d)
            except (ValueError, KeyError, TypeError) as exc:
                raise _cli_error(f"--resume: {name} holds a broken state of suite {suite}: {_one_line(exc)}; "
                                 "delete it to start over") from None
            states.setdefault(suite, []).append(st)
            gen["states"][suite] = st
        gens.append(gen)
    out = {}
    for suite, sts in states.items():
        try:
            out[suite] = attacks.SweepState.merge(sts)
        except ValueError as exc:
            raise _cli_error(f"--resume: the partial files disagree: {_one_line(exc)}; delete them to start "
                             "over") from None
    newest = max((g["generation"] for g in gens), default=0)
    latest = [g for g in gens if g["generation"] == newest]
    prior = {"generation": newest, "elapsed_s": max((g["elapsed_s"] for g in latest), default=0.0), "timings": {}}
    for suite in {s for g in latest for s in g["states"]}:
        # merge sums the states' stage times (the files' states agree: checked above)
        prior["timings"][suite] = attacks.SweepState.merge(
            [g["states"][suite] for g in latest if suite in g["states"]]).timings
    return out, prior


def write_partial(path, meta, states, info, *, generation=0, elapsed_s=0.0):
    """This rank's states (rank 0's timings include the earlier generations'); generation: this
    run's (read_partials); elapsed_s: the evaluation's wall time so far, earlier runs included."""
    doc = {"format": PARTIAL_FORMAT, "meta": meta, "rank": info.rank, "world_size": info.world_size,
           "suites": {suite: st.to_dict() for suite, st in states.items()}, "generation": int(generation),
           "elapsed_s": float(elapsed_s)}
    atomic_write(path, lambda f: torch.save(doc, f))


def args_digest(args):
    items = {k: v for k, v in sorted(vars(args).items()) if k not in ("run", "_argv")}
    return hashlib.sha256(json.dumps(items, sort_keys=True, default=str).encode()).hexdigest()


def continue_command(args, info):
    argv = list(args._argv) if getattr(args, "_argv", None) is not None else ["eval"] + _rebuild_argv(args)
    if "--resume" not in argv:
        argv.append("--resume")
    if info.enabled:
        return f"torchrun --nproc-per-node {info.world_size} -m drp_train {shlex.join(argv)}"
    return f"drp {shlex.join(argv)}"


def _rebuild_argv(args):
    """The options of `args` as command-line flags (when the original argv is not known)."""
    out = []
    for key, value in vars(args).items():
        if key in ("run", "_argv", "command") or value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            out.append(flag)
        elif isinstance(value, (list, tuple)):
            out += [flag] + [str(v) for v in value]
        else:
            out += [flag, str(value)]
    return out
