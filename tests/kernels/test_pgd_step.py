"""Batched PGD step and random start against drp_kernels.reference, plus the
exactness properties (outputs inside the eps ball and [lower, upper])."""
import math

import pytest
import torch

import drp_kernels
from _helpers import assert_verbose_allclose, optional_hypothesis
from drp_kernels import reference
from drp_kernels.ops import _extension

given, settings, st, HealthCheck = optional_hypothesis()

pytestmark = pytest.mark.skipif(not _extension.available(), reason="drp_kernels.ops._C not built")

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# l2 results differ from the reference only through the order of the norm sums:
# a few fp32 ulps, which a 16-bit rounding can turn into one ulp of the output.
L2_TOL = {torch.float32: 2e-6, torch.float64: 1e-12, torch.float16: 1e-3, torch.bfloat16: 8e-3}
SHAPES = [(4, 3, 8, 8), (37, 130), (1, 5), (3, 1, 7, 5), (2, 3, 2, 2, 3)]


def make(shape, dtype, *, device="cpu", seed=0, zero_frac=0.1, spread=0.1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=gen)
    x_adv = (x + (torch.rand(shape, generator=gen) - 0.5) * 2 * spread).clamp(0, 1)
    grad = torch.randn(shape, generator=gen)
    grad[torch.rand(shape, generator=gen) < zero_frac] = 0.0
    return [t.to(device=device, dtype=dtype) for t in (x_adv, x, grad)]


def budgets(kind, batch, value, *, device="cpu", seed=1):
    if kind == "float":
        return value
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(batch, generator=gen) * 2 * value).to(device)


def run_both(x_adv, x, grad, eps, alpha, **kw):
    expected = reference.pgd_step(x_adv, x, grad, eps, alpha, **kw)
    out = x_adv.clone()
    ret = drp_kernels.pgd_step_(out, x, grad, eps, alpha, **kw)
    assert ret is out
    return out, expected


def assert_in_ball(out, x, eps, *, norm, lower, upper):
    """Exact checks in float64 (exact for these dtypes) against the caller's values."""
    o, xd = out.double(), x.double()
    b = x.shape[0]
    e = eps.double().reshape(b) if isinstance(eps, torch.Tensor) else torch.full((b,), float(eps), dtype=torch.float64)
    assert bool((o >= lower).all()) and bool((o <= upper).all()), "outside [lower, upper]"
    diff = (o - xd).reshape(b, -1)
    if norm == "linf":
        worst = (diff.abs() - e[:, None]).max().item() if diff.numel() else 0.0
        assert worst <= 0.0, f"outside the linf ball by {worst}"
    else:
        nrm = torch.linalg.vector_norm(diff, dim=1)
        assert bool((nrm <= e * (1 + 1e-6)).all()), f"outside the l2 ball: {(nrm - e).max().item()}"


# ------------------------------------------------------------------ pgd_step_ vs reference
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("eps_kind,alpha_kind",
                         [("float", "float"), ("tensor", "float"), ("float", "tensor"), ("tensor", "tensor")])
def test_linf_matches_reference_bitwise(dtype, shape, eps_kind, alpha_kind):
    x_adv, x, grad = make(shape, dtype)
    eps = budgets(eps_kind, shape[0], 0.05)
    alpha = budgets(alpha_kind, shape[0], 0.02, seed=2)
    out, expected = run_both(x_adv, x, grad, eps, alpha, norm="linf")
    assert_verbose_allclose(out, expected, atol=0, rtol=0, name="linf")
    assert_in_ball(out, x, eps, norm="linf", lower=0.0, upper=1.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("eps_kind,alpha_kind", [("float", "float"), ("tensor", "tensor")])
def test_l2_matches_reference(dtype, shape, eps_kind, alpha_kind):
    x_adv, x, grad = make(shape, dtype, spread=0.3)
    eps = budgets(eps_kind, shape[0], 0.5)
    alpha = budgets(alpha_kind, shape[0], 0.3, seed=2)
    out, expected = run_both(x_adv, x, grad, eps, alpha, norm="l2")
    assert_verbose_allclose(out, expected, atol=L2_TOL[dtype], rtol=0, name="l2")
    assert_in_ball(out, x, eps, norm="l2", lower=0.0, upper=1.0)


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_active_mask_leaves_inactive_samples_untouched(norm, dtype):
    x_adv, x, grad = make((6, 3, 4, 4), dtype, spread=0.3)
    x_adv[1] = 2.0  # outside the box and the ball: an active step would change it
    active = torch.tensor([True, False, True, False, False, True])
    before = x_adv.clone()
    out, expected = run_both(x_adv, x, grad, 0.1, 0.05, norm=norm, active=active)
    assert torch.equal(out[~active], before[~active])
    assert not torch.equal(out[active], before[active])
    tol = 0 if norm == "linf" else L2_TOL[dtype]
    assert_verbose_allclose(out, expected, atol=tol, rtol=0, name="masked")


def test_linf_semantics_by_hand():
    x = torch.full((1, 5), 0.5)
    x_adv = torch.tensor([[0.5, 0.5, 0.5, 0.59375, 0.4375]])
    grad = torch.tensor([[1.0, -1.0, 0.0, 1.0, 0.0]])
    drp_kernels.pgd_step_(x_adv, x, grad, 0.125, 0.25, norm="linf")
    # +alpha clipped to x+eps, -alpha clipped to x-eps, sign(0)=0 keeps the value.
    assert x_adv.tolist() == [[0.625, 0.375, 0.5, 0.625, 0.4375]]
    x_adv = torch.tensor([[0.95, 0.05]])
    drp_kernels.pgd_step_(x_adv, torch.tensor([[0.95, 0.05]]), torch.tensor([[1.0, -1.0]]), 0.5, 0.5)
    assert x_adv.tolist() == [[1.0, 0.0]]  # then clipped to [lower, upper]


def test_l2_semantics_by_hand():
    x = torch.zeros(2, 2)
    x_adv = torch.zeros(2, 2)
    grad = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    drp_kernels.pgd_step_(x_adv, x, grad, 0.25, 0.5, norm="l2", lower=-1.0, upper=1.0)
    # step alpha along grad/||grad|| = (0.6, 0.8), projected back to radius eps; zero grad: no move.
    assert_verbose_allclose(x_adv[0], torch.tensor([0.15, 0.2]), atol=1e-7, rtol=0, name="l2 by hand")
    assert x_adv[1].tolist() == [0.0, 0.0]


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_zero_grad_linf_sign_is_zero(norm):
    x_adv, x, _ = make((5, 3, 4, 4), torch.float32, spread=0.02)
    grad = torch.zeros_like(x)
    out, expected = run_both(x_adv, x, grad, 0.05 if norm == "linf" else 1.0, 0.01, norm=norm)
    assert torch.equal(out, x_adv)  # inside the ball already; no gradient, no move
    assert torch.equal(out, expected)


def test_linf_nan_grad_counts_as_zero_like_torch_sign():
    x_adv, x, grad = make((2, 8), torch.float32, spread=0.01)
    grad[0, 3] = float("nan")
    out, expected = run_both(x_adv, x, grad, 0.1, 0.05)
    assert out[0, 3].item() == x_adv[0, 3].item()  # torch.sign(nan) == 0: no move
    assert_verbose_allclose(out, expected, atol=0, rtol=0)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_linf_subnormal_grad_moves_like_torch_sign(device):
    """torch.sign of a subnormal gradient is +-1: the kernels must not flush it to zero (no fast-math)."""
    x_adv, x, grad = make((6, 16), torch.float32, device=device, spread=0.0, zero_frac=0.0)
    x_adv = x_adv.clamp(0.2, 0.8)
    x = x_adv.clone()
    grad = torch.where(grad > 0, 1e-40, -1e-40)
    assert grad.abs().min().item() > 0, "the test needs subnormal, not flushed, gradients"
    out, expected = run_both(x_adv, x, grad, 0.1, 0.05)
    assert_verbose_allclose(out, expected, atol=0, rtol=0, name=f"{device} subnormal grad")
    assert torch.equal(out - x_adv > 0, grad > 0) and bool((out != x_adv).all())


@pytest.mark.parametrize("lower,upper", [(0.1, 0.9), (-0.3, 0.7)])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_other_bounds(lower, upper, norm):
    x_adv, x, grad = make((7, 3, 5, 5), torch.bfloat16, spread=0.3)
    x, x_adv = x.clamp(lower, upper), x_adv.clamp(lower, upper)
    out, expected = run_both(x_adv, x, grad, 0.2, 0.1, norm=norm, lower=lower, upper=upper)
    assert_verbose_allclose(out, expected, atol=0 if norm == "linf" else L2_TOL[torch.bfloat16], rtol=0)
    assert_in_ball(out, x, 0.2, norm=norm, lower=lower, upper=upper)


# ------------------------------------------------------------------ layouts
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("layout", ["channels_last", "mixed", "strided_view"])
def test_layouts_give_identical_results(norm, dtype, layout):
    x_adv, x, grad = make((5, 3, 7, 6), dtype, spread=0.3)
    eps = budgets("tensor", 5, 0.3 if norm == "l2" else 0.05)
    ref_out = x_adv.clone()
    drp_kernels.pgd_step_(ref_out, x, grad, eps, 0.1, norm=norm)
    cl = lambda t: t.contiguous(memory_format=torch.channels_last)  # noqa: E731
    if layout == "channels_last":
        xa2, x2, g2 = cl(x_adv), cl(x), cl(grad)
    elif layout == "mixed":
        xa2, x2, g2 = cl(x_adv), x, cl(grad)
    else:
        big = torch.zeros(5, 3, 7, 12, dtype=dtype)
        big[..., ::2] = x_adv
        xa2, x2, g2 = big[..., ::2], cl(x), grad
    before = xa2.stride()
    drp_kernels.pgd_step_(xa2, x2, g2, eps, 0.1, norm=norm)
    assert xa2.stride() == before
    assert torch.equal(xa2, ref_out), f"{layout}: max diff {(xa2.double() - ref_out.double()).abs().max()}"
    if layout == "strided_view":
        assert torch.equal(big[..., 1::2], torch.zeros_like(big[..., 1::2]))  # neighbours untouched


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_random_init_channels_last_matches_contiguous(norm):
    x = torch.rand(4, 3, 6, 5)
    a = drp_kernels.random_init(x, 0.2, norm=norm, generator=torch.Generator().manual_seed(3))
    b = drp_kernels.random_init(x.contiguous(memory_format=torch.channels_last), 0.2, norm=norm,
                                generator=torch.Generator().manual_seed(3))
    assert b.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(a, b)


# ------------------------------------------------------------------ random_init
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("eps_kind", ["float", "tensor"])
@pytest.mark.parametrize("shape", [(6, 3, 5, 5), (9, 130), (1, 1)])
def test_random_init_matches_reference(dtype, norm, eps_kind, shape):
    x = torch.rand(shape).to(dtype)
    eps = budgets(eps_kind, shape[0], 0.3 if norm == "l2" else 0.1)
    out = drp_kernels.random_init(x, eps, norm=norm, generator=torch.Generator().manual_seed(7))
    expected = reference.random_init(x, eps, norm=norm, generator=torch.Generator().manual_seed(7))
    assert out.dtype == dtype and out.shape == x.shape
    # linf: element-wise, bitwise. l2: norm sums and pow in another order/library.
    tol = 0 if norm == "linf" else L2_TOL[dtype]
    assert_verbose_allclose(out, expected, atol=tol, rtol=0, name="random_init")
    assert_in_ball(out, x, eps, norm=norm, lower=0.0, upper=1.0)


def test_random_init_uses_generator_and_fills_ball():
    x = torch.full((2000, 4), 0.5)
    a = drp_kernels.random_init(x, 0.25, generator=torch.Generator().manual_seed(0))
    b = drp_kernels.random_init(x, 0.25, generator=torch.Generator().manual_seed(0))
    c = drp_kernels.random_init(x, 0.25, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    d = a - 0.5
    assert d.abs().max() <= 0.25 and d.abs().max() > 0.24 and abs(d.mean().item()) < 0.01
    r = torch.linalg.vector_norm(drp_kernels.random_init(x, 0.25, norm="l2") - 0.5, dim=1)
    # uniform in the 4-ball: P(r <= t*eps) = t^4
    assert r.max() <= 0.25 * (1 + 1e-6) and abs((r <= 0.25 * 0.5 ** 0.25).float().mean().item() - 0.5) < 0.05


# ------------------------------------------------------------------ exactness rule
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rounding_never_leaves_the_ball(dtype):
    # Values whose x +- eps are not representable: naive fp32 clip + cast steps outside.
    gen = torch.Generator().manual_seed(5)
    x = torch.rand(64, 257, generator=gen).to(dtype)
    x_adv = x.clone()
    grad = torch.randn(64, 257, generator=gen).to(dtype)
    eps = torch.rand(64, generator=gen) * 0.05 + 1e-4
    for _ in range(3):
        drp_kernels.pgd_step_(x_adv, x, grad, eps, 0.03)
    assert_in_ball(x_adv, x, eps, norm="linf", lower=0.0, upper=1.0)
    naive = (x.float() + eps[:, None] * grad.float().sign()).clamp(0, 1).to(dtype)
    if dtype != torch.float32:  # the rule is not vacuous: naive rounding does leave the ball
        assert bool(((naive.double() - x.double()).abs() > eps.double()[:, None]).any())


def test_python_float_eps_is_rounded_down():
    x = torch.full((1, 3), 0.25)
    x_adv = x.clone()
    drp_kernels.pgd_step_(x_adv, x, torch.ones_like(x), 0.1, 1.0)
    # float32(0.1) > 0.1: the kernel uses the float32 just below, so |x_adv - x| <= 0.1 exactly.
    assert (x_adv.double() - 0.25).max().item() <= 0.1


# ------------------------------------------------------------------ bad input
def _bad_cases():
    x_adv, x, grad = make((4, 6), torch.float32)
    ok = dict(x_adv=x_adv, x=x, grad=grad, eps=0.1, alpha=0.01)
    return [
        ("x_adv", dict(ok, x_adv=torch.zeros(4, 5)), ValueError),
        ("grad", dict(ok, grad=torch.zeros(3, 6)), ValueError),
        ("x_adv", dict(ok, x=x.double()), ValueError),
        ("grad", dict(ok, grad=grad.half()), ValueError),
        ("x", dict(ok, x=torch.zeros(4, 6, dtype=torch.int64)), ValueError),
        ("x_adv", dict(ok, x_adv=torch.zeros(4, 6, dtype=torch.int32)), ValueError),
        ("eps", dict(ok, eps=-0.1), ValueError),
        ("eps", dict(ok, eps=float("nan")), ValueError),
        ("alpha", dict(ok, alpha=-1e-3), ValueError),
        ("eps", dict(ok, eps=torch.tensor([0.1, 0.1, -0.1, 0.1])), ValueError),
        ("alpha", dict(ok, alpha=torch.tensor([0.1, float("nan"), 0.1, 0.1])), ValueError),
        ("eps", dict(ok, eps=torch.full((3,), 0.1)), ValueError),
        ("alpha", dict(ok, alpha=torch.full((4, 1), 0.1)), ValueError),
        ("eps", dict(ok, eps="0.1"), ValueError),
        ("active", dict(ok, active=torch.ones(3, dtype=torch.bool)), ValueError),
        ("active", dict(ok, active=torch.ones(4)), ValueError),
        ("norm", dict(ok, norm="l1"), ValueError),
        ("lower", dict(ok, lower=0.8, upper=0.2), ValueError),
        ("x_adv", dict(ok, x_adv=torch.zeros(4, 6, device="meta")), ValueError),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_input_raises_and_leaves_x_adv_unchanged(case):
    name, kw, exc = _bad_cases()[case]
    x_adv = kw.pop("x_adv")
    before = x_adv.clone()
    with pytest.raises(exc, match=name):
        drp_kernels.pgd_step_(x_adv, kw.pop("x"), kw.pop("grad"), kw.pop("eps"), kw.pop("alpha"), **kw)
    if x_adv.device.type != "meta":
        assert torch.equal(x_adv, before)


def test_random_init_bad_input():
    x = torch.rand(3, 4)
    with pytest.raises(ValueError, match="eps"):
        drp_kernels.random_init(x, -1.0)
    with pytest.raises(ValueError, match="eps"):
        drp_kernels.random_init(x, torch.ones(2))
    with pytest.raises(ValueError, match="norm"):
        drp_kernels.random_init(x, 0.1, norm="linf2")
    with pytest.raises(ValueError, match="x"):
        drp_kernels.random_init(torch.ones(3, 4, dtype=torch.int64), 0.1)
    with pytest.raises(ValueError, match="lower"):
        drp_kernels.random_init(x, 0.1, lower=1.0, upper=0.0)


def test_op_validates_too():
    # The registered op checks its inputs itself (TORCH_CHECK), for callers bypassing the wrapper.
    x_adv, x, grad = make((3, 4), torch.float32)
    before = x_adv.clone()
    with pytest.raises(RuntimeError, match="eps"):
        torch.ops.drp.pgd_step_(x_adv, x, grad, 0.1, 0.1, torch.tensor([0.1, -1.0, 0.1]), None, None, "linf", 0.0, 1.0)
    with pytest.raises(RuntimeError, match="norm"):
        torch.ops.drp.pgd_step_(x_adv, x, grad, 0.1, 0.1, None, None, None, "l3", 0.0, 1.0)
    with pytest.raises(RuntimeError, match="grad"):
        torch.ops.drp.pgd_step_(x_adv, x, grad[:2], 0.1, 0.1, None, None, None, "linf", 0.0, 1.0)
    assert torch.equal(x_adv, before)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a CPU-only build")
def test_cuda_tensors_without_cuda_kernels_say_how_to_rebuild(monkeypatch):
    monkeypatch.setattr(_extension, "has_cuda_kernels", lambda: False)
    with pytest.raises(RuntimeError, match="DRP_FORCE_CUDA=1 pip install --no-build-isolation -e ."):
        _extension.require(torch.device("cuda"))


def test_missing_extension_says_how_to_build(monkeypatch):
    monkeypatch.setattr(_extension, "module", None)
    monkeypatch.setattr(_extension, "_LOAD_ERROR", ImportError("no _C"))
    x_adv, x, grad = make((2, 3), torch.float32)
    before = x_adv.clone()
    with pytest.raises(RuntimeError, match="pip install --no-build-isolation -e ."):
        drp_kernels.pgd_step_(x_adv, x, grad, 0.1, 0.1)
    assert torch.equal(x_adv, before)


# ------------------------------------------------------------------ torch.library / compile
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_opcheck_pgd_step(norm):
    x_adv, x, grad = make((3, 2, 4, 4), torch.float32)
    eps_t = torch.tensor([0.1, 0.2, 0.0])
    active = torch.tensor([True, False, True])
    for args in [
        (x_adv, x, grad, 0.1, 0.05, None, None, None, norm, 0.0, 1.0),
        (x_adv, x, grad, 0.0, 0.05, eps_t, eps_t * 0.5, active, norm, -1.0, 1.0),
        (x_adv.contiguous(memory_format=torch.channels_last), x, grad, 0.1, 0.05, None, None, None, norm, 0.0, 1.0),
    ]:
        torch.library.opcheck(torch.ops.drp.pgd_step_.default, args)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_opcheck_ball_init(norm):
    x = torch.rand(3, 2, 4, 4)
    noise = torch.rand(x.shape) if norm == "linf" else torch.randn(x.shape)
    radius_u = torch.rand(3) if norm == "l2" else None
    for xx in (x, x.contiguous(memory_format=torch.channels_last), x.bfloat16()):
        torch.library.opcheck(torch.ops.drp.ball_init.default, (xx, noise, radius_u, 0.1, None, norm, 0.0, 1.0))


def test_compile_fullgraph_pgd_loop():
    # aot_eager traces through the fake kernels exactly as inductor does (fullgraph: no
    # graph break), without inductor's C++ compile time on this 2-core CPU.
    def attack(x, x_adv, w):
        for _ in range(3):
            grad = torch.tanh((x_adv - 0.5) * w)
            drp_kernels.pgd_step_(x_adv, x, grad, 0.05, 0.02)
        drp_kernels.pgd_step_(x_adv, x, -x_adv, 0.05, 0.02, norm="l2")
        return x_adv

    x_adv, x, _ = make((4, 3, 5, 5), torch.float32)
    w = torch.randn(3, 5, 5)
    expected = attack(x, x_adv.clone(), w)
    torch._dynamo.reset()
    compiled = torch.compile(attack, fullgraph=True, backend="aot_eager")
    out = compiled(x, x_adv.clone(), w)
    assert torch.equal(out, expected)


# ------------------------------------------------------------------ properties (exactness)
@st.composite
def step_case(draw):
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]))
    rank = draw(st.integers(1, 3))
    shape = tuple([draw(st.integers(1, 6))] + [draw(st.integers(1, 9)) for _ in range(rank)])
    lower = draw(st.sampled_from([0.0, -1.0, 0.1]))
    upper = lower + draw(st.sampled_from([1.0, 0.7, 2.5]))
    seed = draw(st.integers(0, 2**31 - 1))
    b = shape[0]
    eps = draw(st.one_of(st.floats(0, 1.5), st.lists(st.floats(0, 1.5), min_size=b, max_size=b)))
    alpha = draw(st.one_of(st.floats(0, 1.0), st.lists(st.floats(0, 1.0), min_size=b, max_size=b)))
    active = draw(st.one_of(st.none(), st.lists(st.booleans(), min_size=b, max_size=b)))
    return dtype, shape, lower, upper, seed, eps, alpha, active


def _t(v, dtype=torch.float64):
    return torch.tensor(v, dtype=dtype) if isinstance(v, list) else v


def _x_in_box(shape, lower, upper, dtype, gen):
    """Uniform points of [lower, upper] that lie in the box in their own dtype (the rule's precondition)."""
    x = (lower + torch.rand(shape, generator=gen, dtype=torch.float64) * (upper - lower)).to(dtype)
    x = x.clamp(lower, upper) if dtype == torch.float64 else x
    x = torch.where(x.double() < lower, torch.nextafter(x, torch.full_like(x, math.inf)), x)
    return torch.where(x.double() > upper, torch.nextafter(x, torch.full_like(x, -math.inf)), x)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=step_case(), norm=st.sampled_from(["linf", "l2"]))
def test_property_pgd_step_stays_in_ball_and_box(case, norm):
    dtype, shape, lower, upper, seed, eps, alpha, active = case
    gen = torch.Generator().manual_seed(seed)
    x = _x_in_box(shape, lower, upper, dtype, gen)
    eps, alpha = _t(eps), _t(alpha)
    act = None if active is None else torch.tensor(active)
    x_adv = x.clone()
    for _ in range(2):
        grad = torch.randn(shape, generator=gen).to(dtype)
        expected = reference.pgd_step(x_adv, x, grad, eps, alpha, norm=norm, lower=lower, upper=upper, active=act)
        drp_kernels.pgd_step_(x_adv, x, grad, eps, alpha, norm=norm, lower=lower, upper=upper, active=act)
        assert_in_ball(x_adv, x, eps, norm=norm, lower=lower, upper=upper)
        assert_in_ball(expected, x, eps, norm=norm, lower=lower, upper=upper)
        if norm == "linf":
            assert torch.equal(x_adv, expected)
        x_adv = expected


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=step_case(), norm=st.sampled_from(["linf", "l2"]))
def test_property_random_init_stays_in_ball_and_box(case, norm):
    dtype, shape, lower, upper, seed, eps, _, _ = case
    gen = torch.Generator().manual_seed(seed)
    x = _x_in_box(shape, lower, upper, dtype, gen)
    eps = _t(eps)
    out = drp_kernels.random_init(x, eps, norm=norm, lower=lower, upper=upper, generator=gen)
    assert_in_ball(out, x, eps, norm=norm, lower=lower, upper=upper)


# ------------------------------------------------------------------ CUDA
cuda = pytest.mark.cuda


@cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("shape", [(37, 3, 11, 13), (512, 3, 32, 32), (3, 5), (4, 3, 160, 160)])
@pytest.mark.parametrize("per_sample", [False, True])
def test_cuda_matches_reference(dtype, norm, shape, per_sample):
    x_adv, x, grad = make(shape, dtype, device="cuda", spread=0.3)
    b = shape[0]
    eps = budgets("tensor" if per_sample else "float", b, 0.3 if norm == "l2" else 0.05, device="cuda")
    alpha = budgets("tensor" if per_sample else "float", b, 0.1, device="cuda", seed=3)
    active = (torch.arange(b, device="cuda") % 3 != 1) if per_sample else None
    out, expected = run_both(x_adv, x, grad, eps, alpha, norm=norm, active=active)
    tol = 0 if norm == "linf" else L2_TOL[dtype]
    assert_verbose_allclose(out, expected, atol=tol, rtol=0, name=f"cuda {norm}")
    assert_in_ball(out, x, eps, norm=norm, lower=0.0, upper=1.0)
    cpu_out = x_adv.cpu().clone()
    drp_kernels.pgd_step_(cpu_out, x.cpu(), grad.cpu(), eps if not per_sample else eps.cpu(),
                          alpha if not per_sample else alpha.cpu(), norm=norm,
                          active=None if active is None else active.cpu())
    assert_verbose_allclose(out.cpu(), cpu_out, atol=tol, rtol=0, name="cuda vs cpu")


@cuda
@pytest.mark.parametrize("layout", ["channels_last", "unaligned"])
def test_cuda_layouts(layout):
    x_adv, x, grad = make((8, 3, 9, 9), torch.bfloat16, device="cuda")
    expected = reference.pgd_step(x_adv, x, grad, 0.05, 0.02)
    if layout == "channels_last":
        x_adv, x, grad = (t.contiguous(memory_format=torch.channels_last) for t in (x_adv, x, grad))
    else:  # offset by one element: no 16-byte vector loads
        x_adv, x, grad = (torch.cat([t.new_zeros(1), t.flatten()])[1:].view(t.shape) for t in (x_adv, x, grad))
    drp_kernels.pgd_step_(x_adv, x, grad, 0.05, 0.02)
    assert torch.equal(x_adv.contiguous(), expected)


@cuda
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_cuda_random_init_matches_reference(norm):
    x = torch.rand(64, 3, 8, 8, device="cuda")
    out = drp_kernels.random_init(x, 0.1, norm=norm, generator=torch.Generator("cuda").manual_seed(1))
    expected = reference.random_init(x, 0.1, norm=norm, generator=torch.Generator("cuda").manual_seed(1))
    assert_verbose_allclose(out, expected, atol=0 if norm == "linf" else 2e-6, rtol=0)
    assert_in_ball(out, x, 0.1, norm=norm, lower=0.0, upper=1.0)


@cuda
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_cuda_int64_indexing_beyond_2_31_elements(norm):
    # numel > 2^31 in bfloat16 (3 tensors x 4.3 GB): index arithmetic must be 64-bit.
    free, _ = torch.cuda.mem_get_info()
    b, d = 2, 2**30 + 7  # 2^31 + 14 elements
    if free < 4 * 2 * b * d * 2:
        pytest.skip("needs ~20 GB of free GPU memory")
    x = torch.full((b, d), 0.5, device="cuda", dtype=torch.bfloat16)
    x_adv = x.clone()
    grad = torch.ones_like(x)
    grad[1, -5:] = -1.0
    drp_kernels.pgd_step_(x_adv, x, grad, 0.25, 0.125, norm=norm)
    if norm == "linf":
        assert x_adv[1, -1].item() == 0.375 and x_adv[1, -6].item() == 0.625 and x_adv[0, 0].item() == 0.625
    else:  # each sample moves alpha along grad/||grad||: tiny per element, exact sign
        assert x_adv[1, -1].item() <= 0.5 and x_adv[1, -6].item() >= 0.5
        assert bool((x_adv[0, -1000:] >= 0.5).all())
    del x, x_adv, grad
    torch.cuda.empty_cache()
