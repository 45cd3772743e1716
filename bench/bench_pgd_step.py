"""Batched PGD step: the fused drp kernel vs the eager reference and torch.compile(reference).

Providers: drp (drp_kernels.pgd_step_), eager (drp_kernels.reference.pgd_step, which
also spells out the exactness rounding), compiled (torch.compile of the reference),
and the peer "plain": the textbook torch formula without the exactness rule, to show
what the rule costs an eager implementation.

Run: python -m pytest bench/bench_pgd_step.py --benchmark-only [--benchmark-json=...]
bytes_moved counts 3 reads (x_adv, x, grad) and 1 write (x_adv) of the batch.
On the CPU only B=512, 3x32x32, float32 runs (the CPU target shape); the GPU
shape list (B=512 and 4096 of 3x32x32, B=256 of 3x224x224; float32 and bfloat16)
runs on CUDA.
"""
import os

import pytest
import torch

import drp_kernels
from drp_kernels import reference
from _bench import compiled

CPU_CASES = [(512, (3, 32, 32), torch.float32)]
CUDA_CASES = [
    (b, s, dt)
    for b, s in [(512, (3, 32, 32)), (4096, (3, 32, 32)), (256, (3, 224, 224))]
    for dt in (torch.float32, torch.bfloat16)
]
if os.environ.get("DRP_BENCH_TARGETS", "0") == "1":  # make gpu-check: two shapes only
    CUDA_CASES = [(4096, (3, 32, 32), torch.float32), (256, (3, 224, 224), torch.bfloat16)]
EPS = {"linf": 8 / 255, "l2": 0.5}
ALPHA = {"linf": 2 / 255, "l2": 0.1}

_NEEDS_CUDA = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def setup_pgd_step(batch, shape, dtype, device, *, seed=0):
    """x_adv, x, grad for one step (shared by timing and memory measurement)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.rand((batch, *shape), generator=gen, device=device).to(dtype)
    x_adv = (x.float() + (torch.rand(x.shape, generator=gen, device=device) - 0.5) * 0.03).clamp(0, 1).to(dtype)
    grad = torch.randn(x.shape, generator=gen, device=device).to(dtype)
    return x_adv, x, grad


def plain_step(x_adv, x, grad, eps, alpha, *, norm):
    """Textbook PGD step in torch, without the exactness rounding (a peer, for scale)."""
    if norm == "linf":
        return torch.min(torch.max(x_adv + alpha * grad.sign(), x - eps), x + eps).clamp(0, 1)
    view = (x.shape[0],) + (1,) * (x.dim() - 1)
    g = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(view)
    delta = x_adv + alpha * g - x
    factor = (eps / delta.flatten(1).norm(dim=1)).clamp(max=1.0).view(view)
    return (x + delta * factor).clamp(0, 1)


def _cases():
    out = [pytest.param(b, s, dt, "cpu", id=f"cpu-B{b}-{'x'.join(map(str, s))}-{str(dt)[6:]}")
           for b, s, dt in CPU_CASES]
    out += [
        pytest.param(b, s, dt, "cuda", id=f"cuda-B{b}-{'x'.join(map(str, s))}-{str(dt)[6:]}", marks=_NEEDS_CUDA)
        for b, s, dt in CUDA_CASES
    ]
    return out


@pytest.mark.parametrize("provider", ["drp", "eager", "compiled", "plain"])
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("batch,shape,dtype,device", _cases())
def test_pgd_step(benchmark, timed, provider, norm, batch, shape, dtype, device):
    x_adv, x, grad = setup_pgd_step(batch, shape, dtype, device)
    eps, alpha = EPS[norm], ALPHA[norm]
    if provider == "drp":
        def fn():
            drp_kernels.pgd_step_(x_adv, x, grad, eps, alpha, norm=norm)
    elif provider == "eager":
        def fn():
            return reference.pgd_step(x_adv, x, grad, eps, alpha, norm=norm)
    elif provider == "plain":
        def fn():
            return plain_step(x_adv, x, grad, eps, alpha, norm=norm)
    else:
        # one compiled function per variant: a single one would pass dynamo's recompile limit
        step = compiled(("pgd_step", norm, batch, shape, str(dtype), device), lambda: reference.pgd_step)

        def fn():
            return step(x_adv, x, grad, eps, alpha, norm=norm)

    elem = x.element_size()
    timed(
        benchmark,
        fn,
        group=f"pgd_step-{norm}-{device}-B{batch}-{'x'.join(map(str, shape))}-{str(dtype)[6:]}",
        provider=provider,
        device=x.device,
        bytes_moved=4 * x.numel() * elem,
        flush_l2=device == "cuda",
        warmup_rounds=3 if provider == "compiled" else 1,
        rounds=None if device == "cuda" else 20,
        norm=norm,
        shape=[batch, *shape],
        dtype=str(dtype),
    )
