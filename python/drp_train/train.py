"""The training loop shared by every method.

``train(cfg)`` writes into ``cfg.out``:

- ``config.json``: the resolved configuration;
- ``metrics.jsonl``: one JSON line per epoch (epoch, global_step, lr, train_loss,
  train_accuracy, test_accuracy, epoch_time_s, samples_per_s, train_time_s);
- ``last.pt`` after every epoch (and every ``checkpoint_every`` steps), ``final.pt`` at the end.

Exact resume: every random draw of a step (shuffle, augmentation, attack start) comes
from a generator seeded by (seed, epoch, step, rank), checkpoints carry the optimiser,
scheduler, scaler, RNG states and the running sums of the epoch, so ``resume=True``
continues from ``last.pt`` to the same final weights as an uninterrupted run (bitwise
on CPU).

Test hooks (environment variables, used by tests/test_resume.py to make a kill window
deterministic; they never change results):
  DRP_TRAIN_TEST_STEP_SLEEP=s   sleep s seconds after every optimiser step
  DRP_TRAIN_TEST_SAVE_SLEEP=s   hold a finished checkpoint temp file s seconds before the rename
"""
import contextlib
import json
import logging
import math
import os
import random
import shutil
import time
from typing import Optional

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

import drp_kernels

from . import ddp
from .checkpoint import (atomic_write, build_network, config_of, load_checkpoint, remove_stale_temporaries,
                         rng_state, save_checkpoint, set_rng_state)
from .config import TrainConfig
from .data import DATASET_INFO, augment_batch, check_available, load_dataset
from .errors import CheckpointError, ConfigError, NonFiniteLossError, OutputDirError
from .methods import DRP, make_method

__all__ = ["train", "RESUME_MUTABLE_KEYS"]

log = logging.getLogger("drp_train")

# Options that may differ between a run and its resumption: they do not change results.
RESUME_MUTABLE_KEYS = frozenset({"resume", "quiet", "device", "data_dir", "out", "eval_batch_size",
                                 "checkpoint_every", "compile", "preset"})

_PROBE_BYTES = 4 << 20


def train(cfg: TrainConfig, *, progress: bool = True) -> dict:
    """Train with ``cfg``; return {"out", "checkpoint", "train_time_s", "final", "metrics", "config"}."""
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
    cfg = cfg.resolved()
    device = _pick_device(cfg)
    info = ddp.setup(device.type)
    try:
        if info.enabled and device.type == "cuda":
            device = torch.device("cuda", info.local_rank)
        return _Trainer(cfg, device=device, info=info, progress=progress and not cfg.quiet).run()
    finally:
        ddp.cleanup(info)


def _pick_device(cfg):
    name = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"--device must be cpu or cuda[:N], got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA GPU is available")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device must be cpu or cuda[:N], got {name!r}")
    if cfg.amp is not None and device.type != "cuda":
        raise ConfigError(f"--amp {cfg.amp} needs a CUDA device (running on {device.type})")
    return device


def _derive_seed(*parts) -> int:
    """A 63-bit seed mixed from integers (splitmix64 steps), stable across runs and platforms."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) & 0xFFFFFFFFFFFFFFFF
        h = (h * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
        h = (h * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h & 0x7FFFFFFFFFFFFFFF


def _lr_factor(schedule, total):
    """Multiplier of the base lr after ``t`` optimiser steps out of ``total``."""
    total = max(int(total), 1)
    if schedule == "cosine":
        return lambda t: 0.5 * (1.0 + math.cos(math.pi * min(t, total) / total))
    if schedule == "cyclic":
        # one triangle: 0 -> lr over the first 2/5 of training, back to 0 at the end (Wong et al. 2020)
        peak = 0.4 * total
        return lambda t: float(np.interp(t + 1, [0, peak, total], [0.0, 1.0, 0.0]))
    if schedule == "multistep":
        return lambda t: 0.1 ** ((t >= 0.5 * total) + (t >= 0.75 * total))
    raise ConfigError(f"--schedule must be cosine, cyclic or multistep, got {schedule!r}")


class _Trainer:
    def __init__(self, cfg, *, device, info, progress):
        self.cfg, self.device, self.info = cfg, device, info
        self.progress = progress and info.is_main
        self.out = os.path.abspath(cfg.out)
        self.last_path = os.path.join(self.out, "last.pt")
        self.final_path = os.path.join(self.out, "final.pt")
        self.metrics_path = os.path.join(self.out, "metrics.jsonl")

    # ------------------------------------------------------------------ set-up
    def _prepare_out(self):
        """Create and probe --out on rank 0 before any training time is spent."""
        error = None
        if self.info.is_main:
            try:
                self._probe_out()
            except OutputDirError as e:
                error = e
        if ddp.broadcast_flag(error is not None, self.info, device=self._flag_device()):
            raise error if error is not None else OutputDirError(f"--out {self.out} could not be prepared on rank 0")

    def _flag_device(self):
        return self.device if self.info.backend == "nccl" else torch.device("cpu")

    def _probe_out(self):
        cfg = self.cfg
        try:
            os.makedirs(self.out, exist_ok=True)
        except OSError as e:
            raise OutputDirError(f"--out {self.out} cannot be created: {e.strerror or e}") from None
        if not os.path.isdir(self.out):
            raise OutputDirError(f"--out {self.out} is not a folder")
        existing = [p for p in (self.final_path, self.last_path) if os.path.exists(p)]
        if existing and not cfg.resume:
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

    def _check_space(self, net):
        if not self.info.is_main:
            return
        param_bytes = sum(p.numel() * p.element_size() for p in net.state_dict().values())
        # model + momentum in last.pt and final.pt, plus a temporary file while writing
        needed = 3 * 2 * param_bytes + (64 << 20)
        free = shutil.disk_usage(self.out).free
        if free < needed:
            raise OutputDirError(f"--out {self.out} has {free / 2**20:.1f} MiB free but the checkpoints need "
                                 f"about {needed / 2**20:.1f} MiB: free some space or choose another --out")

    def _prototypes(self, num_classes, resume_ckpt):
        cfg = self.cfg
        if cfg.method != "drp":
            return None
        if resume_ckpt is not None:
            return resume_ckpt["prototypes"].float()
        if cfg.prototypes is not None:
            try:
                p = drp_kernels.load_prototypes(cfg.prototypes)
            except (OSError, RuntimeError, ValueError) as e:
                raise ConfigError(f"--prototypes {cfg.prototypes} cannot be loaded: {e}") from None
            p = torch.as_tensor(p, dtype=torch.float32)
            if p.ndim != 2 or p.shape[0] != num_classes:
                raise ConfigError(f"--prototypes {cfg.prototypes} holds a tensor of shape {tuple(p.shape)}, "
                                  f"expected ({num_classes}, D) for {cfg.dataset}")
            if not torch.isfinite(p).all():
                raise ConfigError(f"--prototypes {cfg.prototypes} holds NaN or Inf values")
            return p.cpu()
        return torch.as_tensor(drp_kernels.repulsive_prototypes(
            num_classes, cfg.proto_dim, metric=cfg.metric, method=cfg.proto_method, seed=cfg.seed),
            dtype=torch.float32).cpu()

    def _load_resume(self):
        if not self.cfg.resume:
            return None
        if self.info.is_main:
            stale = remove_stale_temporaries(self.out)
            if stale:
                log.info("removed %d unfinished checkpoint file(s) left by an interrupted run", len(stale))
        if self.info.enabled:
            torch.distributed.barrier()
        path = self.final_path if os.path.isfile(self.final_path) else self.last_path
        if not os.path.isfile(path):
            log.warning("--resume: no checkpoint in %s yet, starting from scratch", self.out)
            return None
        ckpt = load_checkpoint(path)
        saved = config_of(ckpt, path).to_dict()
        now = self.cfg.to_dict()
        diff = sorted(k for k in now if k not in RESUME_MUTABLE_KEYS and saved.get(k) != now[k])
        if diff:
            shown = ", ".join(f"{k} (checkpoint {saved.get(k)!r}, now {now[k]!r})" for k in diff[:4])
            raise CheckpointError(f"--resume: {path} was trained with other options: {shown}")
        return ckpt

    # ------------------------------------------------------------------ run
    def run(self) -> dict:
        cfg, device, info = self.cfg, self.device, self.info
        check_available(cfg.dataset, data_dir=cfg.data_dir)
        self._prepare_out()
        ckpt = self._load_resume()
        if ckpt is not None and ckpt.get("final"):
            log.info("--resume: %s is already finished", self.final_path)
            return self._result(ckpt.get("metrics", []), ckpt.get("train_time_s", 0.0))

        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        info_ds = DATASET_INFO[cfg.dataset]
        num_classes = info_ds["classes"]
        prototypes = self._prototypes(num_classes, ckpt)
        method = make_method(cfg, prototypes=prototypes)
        out_dim = method.output_dim(num_classes)
        net = build_network(cfg, output_dim=out_dim)
        self._check_space(net)

        x_train, y_train = load_dataset(cfg.dataset, split="train", data_dir=cfg.data_dir, limit=cfg.limit_train)
        x_test, y_test = load_dataset(cfg.dataset, split="test", data_dir=cfg.data_dir, limit=cfg.limit_test)
        if x_train.shape[0] < info.world_size:
            raise ConfigError(f"--limit-train {x_train.shape[0]} is smaller than the {info.world_size} DDP processes")
        x_train, y_train = x_train.to(device), y_train.to(device)
        x_test, y_test = x_test.to(device), y_test.to(device)

        memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        net = net.to(device=device, memory_format=memory_format)
        if isinstance(method, DRP):
            method.to(device)
        optimizer = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                    weight_decay=cfg.weight_decay)
        n_train = x_train.shape[0]
        steps_per_epoch = math.ceil(n_train / cfg.batch_size)
        if info.enabled and n_train - (steps_per_epoch - 1) * cfg.batch_size < info.world_size:
            steps_per_epoch -= 1  # the last global batch would leave a rank without samples
        total_steps = steps_per_epoch * cfg.epochs
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(cfg.schedule, total_steps))
        scaler = torch.amp.GradScaler("cuda") if cfg.amp == "fp16" else None

        metrics, train_time, start_epoch, start_step = [], 0.0, 0, 0
        sums0 = None
        if ckpt is not None:
            net.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            if scaler is not None and ckpt.get("scaler") is not None:
                scaler.load_state_dict(ckpt["scaler"])
            set_rng_state(ckpt["rng"])
            metrics = list(ckpt.get("metrics", []))
            train_time = float(ckpt.get("train_time_s", 0.0))
            start_epoch, start_step = int(ckpt["epoch"]), int(ckpt["step"])
            sums0 = ckpt.get("epoch_sums")
            if start_step >= steps_per_epoch:
                raise CheckpointError(f"--resume: {self.last_path} is at step {start_step} of an epoch of "
                                      f"{steps_per_epoch} steps; the data size changed")
            if info.is_main:
                self._rewrite_metrics(metrics)
                log.info("resuming %s at epoch %d step %d", self.out, start_epoch + 1, start_step)
        if info.is_main:
            if ckpt is None:
                self._rewrite_metrics([])
            self._write_json_config()

        model = net
        if info.enabled:
            model = nn.parallel.DistributedDataParallel(
                net, device_ids=[device.index] if device.type == "cuda" else None)
        attack_model = method.classifier(net)
        train_forward = model
        if cfg.compile:
            train_forward = torch.compile(model)
            attack_model = torch.compile(attack_model)
        autocast = self._autocast()
        classifier = method.classifier(net)

        self.state = dict(net=net, optimizer=optimizer, scheduler=scheduler, scaler=scaler, prototypes=prototypes)
        step_sleep = float(os.environ.get("DRP_TRAIN_TEST_STEP_SLEEP", "0") or 0)
        epochs_bar = tqdm(total=cfg.epochs, initial=start_epoch, desc="epochs", unit="epoch",
                          disable=not self.progress, dynamic_ncols=True)
        global_step = start_epoch * steps_per_epoch + start_step
        try:
            for epoch in range(start_epoch, cfg.epochs):
                first = start_step if epoch == start_epoch else 0
                sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss*n, correct, n
                if epoch == start_epoch and sums0 is not None:
                    sums = torch.as_tensor(sums0, dtype=torch.float64).to(device)
                perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(
                    _derive_seed(cfg.seed, epoch, 0x5EED))).to(device)
                t0 = time.perf_counter()
                bar = tqdm(total=steps_per_epoch, initial=first, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                           unit="batch", leave=False, disable=not self.progress, dynamic_ncols=True)
                net.train()
                for step in range(first, steps_per_epoch):
                    idx = ddp.shard(perm[step * cfg.batch_size:(step + 1) * cfg.batch_size], info)
                    gen = torch.Generator(device=device).manual_seed(_derive_seed(cfg.seed, epoch, step, info.rank))
                    xb = x_train[idx]
                    if cfg.augment:
                        xb = augment_batch(xb, generator=gen)
                    xb = xb.float().div_(255.0).contiguous(memory_format=memory_format)
                    yb = y_train[idx]
                    loss, logits = method.loss(train_forward, attack_model, xb, yb, generator=gen, autocast=autocast)
                    bad = not bool(torch.isfinite(loss.detach()))
                    if ddp.broadcast_flag(bad, info, device=self._flag_device()):
                        raise NonFiniteLossError(
                            f"the training loss became {float(loss.detach())} at epoch {epoch + 1} step {step + 1} "
                            f"(global step {global_step + 1}); stopped without saving a checkpoint "
                            f"(try a smaller --lr than {cfg.lr:g})")
                    optimizer.zero_grad(set_to_none=True)
                    if scaler is not None:
                        scaler.scale(loss).backward()
                        scaler.step(optimizer)
                        scaler.update()
                    else:
                        loss.backward()
                        optimizer.step()
                    scheduler.step()
                    global_step += 1
                    with torch.no_grad():
                        n = yb.shape[0]
                        sums += torch.stack([loss.detach().double() * n,
                                             (logits.argmax(1) == yb).sum().double(),
                                             torch.tensor(float(n), dtype=torch.float64, device=device)])
                    bar.update(1)
                    if self.progress and (step % 20 == 0 or step == steps_per_epoch - 1):
                        bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
                    if step_sleep:
                        time.sleep(step_sleep)
                    if cfg.checkpoint_every and global_step % cfg.checkpoint_every == 0 and step + 1 < steps_per_epoch:
                        self._check_weights(epoch, step)
                        train_time += time.perf_counter() - t0
                        t0 = time.perf_counter()
                        self._save(self.last_path, epoch=epoch, step=step + 1, global_step=global_step,
                                   metrics=metrics, train_time=train_time, sums=sums)
                bar.close()
                train_time += time.perf_counter() - t0
                epoch_time = time.perf_counter() - t0
                self._check_weights(epoch, steps_per_epoch - 1)
                totals = ddp.all_reduce_sum(sums.clone(), info).tolist()
                test_acc = self._evaluate(classifier, x_test, y_test, autocast)
                row = {
                    "epoch": epoch + 1,
                    "global_step": global_step,
                    "lr": optimizer.param_groups[0]["lr"],
                    "train_loss": totals[0] / max(totals[2], 1.0),
                    "train_accuracy": totals[1] / max(totals[2], 1.0),
                    "train_on": "adversarial" if method.adversarial else "clean",
                    "test_accuracy": test_acc,
                    "epoch_time_s": epoch_time,
                    "samples_per_s": totals[2] / max(epoch_time, 1e-9) if first == 0 else None,
                    "train_time_s": train_time,
                }
                metrics.append(row)
                self._save(self.last_path, epoch=epoch + 1, step=0, global_step=global_step, metrics=metrics,
                           train_time=train_time, sums=None)
                if info.is_main:
                    with open(self.metrics_path, "a") as f:
                        f.write(json.dumps(row) + "\n")
                    log.info("epoch %d/%d  loss %.4f  train acc %.4f  test acc %.4f  %.1fs", epoch + 1, cfg.epochs,
                             row["train_loss"], row["train_accuracy"], test_acc, epoch_time)
                epochs_bar.update(1)
                epochs_bar.set_postfix(test_acc=f"{test_acc:.4f}")
        finally:
            epochs_bar.close()
        self._save(self.final_path, epoch=cfg.epochs, step=0, global_step=global_step, metrics=metrics,
                   train_time=train_time, sums=None, final=True)
        return self._result(metrics, train_time)

    # ------------------------------------------------------------------ helpers
    def _autocast(self):
        if self.cfg.amp is None:
            return contextlib.nullcontext
        dtype = torch.bfloat16 if self.cfg.amp == "bf16" else torch.float16
        return lambda: torch.autocast(device_type="cuda", dtype=dtype)

    def _check_weights(self, epoch, step):
        net = self.state["net"]
        if not all(bool(torch.isfinite(p).all()) for p in net.parameters()):
            raise NonFiniteLossError(f"the weights became NaN or Inf by epoch {epoch + 1} step {step + 1}; "
                                     "stopped without saving a checkpoint")

    @torch.no_grad()
    def _evaluate(self, classifier, x, y, autocast):
        info = self.info
        classifier.eval()
        idx = torch.arange(info.rank, x.shape[0], info.world_size, device=x.device)
        correct = torch.zeros((), dtype=torch.float64, device=x.device)
        bs = self.cfg.eval_batch_size
        mf = torch.channels_last if self.cfg.channels_last else torch.contiguous_format
        for i in range(0, idx.shape[0], bs):
            j = idx[i:i + bs]
            xb = x[j].float().div_(255.0).contiguous(memory_format=mf)
            with autocast():
                logits = classifier(xb)
            correct += (logits.argmax(1) == y[j]).sum().double()
        total = torch.stack([correct, torch.tensor(float(idx.shape[0]), dtype=torch.float64, device=x.device)])
        total = ddp.all_reduce_sum(total, info).tolist()
        self.state["net"].train()
        return total[0] / max(total[1], 1.0)

    def _save(self, path, *, epoch, step, global_step, metrics, train_time, sums, final=False):
        if not self.info.is_main:
            return
        s = self.state
        payload = {
            "final": final,
            "config": self.cfg.to_dict(),
            "epoch": epoch,
            "step": step,
            "global_step": global_step,
            "model": {k: v.detach().cpu() for k, v in s["net"].state_dict().items()},
            "optimizer": s["optimizer"].state_dict(),
            "scheduler": _plain_scheduler_state(s["scheduler"]),
            "scaler": s["scaler"].state_dict() if s["scaler"] is not None else None,
            "prototypes": s["prototypes"].cpu() if s["prototypes"] is not None else None,
            "rng": rng_state(),
            "metrics": [dict(m) for m in metrics],
            "epoch_sums": sums.detach().cpu().tolist() if sums is not None else None,
            "train_time_s": float(train_time),
            "versions": {"torch": str(torch.__version__), "drp_kernels": str(drp_kernels.__version__)},
        }
        try:
            save_checkpoint(path, payload)
        except OSError as e:
            raise OutputDirError(f"writing checkpoint {path} failed: {e.strerror or e}") from None

    def _write_json_config(self):
        text = json.dumps(self.cfg.to_dict(), indent=2, sort_keys=True) + "\n"
        atomic_write(os.path.join(self.out, "config.json"), lambda f: f.write(text.encode()))

    def _rewrite_metrics(self, metrics):
        text = "".join(json.dumps(m) + "\n" for m in metrics)
        atomic_write(self.metrics_path, lambda f: f.write(text.encode()))

    def _result(self, metrics, train_time):
        return {
            "rank": self.info.rank,
            "out": self.out,
            "checkpoint": self.final_path,
            "last_checkpoint": self.last_path,
            "train_time_s": float(train_time),
            "final": dict(metrics[-1]) if metrics else {},
            "metrics": [dict(m) for m in metrics],
            "config": self.cfg.to_dict(),
        }


def _plain_scheduler_state(scheduler):
    # LambdaLR stores None in place of its (plain function) lambdas: numbers and lists only
    return dict(scheduler.state_dict())
