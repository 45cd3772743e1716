"""drp_kernels.repulsion_energy: the Triton kernels (interpreter on CPU) against the reference."""
import math

import pytest
import torch
from _helpers import DEVICE, assert_verbose_allclose, optional_hypothesis
from drp_kernels import reference, repulsion_energy
from drp_kernels.ops import _triton_utils
from drp_kernels.ops import repulsion as ops

given, settings, st, _ = optional_hypothesis()

METRICS = ("cosine", "l2", "linf")
KINDS = ("sum", "softmin")


def _inputs(C, D, *, metric, seed=0, dtype=torch.float32, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    P = torch.randn(C, D, generator=g)
    if metric == "linf":
        # clamping to the box creates exact arg-max ties (|p_ik - p_jk| = 2 in several k)
        P = (1.5 * P).clamp(-1.0, 1.0)
    return P.to(device=device, dtype=dtype)


def _energy_and_grad(fn, P, *, upstream=1.0, **kw):
    p = P.detach().clone().requires_grad_(True)
    e = fn(p, **kw)
    (e * upstream).backward()
    return e.detach(), p.grad


def _check_against_reference(P, *, metric, kind, temperature, upstream=1.0):
    kw = dict(metric=metric, kind=kind, temperature=temperature)
    e, g = _energy_and_grad(repulsion_energy, P, upstream=upstream, **kw)
    e_ref, g_ref = _energy_and_grad(reference.repulsion_energy, P.double(), upstream=upstream, **kw)
    assert e.dtype == torch.float32 and g.dtype == P.dtype and g.shape == P.shape
    assert_verbose_allclose(e, e_ref, atol=1e-5, rtol=2e-5, name=f"energy {metric}/{kind}")
    scale = g_ref.abs().max().item()
    assert_verbose_allclose(g, g_ref, atol=1e-5 * scale + 1e-6, rtol=1e-4, name=f"grad {metric}/{kind}")


@pytest.mark.parametrize("C,D", [(37, 65), (130, 17)])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("metric", METRICS)
def test_matches_reference(triton_backend, C, D, metric, kind):
    _check_against_reference(_inputs(C, D, metric=metric), metric=metric, kind=kind, temperature=0.1,
                             upstream=-2.5)


@pytest.mark.parametrize("metric", METRICS)
def test_default_temperature_and_tiny_sizes(triton_backend, metric):
    for C, D in [(2, 1), (3, 2), (17, 33)]:
        P = _inputs(C, D, metric=metric, seed=C)
        _check_against_reference(P, metric=metric, kind="softmin", temperature=0.05)
        _check_against_reference(P, metric=metric, kind="sum", temperature=0.05)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("metric", METRICS)
def test_half_precision_inputs(triton_backend, metric, dtype):
    """CCE's rule: the kernel's error against fp64 is no worse than PyTorch's at the same dtype."""
    P = _inputs(37, 65, metric=metric, dtype=dtype)
    kw = dict(metric=metric, kind="softmin", temperature=0.1)
    e, g = _energy_and_grad(repulsion_energy, P, **kw)
    e_t, g_t = _energy_and_grad(reference.repulsion_energy, P, **kw)  # PyTorch at the same dtype
    e64, g64 = _energy_and_grad(reference.repulsion_energy, P.double(), **kw)
    assert g.dtype == dtype
    err, err_t = (g.double() - g64).abs().max().item(), (g_t.double() - g64).abs().max().item()
    assert err <= err_t + 1e-3 * g64.abs().max().item(), (err, err_t)
    assert abs(e.item() - e64.item()) <= abs(e_t.item() - e64.item()) + 1e-5 * (1 + abs(e64.item()))


def test_strided_input_and_duplicate_rows(triton_backend):
    """linf/l2 read P through its strides; duplicated rows (d_ij = 0) get torch's zero subgradient."""
    base = _inputs(40, 24, metric="linf")
    base[5] = base[9]
    P = base.T.contiguous().T  # column-major (C, D) view
    assert not P.is_contiguous()
    for metric in ("linf", "l2"):
        _check_against_reference(P, metric=metric, kind="sum", temperature=0.1)
        _check_against_reference(P, metric=metric, kind="softmin", temperature=0.5)


def test_single_row_uses_reference(triton_backend):
    P = torch.randn(1, 4, device=DEVICE, requires_grad=True)
    assert repulsion_energy(P, kind="sum").item() == 0.0
    assert repulsion_energy(P, kind="softmin").item() == -math.inf


def test_reference_backend_is_the_reference(monkeypatch):
    monkeypatch.setenv("DRP_BACKEND", "reference")
    P = torch.randn(9, 5)
    for metric in METRICS:
        assert torch.equal(repulsion_energy(P, metric=metric, kind="softmin", temperature=0.2),
                           reference.repulsion_energy(P, metric=metric, kind="softmin", temperature=0.2))


def test_minimising_pushes_apart(triton_backend):
    P = torch.randn(12, 6, device=DEVICE)
    eye = torch.eye(12, dtype=torch.bool, device=DEVICE)
    for metric in METRICS:
        p = P.clone().requires_grad_(True)
        before = reference.pairwise_distance(p.detach(), metric=metric).masked_fill(eye, 9).min()
        opt = torch.optim.SGD([p], lr=0.02)
        for _ in range(5):
            opt.zero_grad()
            repulsion_energy(p, metric=metric, kind="softmin", temperature=0.1).backward()
            opt.step()
        after = reference.pairwise_distance(p.detach(), metric=metric).masked_fill(eye, 9).min()
        assert after > before, metric


@pytest.mark.parametrize("bad,err", [
    (dict(P=torch.randn(5)), "2-D"),
    (dict(P=torch.randn(2, 3, 4)), "2-D"),
    (dict(P=torch.ones(4, 3, dtype=torch.int64)), "floating"),
    (dict(P=torch.randn(4, 0)), "dim >= 1"),
    (dict(metric="l1"), "metric"),
    (dict(kind="max"), "kind"),
    (dict(temperature=0.0), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
])
def test_bad_input(bad, err):
    kw = dict(P=torch.randn(4, 3), metric="cosine", kind="softmin", temperature=0.1)
    kw.update(bad)
    P = kw.pop("P")
    with pytest.raises(TypeError if err == "torch.Tensor" else ValueError, match=err):  # wrong type: TypeError
        repulsion_energy(P, **kw)


def test_bad_input_type():
    """A wrong type is a TypeError (the package's policy), naming the argument."""
    with pytest.raises(TypeError, match="P must be a torch.Tensor"):
        repulsion_energy([[0.0, 1.0]], metric="cosine", kind="softmin", temperature=0.1)


def test_fp32_dot_precision_follows_torch():
    """fp32 tl.dot precision is torch's float32 matmul precision (no environment variable)."""
    old = torch.get_float32_matmul_precision()
    try:
        for setting, expected in (("highest", "ieee"), ("high", "tf32"), ("medium", "tf32")):
            torch.set_float32_matmul_precision(setting)
            assert _triton_utils.fp32_dot_precision() == expected, setting
            # the interpreter (CPU tensors) always computes in IEEE fp32
            assert _triton_utils.dot_precision_for(torch.empty(1)) == "ieee"
    finally:
        torch.set_float32_matmul_precision(old)


@pytest.mark.parametrize("metric,kind", [("cosine", "softmin"), ("linf", "sum"), ("l2", "softmin")])
def test_opcheck(metric, kind):
    x = torch.randn(9, 5, device=DEVICE)
    if metric == "cosine":
        x = x / x.norm(dim=1, keepdim=True)
    torch.library.opcheck(torch.ops.drp.repulsion_fwd, (x.requires_grad_(True), metric, kind, 0.3))
    _e, row = torch.ops.drp.repulsion_fwd(x.detach(), metric, kind, 0.3)
    torch.library.opcheck(torch.ops.drp.repulsion_bwd, (torch.tensor(1.5, device=DEVICE), x.detach(), row, metric,
                                                         kind, 0.3))


def test_torch_compile_fullgraph(triton_backend):
    P = _inputs(21, 10, metric="cosine")
    backend = "inductor" if torch.cuda.is_available() else "aot_eager"

    def loss(p):
        return 2.0 * repulsion_energy(p, metric="cosine", kind="softmin", temperature=0.1) + p.square().sum()

    compiled = torch.compile(loss, fullgraph=True, backend=backend)
    p1 = P.clone().requires_grad_(True)
    e1 = compiled(p1)
    e1.backward()
    p2 = P.double().requires_grad_(True)
    e2 = 2.0 * reference.repulsion_energy(p2, metric="cosine", kind="softmin", temperature=0.1) + p2.square().sum()
    e2.backward()
    assert_verbose_allclose(e1, e2, atol=1e-5, rtol=1e-5, name="compiled energy")
    assert_verbose_allclose(p1.grad, p2.grad, atol=1e-5, rtol=1e-4, name="compiled grad")


@pytest.mark.parametrize("C,temperature,seed,kind", [(8, 1.68, 32890, "sum"), (12, 1.16, 54317, "sum"),
                                                      (7, 0.16, 4709, "softmin"), (10, 1.84, 12225, "softmin")])
def test_cosine_one_dimension_gradient_is_zero(triton_backend, C, temperature, seed, kind):
    """At D = 1 every cosine is +-1, the energy is constant and its gradient exactly 0. The rows
    used to be normalised in fp32, whose projection onto the sphere left up to 3.8e-6 here (rows
    with |p| ~ 0.05); found by the property test below. Now the gradient is 0 to fp64 rounding."""
    P = _inputs(C, 1, metric="cosine", seed=seed)
    _e, g = _energy_and_grad(repulsion_energy, P, metric="cosine", kind=kind, temperature=temperature)
    assert g.abs().max().item() <= 1e-12
    _check_against_reference(P, metric="cosine", kind=kind, temperature=temperature)


# derandomize: CI runs the same 20 examples every time, so a run is reproducible (a random search
# once hit D=1 cosine, now fixed and pinned above; 1600 random examples pass)
@settings(max_examples=20, deadline=None, derandomize=True)
@given(C=st.integers(2, 12), D=st.integers(1, 9), metric=st.sampled_from(METRICS), kind=st.sampled_from(KINDS),
       temperature=st.floats(0.05, 2.0), seed=st.integers(0, 2**16))
def test_property_matches_reference(C, D, metric, kind, temperature, seed):
    # hypothesis does not mix with function-scoped fixtures, so set the backend by hand
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DRP_BACKEND", "triton")
        _check_against_reference(_inputs(C, D, metric=metric, seed=seed), metric=metric, kind=kind,
                                 temperature=temperature)


# ------------------------------------------------------------------------------ CUDA only
@pytest.mark.cuda
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("metric", METRICS)
def test_cuda_matches_reference(metric, kind):
    P = _inputs(600, 130, metric=metric, device="cuda")
    _check_against_reference(P, metric=metric, kind=kind, temperature=0.1)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_inputs(dtype):
    for metric in METRICS:
        P = _inputs(300, 200, metric=metric, dtype=dtype, device="cuda")
        kw = dict(metric=metric, kind="softmin", temperature=0.1)
        _e, g = _energy_and_grad(repulsion_energy, P, **kw)
        _e, g_t = _energy_and_grad(reference.repulsion_energy, P, **kw)
        _e, g64 = _energy_and_grad(reference.repulsion_energy, P.double(), **kw)
        err, err_t = (g.double() - g64).abs().max().item(), (g_t.double() - g64).abs().max().item()
        assert err <= err_t + 1e-3 * g64.abs().max().item(), (metric, err, err_t)


@pytest.mark.cuda
def test_cuda_memory_is_linear():
    """Cosine softmin energy + gradient at C=50000, D=128 never allocates anything C x C."""
    C, D = 50_000, 128
    P = torch.randn(C, D, device="cuda", requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    repulsion_energy(P, metric="cosine", kind="softmin").backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert peak < 8 * C * D * 4, peak  # a C x C fp32 matrix alone would be 10 GB
    assert torch.isfinite(P.grad).all()


@pytest.mark.cuda
def test_cuda_int64_offsets():
    """Row offsets i * stride_c beyond 2**31: a strided fp16 view whose rows lie 2**20 elements apart.

    C * D itself stays small (C x C x D work is quadratic, so C * D > 2**31 is impractical to run),
    but the address arithmetic of the linf/l2 kernels is exercised past int32 (about 4.4 GB buffer).
    """
    C, D, stride = 2100, 24, 2**20 + 7
    assert (C - 1) * stride > 2**31
    buf = torch.zeros(C * stride, device="cuda", dtype=torch.float16)
    P = buf.as_strided((C, D), (stride, 1))
    P.copy_(_inputs(C, D, metric="linf", device="cuda", dtype=torch.float16))
    for metric in ("linf", "l2"):
        kw = dict(metric=metric, kind="softmin", temperature=0.1)
        e = repulsion_energy(P, **kw)
        e_ref = reference.repulsion_energy(P.contiguous(), **kw)
        assert_verbose_allclose(e, e_ref, atol=1e-4, rtol=1e-4, name=f"int64 energy {metric}")
        row = ops.repulsion_forward(P, metric=metric, kind="softmin", temperature=0.1)
        g = ops.repulsion_backward(torch.tensor(1.0, device="cuda"), P, row, metric=metric, kind="softmin",
                                   temperature=0.1)
        _e, g_ref = _energy_and_grad(reference.repulsion_energy, P.contiguous().float(), **kw)
        assert_verbose_allclose(g.float(), g_ref, atol=1e-3 * g_ref.abs().max().item(), rtol=1e-2,
                                name=f"int64 grad {metric}")
    del buf
