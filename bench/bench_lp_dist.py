"""Benchmarks of lp_dist, the all-pairs lp distance (the LpDist layer's op).

Providers (grouped per p + shape + mode):
  drp       drp_kernels.lp_dist (the C++ kernels on CPU, Triton on CUDA)
  eager     drp_kernels.reference.lp_dist (explicit B x N x D broadcast)
  compiled  torch.compile(reference.lp_dist)
  cdist     torch.cdist(x, w, p=p)

Modes: ``fwd`` (no gradient: at p = inf no arg-max index is tracked), ``fwd+stats`` (the forward
of a call that needs a gradient: p = inf tracks the arg-max, finite p saves inv and r) and
``fwd+bwd``.

Targets (benchmarks, not tests):
  CPU, 2 threads (torch.set_num_threads(2) here), B512 N1024 D784 fp32, fwd+bwd:
    drp >= 3x cdist at p = inf, >= 40x cdist at p = 8, >= 1x compiled;
    p = inf fwd >= 1.3x faster than fwd+stats.
  CPU memory: fwd+bwd at B512 N4096 D784 grows peak RSS by < 1.5 GiB (measured in a fresh
    subprocess from /proc/self/status VmHWM; B x N x D in fp32 would be 6.1 GiB).
  CUDA: >= 50% of the FP32 peak at B4096 N4096 D1024, p = inf (3 flops per (b, n, k): sub, abs,
    max; cuda-only, skipped on a CPU machine).
The eager / compiled reference needs several B x N x D tensors; where the estimate exceeds the
free memory the benchmark raises OutOfMemoryError, which bench/conftest.py records as a skip.
"""
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch._functorch.config

import drp_kernels
from drp_kernels import reference
from _bench import compiled

ON_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_CUDA else "cpu")
CPU_THREADS = 2
MODES = ["fwd", "fwd+stats", "fwd+bwd"]
PROVIDERS = ["drp", "eager", "compiled", "cdist"]
# (B, N, D, p) timed on this device; the large-p cases with the kernels and cdist only
CPU_CASES = [(512, 1024, 784, math.inf), (512, 1024, 784, 8.0)]
CPU_LARGE_P = [(512, 1024, 784, 64.0), (512, 1024, 784, 1000.0)]
CUDA_CASES = [(4096, 4096, 1024, math.inf), (512, 1024, 784, math.inf), (512, 1024, 784, 8.0)]
MEMORY_CASE = (512, 4096, 784)
MEMORY_LIMIT_BYTES = int(1.5 * 2 ** 30)
torch._functorch.config.donated_buffer = False

if not ON_CUDA:
    torch.set_num_threads(CPU_THREADS)


def setup_lp_dist(b, n, d, *, dtype=torch.float32, device=DEVICE, seed=0):
    """Inputs shared by timing and memory measurement: x (B, D) and w (N, D), both requiring grad."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(b, d, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    w = torch.randn(n, d, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    return {"x": x, "w": w}


def _available_bytes():
    if ON_CUDA:
        free, _ = torch.cuda.mem_get_info(DEVICE)
        return free
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


def _estimate_bytes(provider, b, n, d, p, mode):
    """Peak of the B x N x D temporaries of a provider (fp32), as measured at B128 N256 D784."""
    bnd = b * n * d * 4
    if provider == "eager":
        return bnd * ((2 if p == math.inf else 3) + ((2 if p == math.inf else 4) if mode == "fwd+bwd" else 0))
    if provider == "compiled":
        return bnd * (1.5 if mode == "fwd+bwd" else 1)
    return 0


def _forward_fn(provider, p, x, w, variant):
    if provider == "drp":
        return lambda: drp_kernels.lp_dist(x, w, p=p)
    if provider == "eager":
        return lambda: reference.lp_dist(x, w, p)
    if provider == "compiled":
        fn = compiled(variant, lambda: lambda a, b: reference.lp_dist(a, b, p))
        return lambda: fn(x, w)
    if provider == "cdist":
        return lambda: torch.cdist(x, w, p=p)
    raise ValueError(provider)


def _params():
    out = []
    cases = [(c, PROVIDERS) for c in (CUDA_CASES if ON_CUDA else CPU_CASES)]
    cases += [] if ON_CUDA else [(c, ["drp", "cdist"]) for c in CPU_LARGE_P]
    for (b, n, d, p), providers in cases:
        for mode in MODES:
            for provider in providers:
                if mode == "fwd+stats" and provider != "drp":
                    continue  # only the kernels' forward depends on whether a gradient follows
                out.append(pytest.param(b, n, d, p, mode, provider, id=f"p{p}-B{b}-N{n}-D{d}-{mode}-{provider}"))
    out.append(pytest.param(4096, 4096, 1024, math.inf, "fwd", "drp", id="gpu-target-p-inf-B4096-N4096-D1024-fwd",
                            marks=pytest.mark.skipif(not ON_CUDA, reason="GPU target shape: CUDA only")))
    return out


@pytest.mark.parametrize("b,n,d,p,mode,provider", _params())
def test_bench_lp_dist(benchmark, timed, b, n, d, p, mode, provider):
    need = _estimate_bytes(provider, b, n, d, p, mode)
    avail = _available_bytes()
    if need and avail is not None and need > 0.5 * avail:
        raise torch.OutOfMemoryError(f"{provider} needs about {need / 2**30:.1f} GiB of B x N x D temporaries, "
                                     f"{avail / 2**30:.1f} GiB available")
    inp = setup_lp_dist(b, n, d)
    x, w = inp["x"], inp["w"]
    fwd = _forward_fn(provider, p, x, w, (b, n, d, p, mode))
    if mode == "fwd":
        def fn():
            with torch.no_grad():
                fwd()
    elif mode == "fwd+stats":
        def fn():
            fwd()
    else:
        def fn():
            x.grad = None
            w.grad = None
            out = fwd()
            out.backward(torch.ones_like(out))
    flops = (3 if p == math.inf else 8) * b * n * d * (2 if mode == "fwd+bwd" else 1)
    slow = not ON_CUDA and provider in ("eager", "compiled", "cdist")
    timed(benchmark, fn, group=f"lp_dist-p{p}-B{b}-N{n}-D{d}-{mode}", provider=provider, device=DEVICE,
          flops=flops, rounds=3 if slow else None, shape=dict(B=b, N=n, D=d), p=p, mode=mode,
          threads=torch.get_num_threads() if not ON_CUDA else None, load_avg_1min=os.getloadavg()[0],
          backend=("cpp" if not ON_CUDA else "triton") if provider == "drp" else "torch")


_MEMORY_CHILD = textwrap.dedent("""
    import json, math, sys, torch
    import drp_kernels
    torch.set_num_threads({threads})

    def vm(key):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024

    g = torch.Generator().manual_seed(0)
    x = torch.randn({b}, {d}, generator=g).requires_grad_(True)
    w = torch.randn({n}, {d}, generator=g).requires_grad_(True)
    before = vm("VmRSS")
    out = drp_kernels.lp_dist(x, w, p={p})
    out.backward(torch.ones_like(out))
    print(json.dumps({{"rss_before": before, "hwm_after": vm("VmHWM"),
                      "out_bytes": out.numel() * out.element_size()}}))
""")


@pytest.mark.skipif(ON_CUDA, reason="the RSS check is the CPU memory target")
@pytest.mark.parametrize("p", [math.inf, 8.0])
def test_bench_lp_dist_peak_rss(benchmark, p):
    """fwd+bwd at B512 N4096 D784 in a fresh process: peak RSS growth over the inputs."""
    b, n, d = MEMORY_CASE
    code = _MEMORY_CHILD.format(threads=CPU_THREADS, b=b, n=n, d=d, p=repr(p) if p != math.inf else "math.inf")
    res = {}

    def run():
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1800,
                              env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-2000:])
        res.update(json.loads(proc.stdout.strip().splitlines()[-1]))

    benchmark.group = f"lp_dist-memory-p{p}-B{b}-N{n}-D{d}-fwd+bwd"
    benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    growth = res["hwm_after"] - res["rss_before"]
    extra = benchmark.extra_info
    extra.update(provider="drp", p=p, shape=dict(B=b, N=n, D=d), mode="fwd+bwd", threads=CPU_THREADS,
                 load_avg_1min=os.getloadavg()[0],
                 peak_rss_growth_bytes=growth, limit_bytes=MEMORY_LIMIT_BYTES,
                 bxnxd_fp32_bytes=b * n * d * 4, target_met=growth < MEMORY_LIMIT_BYTES, **res)
