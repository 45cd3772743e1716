"""PGD with the fused ``pgd_step_`` (provider "drp": ``drp_kernels.attacks.pgd``) against a
plain PyTorch PGD loop (provider "eager"), same small CNN, inputs and settings.

The CNN is the PAPER.md Fashion-MNIST one: conv 16 and conv 32 (4x4, stride 2), FC 100.
Shapes: CUDA batch 512 x 1 x 28 x 28 with 20 steps (target: drp >= 1.3x eager);
CPU batch 64 with 10 steps, one thread (recorded in bench/results/cpu_attacks.json).
Run: pytest bench/bench_attacks.py --benchmark-only
``test_square_query_overhead``: Square's per-query bookkeeping on the CPU, fused C++ ops against
the same algorithm in PyTorch ops, with a model that costs nothing (7 / 30 / 145 points).

The evaluation engine against torchattacks' AutoAttack (minutes per model, so a script, not a
pytest-benchmark case): ``evaluate(suite="standard", checks=False)`` and torchattacks'
``AutoAttack(version="standard")`` (APGD-CE, APGD-T, FAB-T, Square 5000) and its matched chain
without FAB-T (``MultiAttack([APGD, APGDT, Square])``) on the same model, points, eps and
thread count, run one after the other in one process (``--repeat R``: R interleaved rounds, the
round with the least CPU time is the figure; all are kept). The figure is the process CPU time
(``time.process_time``, one thread): on a shared machine wall time swings by 2x with the
other jobs' load, CPU time far less; wall time is recorded beside it; torchattacks' robust accuracy is
measured on its adversarial points with one forward pass. Note that torchattacks' AutoAttack
builds APGD, APGD-T and FAB with their default 10 iterations (the original uses 100), so it
is weaker than the original; the chain with 100 iterations is the equal-strength comparison:

    pip install --no-deps torchattacks==3.5.1
    python bench/bench_attacks.py autoattack --checkpoint runs/fm-ce --eps 0.05 --n 200 \
        --json bench/results/cpu_autoattack.json [--providers drp ta-autoattack ta-chain]

Provider ``floor`` (after ``drp`` in each round) times the model passes alone that any
equal-strength run must make on the points ``drp`` leaves robust: APGD-CE's 100 and APGD-T's
9 x 100 forward+backward passes and Square's 5000 forward passes each, nothing else. It is a
lower bound on the suite's time with the model's own passes, so torchattacks' time over it is
the most any engine could be faster at equal strength.

``--engine MODULE`` times another copy of the attack package (e.g. an older revision's
``drp_kernels/attacks`` saved as a package on PYTHONPATH) as provider ``drp@MODULE``. Several
--checkpoint/--eps pairs may be given; results are appended to the JSON's "runs".
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from drp_kernels import attacks as A

EPS, ALPHA = 0.1, 0.01
SHAPES = {"cuda": dict(batch=512, steps=20), "cpu": dict(batch=64, steps=10)}


def small_cnn():
    return nn.Sequential(
        nn.Conv2d(1, 16, 4, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 4, 2, 1), nn.ReLU(), nn.Flatten(),
        nn.Linear(32 * 7 * 7, 100), nn.ReLU(), nn.Linear(100, 10))


def setup_attacks(batch, device):
    """The model and a batch of inputs in [0, 1] with labels, shared by every provider."""
    torch.manual_seed(0)
    model = small_cnn().to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)  # both providers differentiate the input only
    x = torch.rand(batch, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    return model, x, y


def eager_pgd(model, x, y, *, eps, alpha, steps, generator):
    """The plain loop (torchattacks style): random start, sign step, projection, clip."""
    x_adv = (x + (torch.rand(x.shape, generator=generator, device=x.device) * 2 - 1) * eps).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), y)
        (g,) = torch.autograd.grad(loss, x_adv)
        x_adv = x_adv.detach() + alpha * g.sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
    return x_adv


def _device(kind):
    if kind == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return torch.device(kind)


@pytest.mark.parametrize("kind", ["cuda", "cpu"])
@pytest.mark.parametrize("provider", ["drp", "eager"])
def test_pgd(benchmark, timed, provider, kind):
    device = _device(kind)
    shape = SHAPES[kind]
    model, x, y = setup_attacks(shape["batch"], device)
    steps = shape["steps"]
    if provider == "drp":
        fn = lambda: A.pgd(model, x, y, eps=EPS, alpha=ALPHA, steps=steps, seed=0)
    else:
        gen = torch.Generator(device=device)
        fn = lambda: eager_pgd(model, x, y, eps=EPS, alpha=ALPHA, steps=steps, generator=gen.manual_seed(0))
    if kind == "cpu":  # single-threaded: stable figures on a shared machine; restored afterwards
        n_threads = torch.get_num_threads()
        torch.set_num_threads(1)
    try:
        _run(benchmark, timed, fn, x, device, kind, shape, steps, provider)
    finally:
        if kind == "cpu":
            torch.set_num_threads(n_threads)


class _FixedLogits(torch.nn.Module):
    """A model that costs nothing: the same correct-class logits for every query, so Square's
    own per-query work is all that is timed and no point ever breaks."""

    def __init__(self, n, classes=10):
        super().__init__()
        self.register_buffer("z", torch.zeros(n, classes))
        self.z[:, 0] = 1.0

    def forward(self, x):
        return self.z[:x.shape[0]]


@pytest.mark.parametrize("points", [7, 30, 145])
@pytest.mark.parametrize("provider", ["fused", "pytorch"])
def test_square_query_overhead(benchmark, timed, provider, points):
    """Square's per-query bookkeeping (proposal, acceptance, random draws) on the CPU, 1 thread:
    the fused C++ ops ("fused", the default on CPU) against the same algorithm in PyTorch ops
    ("pytorch", used on other devices), 300 queries on ``points`` 1x28x28 points. The numbers
    of the Evaluation engine section of RESULTS.md (bit-identical outputs: tests/kernels/test_square_fused.py)."""
    import importlib

    from drp_kernels.ops.square import fused_ops

    sq = importlib.import_module("drp_kernels.attacks.square")
    if provider == "fused" and fused_ops() is None:
        pytest.skip("drp_kernels.ops._C without the Square ops")
    queries = 300
    x = torch.rand(points, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(points, dtype=torch.long)
    model = _FixedLogits(points)
    logits = model(x)

    keys = importlib.import_module("drp_kernels.attacks._keys").point_keys(0, torch.arange(points), 0)

    def fn():
        return sq._square(model, x, y, eps=0.05, queries=queries, p_init=0.8, keys=keys, clean_logits=logits,
                          fused=provider == "fused")

    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        timed(benchmark, fn, group=f"square-queries-cpu-k{points}", provider=provider, device=x.device,
              points=points, queries=queries)
    finally:
        torch.set_num_threads(n_threads)


def _run(benchmark, timed, fn, x, device, kind, shape, steps, provider):
    # per step: read x_adv, x, grad and write x_adv in the update (the model's traffic is not counted)
    timed(benchmark, fn, group=f"pgd-{kind}-B{shape['batch']}-steps{steps}", provider=provider, device=device,
          bytes_moved=4 * x.numel() * x.element_size() * steps, batch=shape["batch"], steps=steps)


# ------------------------------------------------------------ AutoAttack comparison
def _robust_mask(model, x_adv, x, y, eps):
    """Per point: classified correctly at x_adv, with x_adv inside the budget (else counts as robust
    only if x is, i.e. an out-of-ball point never counts as an attack success)."""
    inside = ((x_adv - x).abs().flatten(1).amax(1) <= eps + 1e-6) & (x_adv >= 0).flatten(1).all(1) & \
        (x_adv <= 1).flatten(1).all(1)
    with torch.no_grad():
        ok_adv = model(x_adv).argmax(1) == y
        ok = model(x).argmax(1) == y
    return torch.where(inside, ok_adv, ok)


def _ta_attack(kind, model, eps, n_classes):
    import torchattacks as ta

    if kind == "ta-autoattack":
        return ta.AutoAttack(model, norm="Linf", eps=eps, version="standard", n_classes=n_classes, seed=0)
    return ta.MultiAttack([
        ta.APGD(model, norm="Linf", eps=eps, steps=100, n_restarts=1, loss="ce", seed=0),
        ta.APGDT(model, norm="Linf", eps=eps, steps=100, n_restarts=1, n_classes=n_classes, seed=0),
        ta.Square(model, norm="Linf", eps=eps, n_queries=5000, n_restarts=1, p_init=0.8, seed=0),
    ])


def _provider_run(kind, model, x, y, eps, batch, engine):
    import importlib
    import time

    t0, c0 = time.perf_counter(), time.process_time()
    if kind.startswith("drp"):
        mod = importlib.import_module(engine)
        # evaluate() at one eps, as accuracy_vs_eps (the same engine path) to get the robust points
        r = mod.accuracy_vs_eps(model, x, y, eps_list=[eps], suite="standard", batch_size=batch, seed=0,
                                progress=False, checks=False, return_points=True)
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
        r0 = r["results"][0]
        return {"time_s": elapsed, "cpu_s": cpu, "robust_accuracy": r0["robust_accuracy"],
                "clean_accuracy": r["clean_accuracy"],
                "stage_times_s": {k: round(v, 3) for k, v in r0["timings"].items()},
                "per_attack": r0["per_attack"], "robust": r0["robust"]}
    n_classes = int(model(x[:1]).shape[1])
    advs = []
    with torch.random.fork_rng(devices=[]):
        for i in range(0, x.shape[0], batch):
            advs.append(_ta_attack(kind, model, eps, n_classes)(x[i:i + batch], y[i:i + batch]).detach())
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    robust = _robust_mask(model, torch.cat(advs), x, y, eps)
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean().item()
    return {"time_s": elapsed, "cpu_s": cpu, "robust_accuracy": robust.float().mean().item(),
            "clean_accuracy": clean}


def _floor_run(model, x, y, eps, batch, robust):
    """The model passes alone that any run of the standard suite at equal strength must make on the
    points it leaves robust (``robust``, from provider drp): each survives every iteration and
    query, so it costs APGD-CE's 100 forward+backward passes, APGD-T's 9 x 100 (its rows stacked
    in batches of at most ``batch``, as the engine does) and Square's 5000 forward passes, at
    points inside the ball. Nothing else (no step, proposal or bookkeeping) is timed, and the
    points the suite breaks, which cost passes too, are left out: a lower bound on the suite's
    time with these passes, whoever implements it."""
    import time

    from drp_kernels.attacks import _common as C
    from drp_kernels.attacks import SUITES

    cfg = SUITES["standard"]
    t0, c0 = time.perf_counter(), time.process_time()
    idx = robust.nonzero().squeeze(1)
    xs, ys = x[idx], y[idx]
    gen = torch.Generator().manual_seed(0)
    xa = (xs + eps * (2 * torch.rand(xs.shape, generator=gen) - 1)).clamp(0, 1)
    if idx.numel() > 0:
        for _ in range(cfg["ce_steps"]):
            C.input_grad(model, xa, ys, C.ce_loss)
        with torch.no_grad():
            top = model(xs).topk(cfg["n_targets"] + 1, dim=1).indices[:, 1:]
        rows_x = xa.repeat(cfg["n_targets"], 1, 1, 1)
        rows_y = ys.repeat(cfg["n_targets"])
        rows_t = top.t().reshape(-1)
        per = max(1, batch // idx.numel()) * idx.numel()
        for s in range(0, rows_x.shape[0], per):
            xr, yr, tr = rows_x[s:s + per], rows_y[s:s + per], rows_t[s:s + per]
            for _ in range(cfg["t_steps"]):
                C.input_grad(model, xr, yr, lambda z, yy, t=tr: C.dlr_targeted_loss(z, yy, t))
        with torch.inference_mode():
            for _ in range(cfg["square_queries"]):
                model(xa)
    return {"time_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
            "robust_accuracy": float(robust.float().mean()), "points": int(idx.numel())}


def autoattack_main(argv=None):
    import argparse
    import json
    import os
    import platform
    import time

    ap = argparse.ArgumentParser(prog="bench_attacks.py autoattack")
    ap.add_argument("--checkpoint", nargs="+", required=True, help="run folders or checkpoints (drp train)")
    ap.add_argument("--eps", type=float, nargs="+", required=True, help="one eps per checkpoint")
    ap.add_argument("--n", type=int, default=200, help="the first N test points")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=1,
                    help="time every provider this many times, interleaved (the minimum is the figure)")
    ap.add_argument("--providers", nargs="+", default=["drp", "floor", "ta-autoattack", "ta-chain"],
                    choices=["drp", "floor", "ta-autoattack", "ta-chain"],
                    help="floor: the model passes alone on the points drp leaves robust (needs drp first)")
    ap.add_argument("--engine", default=None, help="also time this attack package as provider drp@ENGINE")
    ap.add_argument("--json", required=True)
    args = ap.parse_args(argv)
    if len(args.eps) != len(args.checkpoint):
        ap.error("give one --eps per --checkpoint")
    from drp_train.checkpoint import load_checkpoint, load_classifier
    from drp_train.data import load_dataset

    torch.set_num_threads(args.threads)
    providers = [(p, "drp_kernels.attacks") for p in args.providers]
    if args.engine:
        providers.insert(1, (f"drp@{args.engine}", args.engine))
    doc = {"runs": []}
    if os.path.exists(args.json):
        with open(args.json) as f:
            doc = json.load(f)
    doc["machine"] = {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                      "threads": args.threads, "cores": os.cpu_count()}
    for ckpt, eps in zip(args.checkpoint, args.eps):
        cfg = load_checkpoint(ckpt)["config"]
        model = load_classifier(ckpt).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        x, y = load_dataset(cfg["dataset"], split="test", limit=args.n)
        x, y = x.float() / 255.0, y.long()
        name = cfg["method"] + (f"-{cfg['metric']}" if cfg["method"] == "drp" else "")
        run = {"model": name, "run": os.path.basename(os.path.normpath(ckpt)), "eps": eps, "n": args.n,
               "batch": args.batch, "threads": args.threads, "providers": {},
               "load_before": os.getloadavg(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        for _ in range(args.repeat):
            robust = None
            for kind, engine in providers:
                if kind == "floor":
                    if robust is None:
                        ap.error("provider floor needs provider drp before it")
                    res = _floor_run(model, x, y, eps, args.batch, robust)
                else:
                    res = _provider_run(kind, model, x, y, eps, args.batch, engine)
                if kind == "drp":
                    robust = res.pop("robust")
                res.pop("robust", None)
                res["load_after"] = os.getloadavg()
                prev = run["providers"].get(kind)
                times = (prev["times_s"] if prev else []) + [res["time_s"]]
                cpus = (prev["cpu_times_s"] if prev else []) + [res["cpu_s"]]
                if prev is None or res["cpu_s"] < prev["cpu_s"]:
                    run["providers"][kind] = res
                run["providers"][kind]["times_s"] = times
                run["providers"][kind]["cpu_times_s"] = cpus
                print(f"{name} eps {eps}: {kind} {res['time_s']:.1f} s wall, {res['cpu_s']:.1f} s CPU, robust "
                      f"{res['robust_accuracy']:.3f}", flush=True)
        t = {k: v["cpu_s"] for k, v in run["providers"].items()}
        run["cpu_speedup_vs"] = {k: t[k] / t["drp"] for k in t if k != "drp" and "drp" in t}
        doc["runs"].append(run)
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=2)
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    import sys

    if len(sys.argv) > 1 and sys.argv[1] == "autoattack":
        sys.exit(autoattack_main(sys.argv[2:]))
    sys.exit("usage: python bench/bench_attacks.py autoattack --checkpoint RUN --eps E --json FILE "
             "(the PGD benchmark runs under pytest)")
