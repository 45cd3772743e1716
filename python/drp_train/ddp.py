"""Distributed data parallel set-up when started by ``torchrun``.

``torchrun`` sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. With
WORLD_SIZE > 1 the process group uses gloo on CPU and nccl on CUDA. Each rank trains on
its shard of every global batch (``shard``); only rank 0 writes files. ``drp eval`` splits
the points over the ranks the same way and gathers their results on rank 0
(``gather_objects``, ``first_message``, ``barrier``).
"""
import contextlib
import datetime
import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "setup", "cleanup", "shard", "all_reduce_sum", "broadcast_flag", "gather_objects",
           "first_message", "barrier", "process_group"]


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name, default):
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise RuntimeError(f"environment variable {name} must be an integer, got {value!r}") from None


def setup(device_type: str, *, timeout=None) -> DistInfo:
    """Join the process group when started by torchrun with more than one process.

    timeout: how long a collective waits for the other ranks (a ``datetime.timedelta``; default
    torch's 30 minutes). ``drp eval`` waits for the slowest shard at its gather, so it asks for more."""
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return DistInfo()
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", 0)
    backend = "nccl" if device_type == "cuda" else "gloo"
    if dist.is_initialized():
        return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local,
                        backend=dist.get_backend(), owns_group=False)
    if device_type == "cuda":
        torch.cuda.set_device(local)
    kwargs = {} if timeout is None else {"timeout": timeout}
    dist.init_process_group(backend=backend, rank=rank, world_size=world, **kwargs)
    return DistInfo(rank=rank, world_size=world, local_rank=local, backend=backend, owns_group=True)


def cleanup(info: DistInfo, *, ok: bool = False) -> None:
    """Leave the process group that ``setup`` joined.

    ok: the run ended normally on this rank. Then every rank first waits for the others (rank 0
    may still be writing its files) and drops the objects that hold the group (a DDP wrapper
    in a reference cycle) while the group is alive, so no rank tears its connections down while
    another still uses them and nothing of gloo is left for the interpreter's exit to destroy.
    After an error a rank leaves at once: the others may never reach a barrier."""
    if not (info.owns_group and dist.is_initialized()):
        return
    if ok:
        gc.collect()
        dist.barrier()
    dist.destroy_process_group()
    gc.collect()


@contextlib.contextmanager
def process_group(device_type: str, *, timeout=None):
    """``setup`` on entry (the ``DistInfo`` is the context's value); ``cleanup`` on exit, with
    ``ok`` True only when the body ended without an exception."""
    info = setup(device_type, timeout=timeout)
    ok = False
    try:
        yield info
        ok = True
    finally:
        cleanup(info, ok=ok)


def shard(indices: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """This rank's part of a global batch of indices (strided, like DistributedSampler)."""
    if not info.enabled:
        return indices
    return indices[info.rank::info.world_size]


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_flag(flag: bool, info: DistInfo, *, device) -> bool:
    """True on every rank if ``flag`` is True on any rank."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def gather_objects(obj, info: DistInfo) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (``[obj]`` in a single process)."""
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def first_message(message, info: DistInfo):
    """The first rank's non-None ``message`` (rank order), the same on every rank; None if none has one.

    Lets every rank stop together when any of them met an error, reported once by rank 0."""
    return next((m for m in gather_objects(message, info) if m is not None), None)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


#: How long ``drp eval``'s ranks wait for each other (the fastest shard waits for the slowest).
EVAL_TIMEOUT = datetime.timedelta(hours=48)
