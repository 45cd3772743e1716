"""Benchmarks of the all-pairs repulsion energy.

Providers (grouped per metric + kind + shape + mode):
  drp       drp_kernels.repulsion_energy on the fused Triton kernels (memory O(C*D)); on a CPU-only
            machine it runs under the Triton interpreter at a tiny shape (``extra_info["backend"]``)
  eager     drp_kernels.reference.repulsion_energy (materialises C x C x D)
  compiled  torch.compile(reference)
  matmul    (cosine) the two C x C x D matmuls the energy + gradient imply, S = N N^T and S N,
            in row chunks so the C x C matrix never exists at once (the target's yardstick)
  pdist     (linf) energy from torch.nn.functional.pdist(P, p=inf) (C(C-1)/2 distances), autograd

Modes: "fwd" (energy) and "fwd+bwd" (energy and gradient w.r.t. P).
Targets (CUDA, H100): cosine softmin fwd+bwd C=100000 D=512 at most 3x ``matmul`` with
memory O(C*D) (the reference cannot fit: eager/compiled are skipped); linf fwd+bwd C=20000 D=512
at least 20x ``pdist`` where it fits. Providers whose memory would not fit are skipped; the peak
memory of each provider that runs is in ``extra_info["peak_memory_bytes"]``.
A separate group times prototype generation C=100, D=500 (the "under a minute" figure).
The cosine cases run with ``torch.set_float32_matmul_precision("high")``: the kernel's fp32 dots then
use TF32, and so does the ``matmul`` yardstick it is compared with.
"""
import math
import os

import pytest
import torch
import torch.nn.functional as F

import drp_kernels
from drp_kernels import reference
from _bench import compiled

ON_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_CUDA else "cpu")
MODES = ["fwd", "fwd+bwd"]
TEMPERATURE = 0.05

# (metric, kind, CUDA shape (C, D), CPU shape, providers)
CASES = [
    ("cosine", "softmin", (100_000, 512), (256, 64), ["drp", "eager", "compiled", "matmul"]),
    ("cosine", "softmin", (8192, 512), None, ["drp", "eager", "compiled", "matmul"]),
    ("linf", "sum", (20_000, 512), (256, 64), ["drp", "eager", "compiled", "pdist"]),
    ("linf", "softmin", (20_000, 512), (256, 64), ["drp", "eager", "compiled", "pdist"]),
    ("l2", "softmin", (8192, 256), (256, 64), ["drp", "eager", "compiled"]),
]
# DRP_BENCH_TARGETS=1 (make gpu-check): only the two target cases, and the yardsticks they name
TARGETS_ONLY = os.environ.get("DRP_BENCH_TARGETS", "0") == "1"
TARGET_CASES = {("cosine", "softmin", (100_000, 512)): ("drp", "matmul"),
                ("linf", "sum", (20_000, 512)): ("drp", "pdist")}
CPU_DRP_SHAPE = (64, 32)  # the Triton interpreter is slow: a tiny shape only


def setup_repulsion(c, d, *, dtype=torch.float32, device=DEVICE, seed=0):
    """P (C, D) requiring grad, shared by timing and memory measurement."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(c, d, generator=g).to(device=device, dtype=dtype).requires_grad_(True)


def _reference_bytes(c, d, mode):
    """Rough peak of the broadcast reference: a few C x C x D fp32 temporaries."""
    return c * c * d * 4 * (2 if mode == "fwd" else 4)


def _fits(nbytes):
    if not ON_CUDA:
        return nbytes < 4 * 2**30
    free, _total = torch.cuda.mem_get_info()
    return nbytes < 0.8 * free


def _pdist_energy(p, kind):
    pd = F.pdist(p.float(), p=math.inf)  # i < j only
    if kind == "sum":
        return -pd.sum()
    # ordered pairs i != j count every unordered pair twice
    return TEMPERATURE * (torch.logsumexp(-pd / TEMPERATURE, dim=0) + math.log(2.0))


def _matmul_pair(p, chunk):
    """The two C x C x D matmuls (S = N N^T, then S N), chunked over rows; returns the (C, D) product."""
    n = p.detach()
    out = torch.empty_like(n)
    for r0 in range(0, n.shape[0], chunk):
        s = n[r0:r0 + chunk] @ n.T
        out[r0:r0 + chunk] = s @ n
    return out


def _energy_fn(metric, kind, provider, p, mode):
    kw = dict(metric=metric, kind=kind, temperature=TEMPERATURE)
    if provider == "drp":
        return lambda: drp_kernels.repulsion_energy(p, **kw)
    if provider == "eager":
        return lambda: reference.repulsion_energy(p, **kw)
    if provider == "compiled":
        f = compiled(("repulsion", metric, kind, tuple(p.shape), mode),
                     lambda: lambda q: reference.repulsion_energy(q, **kw))
        return lambda: f(p)
    if provider == "pdist":
        return lambda: _pdist_energy(p, kind)
    raise ValueError(provider)


def _params():
    out = []
    for metric, kind, cuda_shape, cpu_shape, providers in CASES:
        shape = cuda_shape if ON_CUDA else cpu_shape
        if shape is None:
            continue
        if TARGETS_ONLY:
            providers = TARGET_CASES.get((metric, kind, cuda_shape), ())
        for provider in providers:
            if provider == "drp" and not ON_CUDA:
                shape = CPU_DRP_SHAPE  # the Triton interpreter is slow: a tiny shape only
            else:
                shape = cuda_shape if ON_CUDA else cpu_shape
            for mode in MODES:
                if provider == "matmul" and mode == "fwd":
                    continue  # the yardstick is the pair of matmuls of energy + gradient
                out.append(pytest.param(metric, kind, shape, provider, mode,
                                        id=f"{metric}-{kind}-C{shape[0]}-D{shape[1]}-{provider}-{mode}"))
    return out


@pytest.fixture
def matmul_precision():
    """Set torch's float32 matmul precision for one benchmark; restored afterwards."""
    old = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(old)


@pytest.mark.parametrize("metric,kind,shape,provider,mode", _params())
def test_repulsion(benchmark, timed, monkeypatch, matmul_precision, metric, kind, shape, provider, mode):
    c, d = shape
    info = {}
    if metric == "cosine":
        # TF32 for the kernel's fp32 dots and for the matmul yardstick alike
        matmul_precision("high")
        info["float32_matmul_precision"] = "high"
    if provider == "drp" and not ON_CUDA:
        monkeypatch.setenv("DRP_BACKEND", "triton")  # interpreter (TRITON_INTERPRET set by conftest)
        info["backend"] = "triton-interpreter"
    elif provider == "drp":
        info["backend"] = "triton"
    if provider in ("eager", "compiled") and not _fits(_reference_bytes(c, d, mode)):
        pytest.skip(f"the reference needs about {_reference_bytes(c, d, mode) / 2**30:.0f} GiB at C={c}, D={d}")
    if provider == "pdist" and not _fits(c * (c - 1) // 2 * 4 * (2 if mode == "fwd" else 6)):
        pytest.skip(f"pdist does not fit at C={c}")
    p = setup_repulsion(c, d)
    group = f"repulsion-{metric}-{kind}-C{c}-D{d}-{mode}"
    pairs = c * (c - 1)
    flops = 2 * pairs * d * (1 if mode == "fwd" else 3)  # every ordered pair; bwd recomputes + gathers
    if provider == "matmul":
        chunk = max(1, min(c, (2 * 2**30) // (4 * c)))
        n = F.normalize(p.detach(), dim=1)
        fn = lambda: _matmul_pair(n, chunk)  # noqa: E731
        flops = 4 * c * c * d
    else:
        energy = _energy_fn(metric, kind, provider, p, mode)
        if mode == "fwd":
            def fn():
                with torch.no_grad():
                    return energy()
        else:
            def fn():
                p.grad = None
                energy().backward()
    try:
        timed(benchmark, fn, group=group, provider=provider, device=p.device, flops=flops,
              flops_kind="tf32_tflops" if metric == "cosine" else "fp32_tflops",
              rounds=None if ON_CUDA else 3, C=c, D=d, metric=metric, kind=kind, mode=mode, **info)
    except torch.OutOfMemoryError:
        pytest.skip(f"{provider} ran out of memory at C={c}, D={d}")


@pytest.mark.parametrize("metric", ["cosine"])
def test_generation(benchmark, timed, metric):
    """Default-method prototype generation, C=100, D=500 (1000 steps)."""
    device = DEVICE

    def fn():
        return drp_kernels.repulsive_prototypes(100, 500, metric=metric, device=device)

    timed(benchmark, fn, group=f"generation-C100-D500-{metric}", provider="drp", device=device, rounds=1,
          warmup_rounds=0, metric=metric, backend="triton" if ON_CUDA else "reference (cpu fast path)",
          threads=torch.get_num_threads(), load_average=os.getloadavg()[0])
