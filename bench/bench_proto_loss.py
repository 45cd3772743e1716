"""Benchmarks of ProtoLoss / proto_logits.

Providers (grouped per op + shape + mode):
  drp       drp_kernels.proto_loss / proto_logits with automatic dispatch (Triton on CUDA,
            the reference on CPU; ``extra_info["backend"]`` says which ran)
  eager     drp_kernels.reference (materialises B x C x D for the distances)
  compiled  torch.compile(reference)
  gather    (loss-only) the gathered PyTorch a careful user writes: d(z, P[y]), eager
  cdist     (linf logits) -torch.cdist(z, P, p=inf)
  matmul    (cosine) one cuBLAS matmul z @ P.T of the same shape (the CE target compares to it)

Targets (CUDA, H100): loss-only linf fwd+bwd B=8192 D=512 C=1000 >= 5x eager and >= 2x
compiled; fused cosine CE B=4096 D=512 C=100000 with peak memory <= 10% of one B x C fp32
matrix and forward <= 1.5x one matmul; linf logits B=4096 C=4096 D=512 >= 10x cdist.
On the CPU small shapes stand in so the file runs in a couple of minutes. Out-of-memory (e.g.
the eager linf-logits backward at B4096 C4096 D512, about 160 GiB) is a recorded skip
(bench/conftest.py).
"""
import os

import pytest
import torch
import torch._functorch.config
import torch.nn.functional as F

import drp_kernels
from drp_kernels import reference
from drp_kernels._backend import backend_for
from _bench import compiled

ON_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_CUDA else "cpu")
MODES = ["fwd", "bwd", "fwd+bwd"]

# (case, metric, ce_weight, CUDA shape (B, D, C), CPU shape, providers)
CASES = [
    ("loss-linf", "linf", 0.0, (8192, 512, 1000), (512, 128, 100), ["drp", "eager", "compiled", "gather"]),
    ("ce-cosine", "cosine", 1.0, (4096, 512, 100000), (256, 64, 1000), ["drp", "eager", "compiled", "matmul"]),
    ("logits-linf", "linf", None, (4096, 512, 4096), (256, 64, 256), ["drp", "eager", "compiled", "cdist"]),
]
# the bwd mode re-runs one backward with retain_graph=True, which AOTAutograd's donated
# buffers forbid; they only save memory, so they are switched off for these benchmarks
torch._functorch.config.donated_buffer = False


# DRP_BENCH_TARGETS=1 (make gpu-check): drp in every mode, the other providers only where a target
# compares with them
TARGETS_ONLY = os.environ.get("DRP_BENCH_TARGETS", "0") == "1"
TARGET_RUNS = {("loss-linf", "fwd+bwd", "eager"), ("loss-linf", "fwd+bwd", "compiled"),
               ("loss-linf", "fwd+bwd", "gather"), ("ce-cosine", "fwd", "matmul"),
               ("logits-linf", "fwd", "cdist"), ("logits-linf", "fwd", "eager")}


def setup_proto_loss(b, d, c, *, dtype=torch.float32, device=DEVICE, seed=0):
    """Inputs shared by timing and memory measurement: z (B, D) requiring grad, P (C, D), y (B,)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    z = torch.randn(b, d, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    p = torch.randn(c, d, generator=g).to(device=device, dtype=dtype)
    y = torch.randint(0, c, (b,), generator=g).to(device)
    return {"z": z, "p": p, "y": y}


def _gathered_loss(z, p, y, *, metric):
    zf, pf = z.float(), p[y].float()
    if metric == "linf":
        return (zf - pf).abs().amax(dim=1).mean()
    if metric == "l2":
        return torch.linalg.vector_norm(zf - pf, dim=1).mean()
    return (1.0 - F.cosine_similarity(zf, pf, dim=1, eps=1e-8)).mean()


def _forward_fn(case, metric, ce_weight, provider, inp, variant):
    z, p, y = inp["z"], inp["p"], inp["y"]
    if case == "logits-linf":
        ref = lambda: reference.proto_logits(z, p, metric=metric)
        if provider == "drp":
            return lambda: drp_kernels.proto_logits(z, p, metric=metric)
        if provider == "cdist":
            return lambda: -torch.cdist(z.float(), p.float(), p=float("inf"))
    else:
        ref = lambda: reference.proto_loss(z, p, y, metric=metric, ce_weight=ce_weight)
        if provider == "drp":
            return lambda: drp_kernels.proto_loss(z, p, y, metric=metric, ce_weight=ce_weight)
        if provider == "gather":
            return lambda: _gathered_loss(z, p, y, metric=metric)
        if provider == "matmul":
            return lambda: z @ p.t()
    if provider == "eager":
        return ref
    if provider == "compiled":
        if case == "logits-linf":
            fn = compiled(variant, lambda: lambda z, p: reference.proto_logits(z, p, metric=metric))
            return lambda: fn(z, p)
        fn = compiled(variant, lambda: lambda z, p, y: reference.proto_loss(z, p, y, metric=metric,
                                                                              ce_weight=ce_weight))
        return lambda: fn(z, p, y)
    raise ValueError(provider)


def _reference_too_big(provider, b, d, c):
    """The reference holds a few B x C x D fp32 tensors (more in the backward)."""
    if provider not in ("eager", "compiled") or not ON_CUDA:
        return False
    total = torch.cuda.get_device_properties(DEVICE).total_memory
    return 3 * b * c * d * 4 > 0.8 * total


def _params():
    out = []
    for case, metric, ce, cuda_shape, cpu_shape, providers in CASES:
        b, d, c = cuda_shape if ON_CUDA else cpu_shape
        for mode in MODES:
            for provider in providers:
                if TARGETS_ONLY and provider != "drp" and (case, mode, provider) not in TARGET_RUNS:
                    continue
                out.append(pytest.param(case, metric, ce, b, d, c, mode, provider,
                                        id=f"{case}-B{b}-D{d}-C{c}-{mode}-{provider}"))
    return out


@pytest.mark.parametrize("case,metric,ce_weight,b,d,c,mode,provider", _params())
def test_bench_proto_loss(benchmark, timed, case, metric, ce_weight, b, d, c, mode, provider):
    if _reference_too_big(provider, b, d, c):
        pytest.skip("the reference needs several B x C x D fp32 tensors: more than this GPU holds")
    dtype = torch.bfloat16 if (case == "ce-cosine" and ON_CUDA) else torch.float32
    inp = setup_proto_loss(b, d, c, dtype=dtype)
    fwd = _forward_fn(case, metric, ce_weight, provider, inp, (case, b, d, c, str(dtype), mode))
    z = inp["z"]

    def grad_of(out):
        return torch.ones_like(out)

    if mode == "fwd":
        def fn():
            with torch.no_grad():
                fwd()
    elif mode == "fwd+bwd":
        def fn():
            z.grad = None
            out = fwd()
            out.backward(grad_of(out))
    else:
        out = fwd()
        g = grad_of(out)

        def fn():
            z.grad = None
            out.backward(g, retain_graph=True)

    elt = z.element_size()
    if case == "loss-linf":
        bytes_moved = b * d * elt * (2 if mode == "fwd" else 5) + b * 12
        info = dict(bytes_moved=bytes_moved, flush_l2=True)
    elif case == "ce-cosine":
        mult = {"fwd": 2, "bwd": 6, "fwd+bwd": 8}[mode]
        info = dict(flops=mult * b * c * d, flops_kind="bf16_tflops" if dtype == torch.bfloat16 else "fp32_tflops")
    else:
        mult = {"fwd": 3, "bwd": 6, "fwd+bwd": 9}[mode]  # sub, abs, max per (b, c, k) element
        info = dict(flops=mult * b * c * d)
    backend = backend_for(z) if provider == "drp" else "torch"
    timed(benchmark, fn, group=f"proto_loss-{case}-B{b}-D{d}-C{c}-{mode}", provider=provider, device=DEVICE,
          backend=backend, shape=dict(B=b, D=d, C=c), dtype=str(dtype), metric=metric, mode=mode,
          bxc_fp32_bytes=b * c * 4, **info)
