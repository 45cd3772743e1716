"""The training loop shared by every method.

``train(cfg)`` writes into ``cfg.out``:

- ``config.json``: the resolved configuration;
- ``metrics.jsonl``: one JSON line per epoch (epoch, global_step, lr, train_loss,
  train_accuracy, test_accuracy, epoch_time_s, samples_per_s, train_time_s);
- ``last.pt`` after every epoch (and every ``checkpoint_every`` steps), ``final.pt`` at the end.

``epoch_time_s`` is the time this process spent on the epoch's training steps (mid-epoch
checkpoint writes excluded) and ``samples_per_s`` the samples it trained on over that time.

Ctrl-C (SIGINT, main thread): the step in flight finishes, ``last.pt`` is written at that
step boundary and ``TrainingInterrupted`` (exit code 130 in the CLI) names the
``drp train --resume --out DIR`` command that continues the run. A second Ctrl-C stops at once.

The run is split into ``_setup`` (data, prototypes, network, optimiser), ``_restore`` (the
checkpoint's states when resuming), ``_epoch`` / ``_step`` and ``_end_of_epoch`` (test
accuracy, metrics row, ``last.pt``, log line).

Exact resume: every random draw of a step (shuffle, augmentation, attack start) comes
from a generator seeded by (seed, epoch, step, rank), checkpoints carry the optimiser,
scheduler, scaler, RNG states and the running sums of the epoch, so ``resume=True``
continues from ``last.pt`` to the same final weights as an uninterrupted run (bitwise
on CPU). The run folder's files are ``run_folder.RunFolder``'s, the checkpoint's content
``checkpoint.training_payload``.
"""
import contextlib
import logging
import math
import random
import time

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

import drp_kernels

from . import ddp
from ._cli_utils import pick_device, stderr_is_terminal
from .checkpoint import (config_of, load_checkpoint, remove_stale_temporaries, save_checkpoint, set_rng_state,
                         training_payload)
from .config import TrainConfig, run_label
from .data import DATASET_INFO, augment_batch, check_available, load_dataset, validation_split
from .errors import CheckpointError, ConfigError, NonFiniteLossError, OutputDirError, TrainingInterrupted
from .methods import DRP, make_method
from .models import build_network
from .optim import derive_seed, make_optimizer, make_scheduler
from .run_folder import RunFolder
from .run_prototypes import drp_prototypes, init_linf_dist_prototypes
from .signals import StopOnSigint

__all__ = ["train", "make_optimizer", "RESUME_MUTABLE_KEYS"]

log = logging.getLogger("drp_train")

# Options that may differ between a run and its resumption: they do not change results.
RESUME_MUTABLE_KEYS = frozenset({"resume", "quiet", "device", "data_dir", "out", "eval_batch_size",
                                 "checkpoint_every", "compile", "preset"})


def train(cfg: TrainConfig, *, progress: bool = True) -> dict:
    """Train with ``cfg``; return {"out", "checkpoint", "train_time_s", "final", "metrics", "config"}."""
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
    cfg = cfg.resolved()
    device = _pick_device(cfg)
    with ddp.process_group(device.type) as info:
        if info.enabled and device.type == "cuda":
            device = torch.device("cuda", info.local_rank)
        return _Trainer(cfg, device=device, info=info, progress=progress and not cfg.quiet).run()


def _pick_device(cfg):
    device = pick_device(cfg.device)
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device: expected cpu or cuda[:N], got {cfg.device!r}")
    if cfg.amp is not None and device.type != "cuda":
        raise ConfigError(f"--amp {cfg.amp} needs a CUDA device (running on {device.type})")
    return device


class _Trainer:
    def __init__(self, cfg, *, device, info, progress):
        self.cfg, self.device, self.info = cfg, device, info
        # bars only on a terminal: redirected logs get the plain per-epoch lines alone
        self.progress = progress and info.is_main and stderr_is_terminal()
        self.folder = RunFolder(cfg.out)
        self.out, self.last_path, self.final_path = self.folder.out, self.folder.last, self.folder.final

    # ------------------------------------------------------------------ set-up
    def _prepare_out(self):
        """Create and probe --out on rank 0 before any training time is spent."""
        error = None
        if self.info.is_main:
            try:
                self.folder.probe(resume=self.cfg.resume)
            except OutputDirError as e:
                error = e
        if ddp.broadcast_flag(error is not None, self.info, device=self._flag_device()):
            raise error if error is not None else OutputDirError(f"--out {self.out} could not be prepared on rank 0")

    def _flag_device(self):
        return self.device if self.info.backend == "nccl" else torch.device("cpu")

    def _load_resume(self):
        if not self.cfg.resume:
            return None
        if self.info.is_main:
            stale = remove_stale_temporaries(self.out)
            if stale:
                log.info("removed %d unfinished checkpoint file(s) left by an interrupted run", len(stale))
        if self.info.enabled:
            torch.distributed.barrier()
        path = self.folder.checkpoint() or self.last_path
        ckpt = load_checkpoint(path)
        saved = config_of(ckpt, path).to_dict()
        now = self.cfg.to_dict()
        if now.get("proto_dim") is None and now.get("prototypes") is not None:
            now["proto_dim"] = saved.get("proto_dim")  # taken from the --prototypes file when the run began
        diff = sorted(k for k in now if k not in RESUME_MUTABLE_KEYS and saved.get(k) != now[k])
        if diff:
            shown = ", ".join(f"{k} (checkpoint {saved.get(k)!r}, now {now[k]!r})" for k in diff[:4])
            raise CheckpointError(f"--resume: {path} was trained with other options: {shown}")
        return ckpt

    # ------------------------------------------------------------------ run
    def run(self) -> dict:
        """Set up, restore (with ``resume``), train the remaining epochs and save ``final.pt``."""
        check_available(self.cfg.dataset, data_dir=self.cfg.data_dir)
        if self.cfg.resume and self.folder.checkpoint() is None:
            raise CheckpointError(f"--resume: no run to continue in {self.out} (no last.pt or final.pt); "
                                  "drop --resume to start a new run there")
        self._prepare_out()
        ckpt = self._load_resume()
        if ckpt is not None and ckpt.get("final"):
            log.info("--resume: %s is already finished", self.final_path)
            return self._result(ckpt.get("metrics", []), ckpt.get("train_time_s", 0.0))
        self._setup(ckpt)
        self._restore(ckpt)
        cfg = self.cfg
        epochs_bar = tqdm(total=cfg.epochs, initial=self.start_epoch, desc="epochs", unit="epoch",
                          disable=not self.progress, dynamic_ncols=True)
        try:
            with StopOnSigint() as stop:
                self.stop = stop
                for epoch in range(self.start_epoch, cfg.epochs):
                    sums, epoch_time, samples = self._epoch(epoch)
                    test_acc = self._end_of_epoch(epoch, sums, epoch_time, samples)
                    epochs_bar.update(1)
                    epochs_bar.set_postfix(test_acc=f"{test_acc:.4f}")
                    if epoch + 1 < cfg.epochs and self._agree_stop():
                        self._interrupted(epoch + 1, 0)
        finally:
            epochs_bar.close()
        self._save(self.final_path, epoch=cfg.epochs, step=0, sums=None, final=True)
        return self._result(self.metrics, self.train_time)

    def _setup(self, ckpt):
        """Seeds, prototypes, method, network, data, optimiser, schedule and scaler."""
        cfg, device, info = self.cfg, self.device, self.info
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        num_classes = DATASET_INFO[cfg.dataset]["classes"]
        self.prototypes = drp_prototypes(cfg, num_classes, ckpt)
        if self.prototypes is not None and self.cfg.proto_dim is None:
            # the dimension of a --prototypes file, recorded in config.json and the checkpoints
            self.cfg.proto_dim = int(self.prototypes.shape[1])
        self.method = make_method(cfg, prototypes=self.prototypes)
        self.label = run_label(cfg.method, cfg.metric)
        net = build_network(cfg, output_dim=self.method.output_dim(num_classes))
        if info.is_main:
            self.folder.check_space(net)

        x_train, y_train = load_dataset(cfg.dataset, split="train", data_dir=cfg.data_dir, limit=cfg.limit_train)
        x_test, y_test = load_dataset(cfg.dataset, split="test", data_dir=cfg.data_dir, limit=cfg.limit_test)
        self.x_val = self.y_val = None
        if cfg.val_split:
            if cfg.val_split >= x_train.shape[0]:
                raise ConfigError(f"--val-split {cfg.val_split} leaves no training images of {x_train.shape[0]}")
            keep, held = validation_split(x_train.shape[0], cfg.val_split)
            self.x_val, self.y_val = x_train[held].to(device), y_train[held].to(device)
            x_train, y_train = x_train[keep], y_train[keep]
        if x_train.shape[0] < info.world_size:
            raise ConfigError(f"--limit-train {x_train.shape[0]} is smaller than the {info.world_size} DDP processes")
        self.x_train, self.y_train = x_train.to(device), y_train.to(device)
        self.x_test, self.y_test = x_test.to(device), y_test.to(device)

        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.net = net.to(device=device, memory_format=self.memory_format)
        if isinstance(self.method, DRP):
            self.method.to(device)
        if cfg.model == "linf-dist" and ckpt is None:
            init_linf_dist_prototypes(self.net, cfg, num_classes)
        self.optimizer = make_optimizer(cfg, self.net.parameters())
        n_train = self.x_train.shape[0]
        steps = math.ceil(n_train / cfg.batch_size)
        if info.enabled and n_train - (steps - 1) * cfg.batch_size < info.world_size:
            steps -= 1  # the last global batch would leave a rank without samples
        self.steps_per_epoch = steps
        self.scheduler = make_scheduler(cfg, self.optimizer, steps * cfg.epochs)
        self.scaler = torch.amp.GradScaler("cuda") if cfg.amp == "fp16" else None

        model = self.net
        if info.enabled:
            model = nn.parallel.DistributedDataParallel(
                self.net, device_ids=[device.index] if device.type == "cuda" else None)
        self.train_forward, self.attack_model = model, self.method.classifier(self.net)
        if cfg.compile:
            self.train_forward = torch.compile(model)
            self.attack_model = torch.compile(self.attack_model)
        self.autocast = self._autocast()
        self.classifier = self.method.classifier(self.net)
        self.state = dict(net=self.net, optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler,
                          prototypes=self.prototypes)

    def _restore(self, ckpt):
        """Load the states of ``ckpt`` (or start at zero) and (re)write metrics.jsonl and config.json."""
        self.metrics, self.train_time, self.start_epoch, self.start_step, self.start_sums = [], 0.0, 0, 0, None
        if ckpt is not None:
            self.net.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            if self.scaler is not None and ckpt.get("scaler") is not None:
                self.scaler.load_state_dict(ckpt["scaler"])
            set_rng_state(ckpt["rng"])
            self.metrics = list(ckpt.get("metrics", []))
            self.train_time = float(ckpt.get("train_time_s", 0.0))
            self.start_epoch, self.start_step = int(ckpt["epoch"]), int(ckpt["step"])
            self.start_sums = ckpt.get("epoch_sums")
            if self.start_step >= self.steps_per_epoch:
                raise CheckpointError(f"--resume: {self.last_path} is at step {self.start_step} of an epoch of "
                                      f"{self.steps_per_epoch} steps; the data size changed")
            if self.info.is_main:
                log.info("%s: resuming %s at epoch %d step %d", self.label, self.out, self.start_epoch + 1,
                         self.start_step)
        self.global_step = self.start_epoch * self.steps_per_epoch + self.start_step
        if self.info.is_main:
            self.folder.rewrite_metrics(self.metrics)
            self.folder.write_config(self.cfg)

    def _epoch(self, epoch):
        """Train one epoch (from ``start_step`` when resuming into it); returns (sums, seconds, samples).

        ``sums`` holds (loss * n, correct, n) over the whole epoch, resumed part included;
        the seconds and samples count only the steps run by this process, without the time
        spent writing mid-epoch checkpoints.
        """
        cfg, device = self.cfg, self.device
        first = self.start_step if epoch == self.start_epoch else 0
        sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss*n, correct, n
        if epoch == self.start_epoch and self.start_sums is not None:
            sums = torch.as_tensor(self.start_sums, dtype=torch.float64).to(device)
        samples_before = float(sums[2])
        perm = torch.randperm(self.x_train.shape[0], generator=torch.Generator().manual_seed(
            derive_seed(cfg.seed, epoch, 0x5EED))).to(device)
        bar = tqdm(total=self.steps_per_epoch, initial=first, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   unit="batch", leave=False, disable=not self.progress, dynamic_ncols=True)
        epoch_time, t0 = 0.0, time.perf_counter()
        self.net.train()
        for step in range(first, self.steps_per_epoch):
            loss = self._step(epoch, step, perm, sums)
            bar.update(1)
            if self.progress and (step % 20 == 0 or step == self.steps_per_epoch - 1):
                bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
            last_step = step + 1 == self.steps_per_epoch
            periodic = cfg.checkpoint_every and self.global_step % cfg.checkpoint_every == 0
            stop = not last_step and self._agree_stop()
            if not last_step and (periodic or stop):
                self._check_weights(epoch, step)
                now = time.perf_counter()
                epoch_time += now - t0
                self.train_time += now - t0
                self._save(self.last_path, epoch=epoch, step=step + 1, sums=sums)
                if stop:
                    bar.close()
                    self._interrupted(epoch, step + 1)
                t0 = time.perf_counter()
        bar.close()
        now = time.perf_counter()
        epoch_time += now - t0
        self.train_time += now - t0
        self._check_weights(epoch, self.steps_per_epoch - 1)
        return sums, epoch_time, float(sums[2]) - samples_before

    def _step(self, epoch, step, perm, sums):
        """One optimiser step on the step-th batch of ``perm``; adds its loss and accuracy to ``sums``."""
        cfg, device, info = self.cfg, self.device, self.info
        idx = ddp.shard(perm[step * cfg.batch_size:(step + 1) * cfg.batch_size], info)
        gen = torch.Generator(device=device).manual_seed(derive_seed(cfg.seed, epoch, step, info.rank))
        self.method.before_step(self.net, self.global_step, self.steps_per_epoch * cfg.epochs)
        xb = self.x_train[idx]
        if cfg.augment:
            xb = augment_batch(xb, generator=gen)
        if cfg.crop_padding:
            xb = augment_batch(xb, generator=gen, pad=cfg.crop_padding, flip=False)
        xb = xb.float().div_(255.0).contiguous(memory_format=self.memory_format)
        yb = self.y_train[idx]
        loss, logits = self.method.loss(self.train_forward, self.attack_model, xb, yb, generator=gen,
                                        autocast=self.autocast)
        bad = not bool(torch.isfinite(loss.detach()))
        if ddp.broadcast_flag(bad, info, device=self._flag_device()):
            raise NonFiniteLossError(
                f"the training loss became {float(loss.detach())} at epoch {epoch + 1} step {step + 1} "
                f"(global step {self.global_step + 1}); stopped without saving a checkpoint "
                f"(try a smaller --lr than {cfg.lr:g})")
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.scheduler.step()
        self.global_step += 1
        with torch.no_grad():
            n = yb.shape[0]
            sums += torch.stack([loss.detach().double() * n, (logits.argmax(1) == yb).sum().double(),
                                 torch.tensor(float(n), dtype=torch.float64, device=device)])
        return loss

    def _end_of_epoch(self, epoch, sums, epoch_time, samples):
        """Test accuracy, the metrics row, last.pt and the log line; returns the test accuracy."""
        cfg, info = self.cfg, self.info
        totals = ddp.all_reduce_sum(sums.clone(), info).tolist()
        samples = ddp.all_reduce_sum(torch.tensor([samples], dtype=torch.float64, device=self.device),
                                     info).item()
        test_acc = self._evaluate(self.classifier, self.x_test, self.y_test, self.autocast)
        row = {
            "epoch": epoch + 1,
            "global_step": self.global_step,
            "lr": self.optimizer.param_groups[0]["lr"],
            "train_loss": totals[0] / max(totals[2], 1.0),
            "train_accuracy": totals[1] / max(totals[2], 1.0),
            "train_on": "adversarial" if self.method.adversarial else "clean",
            "test_accuracy": test_acc,
            **self._validation_metrics(),
            "epoch_time_s": epoch_time,
            "samples_per_s": samples / max(epoch_time, 1e-9),
            "train_time_s": self.train_time,
        }
        self.metrics.append(row)
        self._save(self.last_path, epoch=epoch + 1, step=0, sums=None)
        if info.is_main:
            self.folder.append_metrics(row)
            acc = "adv train acc" if self.method.adversarial else "train acc"
            log.info("%s: epoch %d/%d  loss %.4f  %s %.4f  test acc %.4f  %.1fs", self.label, epoch + 1,
                     cfg.epochs, row["train_loss"], acc, row["train_accuracy"], test_acc, epoch_time)
        return test_acc

    def _validation_metrics(self) -> dict:
        """For certified runs the current p; with --val-split the validation accuracy and, whenever the
        network runs at p = inf (where the certificate is tight), its certified accuracy at --eps."""
        row = {}
        if self.cfg.model == "linf-dist":
            row["p"] = self.net.p
        if self.x_val is None:
            return row
        row["val_accuracy"] = self._evaluate(self.classifier, self.x_val, self.y_val, self.autocast)
        if self.cfg.model == "linf-dist":
            row["val_certified_accuracy"] = self._certified(self.x_val, self.y_val) if self.net.p == math.inf else None
        return row

    @torch.no_grad()
    def _certified(self, x, y) -> float:
        """Certified accuracy at --eps on (x, y), certified in chunks and summed over the DDP ranks."""
        info = self.info
        idx = torch.arange(info.rank, x.shape[0], info.world_size, device=x.device)
        hits = torch.zeros((), dtype=torch.float64, device=x.device)
        for i in range(0, idx.numel(), self.cfg.eval_batch_size):
            j = idx[i:i + self.cfg.eval_batch_size]
            xb = x[j].float().div(255.0)
            hits += drp_kernels.certify(self.net, xb, y[j], self.cfg.eps).sum().double()
        return float(ddp.all_reduce_sum(hits, info).item()) / x.shape[0]

    def _agree_stop(self) -> bool:
        """Whether Ctrl-C was pressed (on any rank)."""
        if not self.info.enabled:
            return self.stop.requested
        return ddp.broadcast_flag(self.stop.requested, self.info, device=self._flag_device())

    def _interrupted(self, epoch, step):
        where = f"after epoch {epoch}" if step == 0 else f"at epoch {epoch + 1} step {step}"
        raise TrainingInterrupted(
            f"interrupted {where}; saved {self.last_path}. Continue with: drp train --resume --out {self.cfg.out}")

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

    def _save(self, path, *, epoch, step, sums, final=False):
        if not self.info.is_main:
            return
        s = self.state
        payload = training_payload(cfg=self.cfg, net=s["net"], optimizer=s["optimizer"], scheduler=s["scheduler"],
                                   scaler=s["scaler"], prototypes=s["prototypes"], epoch=epoch, step=step,
                                   global_step=self.global_step, metrics=self.metrics, epoch_sums=sums,
                                   train_time_s=self.train_time, final=final)
        try:
            save_checkpoint(path, payload)
        except OSError as e:
            raise OutputDirError(f"writing checkpoint {path} failed: {e.strerror or e}") from None

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
