"""PGD with the fused ``pgd_step_`` (provider "drp": ``drp_kernels.attacks.pgd``) against a
plain PyTorch PGD loop (provider "eager"), same small CNN, inputs and settings.

The CNN is the PAPER.md Fashion-MNIST one: conv 16 and conv 32 (4x4, stride 2), FC 100.
Shapes: CUDA batch 512 x 1 x 28 x 28 with 20 steps (target: drp >= 1.3x eager);
CPU batch 64 with 10 steps, one thread (recorded in bench/results/cpu_attacks.json).
Run: pytest bench/bench_attacks.py --benchmark-only
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


def _run(benchmark, timed, fn, x, device, kind, shape, steps, provider):
    # per step: read x_adv, x, grad and write x_adv in the update (the model's traffic is not counted)
    timed(benchmark, fn, group=f"pgd-{kind}-B{shape['batch']}-steps{steps}", provider=provider, device=device,
          bytes_moved=4 * x.numel() * x.element_size() * steps, batch=shape["batch"], steps=steps)
