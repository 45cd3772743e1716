"""Training epoch time: certified training of the l-inf-distance prototype network against CE and
PGD-AT on the same data (a script: each figure takes seconds to minutes).

Every provider runs real optimiser steps of `drp train`'s method code (``drp_train.methods``) on
the first images of Fashion-MNIST's training set, at its own default batch size, one after the
other in one process (``--rounds R`` interleaved rounds, the median step of all rounds is the
figure). Epoch time = median step time x steps per epoch of the 60000 training images.

* ``ce`` / ``pgd-at``: the `cnn` model (batch 128; PGD-AT with 10 steps);
* ``certified@p``: the `linf-dist` model (``--depth`` x ``--width``, batch 512) at a fixed p: every
  integer p that the real p schedule (``drp_train.methods.p_schedule`` over ``--schedule-epochs``
  epochs) visits, plus 8, 64, 1000 and inf; ``certified (schedule)`` is the epoch time averaged over
  that schedule, each step priced at its own p;
* ``certified-reference@p``: the same step with ``lp_dist`` swapped for the pure-PyTorch
  broadcast reference (``drp_kernels.reference.lp_dist``), the plain-PyTorch yardstick.

``--checkpoint RUN`` prices the certified steps with a trained run's weights (fixed: its optimiser
steps with lr 0) and its depth and widths. A trained net spreads its distance terms more evenly than
a freshly initialised one, so the sparse scheme of large p finds more terms that matter and a step
costs more (bench/RESULTS.md).

    python bench/bench_train_epoch.py --json bench/results/cpu_train_epoch.json
    python bench/bench_train_epoch.py --checkpoint results/fashion-mnist/certified-80ep --no-reference \
        --json bench/results/cpu_train_epoch_trained.json
"""
import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import time

import torch

import drp_kernels.certified as certified
import drp_kernels.layers as layers
from drp_kernels import reference

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench import cpu_model, device_name, versions  # noqa: E402

N_TRAIN = 60000


def _cfg(method, **kw):
    from drp_train.config import TrainConfig

    return TrainConfig(method=method, dataset="fashion-mnist", **kw).resolved()


def _setup(cfg, x_all, y_all, state=None):
    from drp_train.methods import make_method
    from drp_train.models import build_network
    from drp_train.train import make_optimizer
    import drp_kernels

    torch.manual_seed(0)
    proto = None
    if cfg.method == "drp":
        proto = torch.as_tensor(drp_kernels.repulsive_prototypes(10, cfg.proto_dim, metric=cfg.metric,
                                                                 method=cfg.proto_method, seed=0))
    method = make_method(cfg, prototypes=proto)
    net = build_network(cfg, output_dim=method.output_dim(10))
    opt = make_optimizer(cfg, net.parameters())
    if state is not None:  # a trained run's weights, kept fixed: the optimiser steps with lr 0
        net.load_state_dict(state)
        for group in opt.param_groups:
            group["lr"] = 0.0
    bs = cfg.batch_size
    x, y = x_all[:bs].float().div(255.0), y_all[:bs]
    gen = torch.Generator().manual_seed(0)
    classifier = method.classifier(net)

    def step():
        net.train()
        loss, _ = method.loss(net, classifier, x, y, generator=gen, autocast=contextlib.nullcontext)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return net, step, bs


def _time(step, reps):
    step()  # warm-up
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        out.append(time.perf_counter() - t0)
    return out


def _schedule(epochs, batch):
    """The p of every optimiser step of a certified run of ``epochs`` epochs (the trainer's schedule)."""
    from drp_train.methods import p_schedule

    total = epochs * math.ceil(N_TRAIN / batch)
    return [p_schedule(t, total) for t in range(total)]


def main(argv=None):
    ap = argparse.ArgumentParser(prog="bench_train_epoch.py")
    ap.add_argument("--depth", type=int, default=5)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--reps", type=int, default=5, help="timed steps per provider and round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--reference", action=argparse.BooleanOptionalAction, default=True,
                    help="also time the pure-PyTorch lp_dist (slow, several GB)")
    ap.add_argument("--schedule-epochs", type=int, default=None,
                    help="epochs of the p schedule to price (default: drp train's default for certified)")
    ap.add_argument("--schedule-reps", type=int, default=1, help="timed steps per schedule p (after one warm-up)")
    ap.add_argument("--checkpoint", default=None, metavar="RUN",
                    help="price the certified steps with this certified run's trained weights (its depth and "
                         "widths; the weights stay fixed) instead of a freshly initialised 5 x --width net")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    state, run_cfg = None, None
    if args.checkpoint is not None:
        from drp_train.checkpoint import config_of, load_checkpoint
        from drp_train.errors import CheckpointError

        try:
            data = load_checkpoint(args.checkpoint)
            run_cfg = config_of(data, args.checkpoint).resolved()
        except CheckpointError as e:
            ap.error(f"--checkpoint: {e}")
        if run_cfg.method != "certified":
            ap.error(f"--checkpoint: expected a certified run; {args.checkpoint} is a {run_cfg.method!r} run")
        state = data["model"]
        args.depth, args.width = run_cfg.depth, run_cfg.width
    from drp_train.data import load_dataset

    load_start = list(os.getloadavg())
    x_all, y_all = load_dataset("fashion-mnist", split="train", limit=1024)
    key_ps = [8.0, 64.0, 1000.0, math.inf]
    providers, batch = {}, {}
    for name in ("ce", "pgd-at"):
        _net, providers[name], batch[name] = _setup(_cfg(name), x_all, y_all)
    widths = {} if run_cfg is None else {"width_first": run_cfg.width_first, "head": run_cfg.head}
    cert_cfg = _cfg("certified", depth=args.depth, width=args.width, **widths)
    cert_net, cert_step, cert_batch = _setup(cert_cfg, x_all, y_all, state)
    epochs = args.schedule_epochs or cert_cfg.epochs
    schedule = _schedule(epochs, cert_batch)
    ps = key_ps

    def at_p(p, fn):
        def run():
            cert_net.set_p(p)
            fn()
        return run
    for p in ps:
        providers[f"certified@p={p:g}"] = at_p(p, cert_step)
        batch[f"certified@p={p:g}"] = cert_batch
    ref_ps = [8.0, math.inf] if args.reference else []

    def with_reference(p):
        def ref_lp_dist(x, w, *, p):
            return reference.lp_dist(x, w, p)

        def run():
            saved = layers.lp_dist, certified.lp_dist
            layers.lp_dist = certified.lp_dist = ref_lp_dist
            try:
                cert_net.set_p(p)
                cert_step()
            finally:
                layers.lp_dist, certified.lp_dist = saved
        return run
    for p in ref_ps:
        providers[f"certified-reference@p={p:g}"] = with_reference(p)
        batch[f"certified-reference@p={p:g}"] = cert_batch

    times = {k: [] for k in providers}
    for r in range(args.rounds):
        for name, fn in providers.items():
            reps = 1 if name.startswith("certified-reference") else args.reps
            times[name] += _time(fn, reps)
            print(f"round {r + 1}: {name}: {statistics.median(times[name]) * 1e3:.1f} ms/step", flush=True)
    # every other p the schedule visits, once each (the key p above were timed in every round)
    visited = sorted(set(schedule))
    per_p = {p: statistics.median(times[f"certified@p={p:g}"]) for p in key_ps}
    for p in visited:
        if p not in per_p:
            per_p[p] = statistics.median(_time(at_p(p, cert_step), args.schedule_reps))
    print(f"priced {len(visited)} distinct p of the {len(schedule)}-step schedule", flush=True)
    rows = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        steps = math.ceil(N_TRAIN / batch[name])
        rows[name] = {"batch": batch[name], "median_step_s": med, "steps_per_epoch": steps, "epoch_s": med * steps,
                      "step_s": ts}
    sched = sum(per_p[p] for p in schedule) / epochs
    rows["certified (schedule)"] = {
        "epoch_s": sched, "schedule_epochs": epochs, "schedule_steps": len(schedule), "distinct_p": len(visited),
        "step_s_by_p": {f"{p:g}": v for p, v in sorted(per_p.items())}}
    for base in ("ce", "pgd-at"):
        rows["certified (schedule)"][f"vs_{base}"] = sched / rows[base]["epoch_s"]
    inf_step = rows["certified@p=inf"]["median_step_s"]
    ratios = {f"p={p:g}/p=inf": rows[f"certified@p={p:g}"]["median_step_s"] / inf_step for p in key_ps[:-1]}
    for p in ref_ps:
        rows[f"certified-reference@p={p:g}"]["speedup_of_kernels"] = (
            rows[f"certified-reference@p={p:g}"]["median_step_s"] / rows[f"certified@p={p:g}"]["median_step_s"])
    print(f"{'provider':<28} {'batch':>5} {'ms/step':>9} {'epoch s':>8}")
    for name, r in rows.items():
        ms = f"{r['median_step_s'] * 1e3:9.1f}" if "median_step_s" in r else f"{'':>9}"
        print(f"{name:<28} {r.get('batch', ''):>5} {ms} {r['epoch_s']:8.1f}")
    for k, v in ratios.items():
        print(f"step {k}: {v:.2f}")
    if args.json:
        out = {"device": device_name("cpu"), "cpu": cpu_model(), "versions": versions(), "depth": args.depth,
               "width": args.width, "width_first": cert_cfg.width_first,
               "weights": args.checkpoint or "initialised", "load_average_start": load_start,
               "load_average": list(os.getloadavg()),
               "step_ratios": ratios, "rows": rows}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
