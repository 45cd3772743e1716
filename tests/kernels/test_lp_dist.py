"""lp_dist and LpDist: the C++ CPU kernels (every SIMD copy) and the Triton kernels (under
TRITON_INTERPRET=1 without a GPU) against drp_kernels.reference, plus gradcheck, opcheck,
torch.compile, large-p stability, bad input and the layer."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import drp_kernels
from _helpers import REPO, assert_verbose_allclose
from drp_kernels import LpDist, lp_dist, reference

INF = math.inf
PS = [1.0, 2.0, 3.5, 8.0, 1000.0, INF]
SHAPES = [(37, 53, 129), (1, 5, 3)]
# CCE's accuracy rule: error vs the fp64 ground truth <= same-dtype reference error + tol * scale
DTYPE_TOL = [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)]
ISAS = ["avx512", "avx2", "generic"]


@pytest.fixture
def backend(monkeypatch):
    def use(name):
        if name == "cpp":
            monkeypatch.delenv("DRP_BACKEND", raising=False)
        else:
            monkeypatch.setenv("DRP_BACKEND", name)
    return use


def _inputs(b, n, d, *, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=g)
    w = torch.randn(n, d, generator=g)
    return x.to(dtype), w.to(dtype)


def _upstream(b, n, dtype):
    g = torch.Generator().manual_seed(1)
    return torch.randn(b, n, generator=g, dtype=torch.float64).to(dtype)


def _run(fn, x, w, p):
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    out = fn(x, w, p)
    gx, gw = torch.autograd.grad(out, (x, w), _upstream(*out.shape, out.dtype))
    return out.detach(), gx, gw


def _naive(x, w, p):
    """The textbook formula in fp64, no scaling (fine for moderate p)."""
    d = (x.double()[:, None, :] - w.double()[None, :, :]).abs()
    return d.amax(-1) if p == INF else (d ** p).sum(-1) ** (1.0 / p)


def _check_rule(names, kernel, ref, truth, tol):
    for name, k, r, t in zip(names, kernel, ref, truth):
        assert k.dtype == r.dtype and k.shape == r.shape, (name, k.dtype, r.dtype, k.shape, r.shape)
        scale = max(1.0, t.abs().max().item()) if t.numel() else 1.0
        err_k = (k.double() - t).abs().max().item() if t.numel() else 0.0
        err_r = (r.double() - t).abs().max().item() if t.numel() else 0.0
        assert torch.isfinite(k).all(), name
        assert err_k <= err_r + tol * scale, f"{name}: kernel error {err_k:.3e} > reference error {err_r:.3e} + {tol}"


def _ref(x, w, p):
    return reference.lp_dist(x, w, p)


def _api(x, w, p):
    return lp_dist(x, w, p=p)


# ------------------------------------------------------------------------ reference itself
@pytest.mark.parametrize("p", [1.0, 2.0, 3.5, 8.0, INF])
def test_reference_is_the_textbook_formula(p):
    x, w = _inputs(7, 9, 11, dtype=torch.float64)
    assert_verbose_allclose(reference.lp_dist(x, w, p), _naive(x, w, p), atol=1e-12, rtol=1e-12, name="reference")


def test_reference_matches_cdist():
    x, w = _inputs(6, 8, 10, dtype=torch.float64)
    for p in (1.0, 2.0, 3.5, INF):
        assert_verbose_allclose(reference.lp_dist(x, w, p), torch.cdist(x, w, p=p), atol=1e-12, rtol=1e-12)


# ------------------------------------------------------------------ C++ kernels (CPU)
@pytest.mark.parametrize("b,n,d", SHAPES)
@pytest.mark.parametrize("p", PS)
@pytest.mark.parametrize("dtype,tol", DTYPE_TOL)
def test_cpu_matches_reference(b, n, d, p, dtype, tol, backend):
    backend("cpp")
    x, w = _inputs(b, n, d)
    truth = _run(_ref, x.to(dtype).double(), w.to(dtype).double(), p)
    ref = _run(_ref, x.to(dtype), w.to(dtype), p)
    ker = _run(_api, x.to(dtype), w.to(dtype), p)
    _check_rule(("out", "grad_x", "grad_w"), ker, ref, truth, tol)


@pytest.mark.parametrize("b,n,d", SHAPES)
@pytest.mark.parametrize("p", PS)
def test_cpu_float64(b, n, d, p, backend):
    backend("cpp")
    x, w = _inputs(b, n, d, dtype=torch.float64)
    ker = _run(_api, x, w, p)
    ref = _run(_ref, x, w, p)
    for name, k, r in zip(("out", "grad_x", "grad_w"), ker, ref):
        assert k.dtype == torch.float64
        assert_verbose_allclose(k, r, atol=1e-11, rtol=1e-10, name=name)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("p", PS + [3.0, 12.7, 1.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_simd_copy(isa, p, dtype, backend, monkeypatch):
    """Each SIMD copy of the micro-kernels (the CPU falls back to a narrower one it supports)."""
    backend("cpp")
    monkeypatch.setenv("DRP_CPU_ISA", isa)
    x, w = _inputs(13, 70, 45, seed=3)
    truth = _run(_ref, x.double(), w.double(), p)
    ref = _run(_ref, x.to(dtype), w.to(dtype), p)
    ker = _run(_api, x.to(dtype), w.to(dtype), p)
    _check_rule(("out", "grad_x", "grad_w"), ker, ref, truth, 1e-5 if dtype == torch.float32 else 1e-12)


@pytest.mark.parametrize("var,value,p", [("DRP_CPU_ISA", "sse9", 2.0), ("DRP_LP_DIST_SKIP_BITS", "many", 100.0)])
def test_bad_cpu_settings_are_value_errors(backend, monkeypatch, var, value, p):
    """An unknown SIMD copy (DRP_CPU_ISA) or a skip threshold that is no number: ValueError naming it."""
    backend("cpp")
    monkeypatch.setenv(var, value)
    x, w = _inputs(3, 4, 5)
    with pytest.raises(ValueError, match=var):
        lp_dist(x, w, p=p)


def test_cpu_strided_and_mixed_dtypes(backend):
    backend("cpp")
    x, w = _inputs(20, 30, 40)
    xt = x.t().contiguous().t()  # column-major view
    ws = torch.cat([w, w], dim=1)[:, ::2]  # non-unit inner stride
    for p in (2.0, 8.0, INF):
        assert_verbose_allclose(lp_dist(xt, ws, p=p), reference.lp_dist(x, ws.contiguous(), p),
                                atol=1e-5, rtol=1e-5, name=f"strided p={p}")
    out = lp_dist(x.half(), w, p=8.0)
    assert out.dtype == torch.float32
    assert_verbose_allclose(out, reference.lp_dist(x.half(), w, 8.0), atol=1e-5, rtol=1e-5)
    out64 = lp_dist(x, w.double(), p=8.0)
    assert out64.dtype == torch.float64


def test_cpu_multithreaded_matches_single_thread(backend):
    """Big enough to split over threads (grad_w partial buffers, forward tiles)."""
    backend("cpp")
    x, w = _inputs(130, 150, 97, seed=5)
    old = torch.get_num_threads()
    try:
        res = {}
        for t in (1, 2):
            torch.set_num_threads(t)
            res[t] = {p: _run(_api, x, w, p) for p in (3.0, INF)}
    finally:
        torch.set_num_threads(old)
    for p in (3.0, INF):
        for a, b_ in zip(res[1][p], res[2][p]):
            assert_verbose_allclose(a, b_, atol=1e-5, rtol=1e-5, name=f"threads p={p}")
        truth = _run(_ref, x.double(), w.double(), p)
        _check_rule(("out", "grad_x", "grad_w"), res[2][p], _run(_ref, x, w, p), truth, 1e-5)


# ------------------------------------------------------------------ Triton (interpreter)
@pytest.mark.parametrize("b,n,d", [(37, 53, 70), (1, 5, 3)])
@pytest.mark.parametrize("p", PS)
@pytest.mark.parametrize("dtype,tol", DTYPE_TOL)
def test_triton_matches_reference(b, n, d, p, dtype, tol, backend):
    backend("triton")
    x, w = _inputs(b, n, d, seed=2)
    truth = _run(_ref, x.to(dtype).double(), w.to(dtype).double(), p)
    ref = _run(_ref, x.to(dtype), w.to(dtype), p)
    ker = _run(_api, x.to(dtype), w.to(dtype), p)
    _check_rule(("out", "grad_x", "grad_w"), ker, ref, truth, tol)


def test_triton_only_x_or_only_w_needs_grad(backend):
    backend("triton")
    x, w = _inputs(9, 11, 13)
    for p in (3.5, INF):
        ref = _run(_ref, x, w, p)
        xr = x.clone().requires_grad_(True)
        (gx,) = torch.autograd.grad(lp_dist(xr, w, p=p), xr, _upstream(9, 11, torch.float32))
        assert_verbose_allclose(gx, ref[1], atol=1e-5, rtol=1e-5, name="grad_x")
        wr = w.clone().requires_grad_(True)
        (gw,) = torch.autograd.grad(lp_dist(x, wr, p=p), wr, _upstream(9, 11, torch.float32))
        assert_verbose_allclose(gw, ref[2], atol=1e-5, rtol=1e-5, name="grad_w")


# ----------------------------------------------------------------------- gradcheck
@pytest.mark.parametrize("p", [1.0, 2.0, 3.5, 8.0, 1000.0])
def test_gradcheck_float64(p, backend):
    backend("cpp")
    x, w = _inputs(4, 5, 6, seed=7, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: lp_dist(a, b, p=p), (x.requires_grad_(), w.requires_grad_()))


def test_gradcheck_float64_inf_away_from_ties(backend):
    backend("cpp")
    # distinct |d| with a clear gap at the arg-max: x in steps of 1, w near 0
    x = (torch.randperm(24, generator=torch.Generator().manual_seed(0)).double().reshape(4, 6) - 11.5) / 3
    w = torch.randn(5, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 0.01
    assert torch.autograd.gradcheck(lambda a, b: lp_dist(a, b, p=INF), (x.requires_grad_(), w.requires_grad_()))


def test_inf_gradient_is_at_the_first_argmax(backend):
    x = torch.tensor([[1.0, -3.0, 3.0, 2.0]])
    w = torch.zeros(1, 4)
    for name in ("cpp", "triton"):
        backend(name)
        xr = x.clone().requires_grad_(True)
        wr = w.clone().requires_grad_(True)
        out = lp_dist(xr, wr, p=INF)
        assert out.item() == 3.0
        gx, gw = torch.autograd.grad(out.sum(), (xr, wr))
        assert gx.tolist() == [[0.0, -1.0, 0.0, 0.0]], name
        assert gw.tolist() == [[0.0, 1.0, 0.0, 0.0]], name


# ---------------------------------------------------------------- stability, zeros
@pytest.mark.parametrize("name", ["cpp", "triton"])
@pytest.mark.parametrize("scale", [1e30, 1e-30, 1.0])
def test_p1000_neither_overflows_nor_underflows(name, scale, backend):
    backend(name)
    x, w = _inputs(5, 6, 33, seed=4)
    x, w = x * scale, w * scale
    truth = _run(_ref, x.double(), w.double(), 1000.0)
    ker = _run(_api, x, w, 1000.0)
    for nm, k, t in zip(("out", "grad_x", "grad_w"), ker, truth):
        assert torch.isfinite(k).all(), nm
        tol = scale if nm == "out" else 1.0
        assert_verbose_allclose(k, t, atol=2e-3 * tol, rtol=2e-3, name=nm)
    # exact scaling: out(scale * x) == scale * out(x) up to rounding
    base = lp_dist(x / scale, w / scale, p=1000.0)
    assert_verbose_allclose(ker[0] / scale, base, atol=0, rtol=1e-5, name="homogeneity")


@pytest.mark.parametrize("name", ["cpp", "triton"])
@pytest.mark.parametrize("p", PS)
def test_zero_distance_has_zero_gradient(name, p, backend):
    backend(name)
    x, w = _inputs(3, 4, 7)
    w[2] = x[1]
    xr = x.clone().requires_grad_(True)
    wr = w.clone().requires_grad_(True)
    out = lp_dist(xr, wr, p=p)
    assert out[1, 2].item() == 0.0
    up = torch.zeros_like(out)
    up[1, 2] = 1.0
    gx, gw = torch.autograd.grad(out, (xr, wr), up)
    assert torch.equal(gx, torch.zeros_like(gx)) and torch.equal(gw, torch.zeros_like(gw))


@pytest.mark.parametrize("name", ["cpp", "triton"])
def test_nan_propagates(name, backend):
    backend(name)
    x, w = _inputs(3, 4, 5)
    x[1, 2] = math.nan
    for p in (2.0, INF):
        out = lp_dist(x, w, p=p)
        assert torch.isnan(out[1]).all() and torch.isfinite(out[[0, 2]]).all()


@pytest.mark.parametrize("name", ["cpp", "triton", "reference"])
def test_empty_shapes(name, backend):
    backend(name)
    assert lp_dist(torch.zeros(0, 3), torch.zeros(4, 3), p=2.0).shape == (0, 4)
    assert lp_dist(torch.zeros(2, 3), torch.zeros(0, 3), p=INF).shape == (2, 0)
    out = lp_dist(torch.zeros(2, 0), torch.zeros(3, 0), p=8.0)
    assert out.shape == (2, 3) and torch.equal(out, torch.zeros(2, 3))


# ------------------------------------------------------------ opcheck, torch.compile
@pytest.mark.parametrize("use_triton", [False, True])
@pytest.mark.parametrize("p", [1.0, 3.5, 1000.0, INF])
def test_opcheck(use_triton, p):
    x, w = _inputs(5, 6, 7)
    x.requires_grad_(True)
    w.requires_grad_(True)
    torch.library.opcheck(torch.ops.drp.lp_dist.default, (x, w, p, use_triton, True))


def test_opcheck_cpp_ops():
    x, w = _inputs(5, 6, 7)
    for p in (1.0, 2.0, 40.0, 1000.0, INF):
        for stats in (False, True):
            torch.library.opcheck(torch.ops.drp.lp_dist_cpu_forward.default, (x, w, p, stats))
        out, idx, inv, r = torch.ops.drp.lp_dist_cpu_forward(x, w, p, True)
        torch.library.opcheck(torch.ops.drp.lp_dist_cpu_backward.default,
                              (torch.ones_like(out), x, w, out, idx, inv, r, p, True, True))


@pytest.mark.parametrize("name", ["cpp", "triton"])
def test_torch_compile_fullgraph(name, backend):
    backend(name)
    x, w = _inputs(6, 7, 9)
    layer = LpDist(9, 7, p=8.0, bias=True)

    def f(a, b):
        return lp_dist(a, b, p=INF).sum() + layer(a).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    xr = x.clone().requires_grad_(True)
    wr = w.clone().requires_grad_(True)
    got = compiled(xr, wr)
    g_got = torch.autograd.grad(got, (xr, wr, layer.weight))
    xe = x.clone().requires_grad_(True)
    we = w.clone().requires_grad_(True)
    layer.running_mean.zero_()
    want = f(xe, we)
    g_want = torch.autograd.grad(want, (xe, we, layer.weight))
    assert_verbose_allclose(got, want, atol=1e-4, rtol=1e-5, name="value")
    for a, b_ in zip(g_got, g_want):
        assert_verbose_allclose(a, b_, atol=1e-4, rtol=1e-5, name="grad")


# ------------------------------------------------------------------------ bad input
BAD = [
    (lambda: lp_dist([[1.0]], torch.zeros(1, 1), p=2.0), TypeError, "x must be a torch.Tensor"),
    (lambda: lp_dist(torch.zeros(1, 1), None, p=2.0), TypeError, "w must be a torch.Tensor"),
    (lambda: lp_dist(torch.zeros(1, 1), torch.zeros(1, 1), p="2"), TypeError, "p must be a float"),
    (lambda: lp_dist(torch.zeros(1, 1), torch.zeros(1, 1), p=True), TypeError, "p must be a float"),
    (lambda: lp_dist(torch.zeros(2, 3), torch.zeros(4, 5), p=2.0), ValueError, "x has D=3 but w has D=5"),
    (lambda: lp_dist(torch.zeros(2, 3), torch.zeros(4, 3), p=0.5), ValueError, r"p must be a float in \[1, inf\]"),
    (lambda: lp_dist(torch.zeros(2, 3), torch.zeros(4, 3), p=-INF), ValueError, r"p must be a float in \[1, inf\]"),
    (lambda: lp_dist(torch.zeros(2, 3), torch.zeros(4, 3), p=math.nan), ValueError, r"p must be a float in \[1, inf\]"),
    (lambda: lp_dist(torch.zeros(2, 3, dtype=torch.int64), torch.zeros(4, 3), p=2.0), ValueError, "x must be float32"),
    (lambda: lp_dist(torch.zeros(2, 3), torch.zeros(4, 3, dtype=torch.bool), p=2.0), ValueError, "w must be float32"),
    (lambda: lp_dist(torch.zeros(3), torch.zeros(4, 3), p=2.0), ValueError, r"x must be 2-D \(B, D\)"),
    (lambda: lp_dist(torch.zeros(2, 3), torch.zeros(1, 4, 3), p=2.0), ValueError, r"w must be 2-D \(N, D\)"),
    (lambda: lp_dist(torch.zeros(2, 3), torch.zeros(4, 3, device="meta"), p=2.0), ValueError,
     "w must be on x's device"),
]


@pytest.mark.parametrize("case", range(len(BAD)))
@pytest.mark.parametrize("name", ["cpp", "triton", "reference"])
def test_bad_input_errors_name_the_argument(case, name, backend):
    backend(name)
    fn, exc, msg = BAD[case]
    with pytest.raises(exc, match=msg):
        fn()


def test_cpp_op_validates_too():
    with pytest.raises(ValueError, match="feature dimensions"):
        torch.ops.drp.lp_dist_cpu_forward(torch.zeros(2, 3), torch.zeros(4, 5), 2.0, False)
    with pytest.raises(ValueError, match="p must be"):
        torch.ops.drp.lp_dist_cpu_forward(torch.zeros(2, 3), torch.zeros(4, 3), 0.5, False)
    with pytest.raises(ValueError, match="x must be float32"):
        torch.ops.drp.lp_dist_cpu_forward(torch.zeros(2, 3, dtype=torch.int32), torch.zeros(4, 3), 2.0, False)


# ------------------------------------------------------------------------- LpDist
def test_layer_mean_shift_train_and_eval():
    torch.manual_seed(0)
    layer = LpDist(6, 5, p=8.0)
    x = torch.randn(32, 6)
    raw = lp_dist(x, layer.weight, p=8.0).detach()
    y = layer(x)
    assert_verbose_allclose(y, raw - raw.mean(0), atol=1e-5, rtol=1e-6, name="train")
    assert_verbose_allclose(layer.running_mean, 0.1 * raw.mean(0), atol=1e-6, rtol=1e-6, name="running")
    layer(x)
    expected_running = 0.9 * 0.1 * raw.mean(0) + 0.1 * raw.mean(0)
    assert_verbose_allclose(layer.running_mean, expected_running, atol=1e-5, rtol=1e-6, name="running2")
    layer.eval()
    running = layer.running_mean.clone()
    y = layer(x)
    assert_verbose_allclose(y, raw - running, atol=1e-5, rtol=1e-6, name="eval")
    assert torch.equal(layer.running_mean, running)  # eval does not update


def test_layer_without_mean_shift_and_with_bias():
    layer = LpDist(4, 3, p=INF, mean_shift=False, bias=True)
    assert layer.running_mean is None
    with torch.no_grad():
        layer.bias.copy_(torch.tensor([1.0, -2.0, 0.5]))
    x = torch.randn(7, 4)
    assert_verbose_allclose(layer(x), lp_dist(x, layer.weight, p=INF) + layer.bias, name="bias")


def test_layer_identity_init():
    torch.manual_seed(1)
    layer = LpDist(5, 12, p=INF, mean_shift=False)
    n = torch.arange(12)
    assert torch.equal(layer.weight[n, n % 5], torch.full((12,), -10.0))
    x = torch.rand(9, 5)  # inputs in [0, 1]: coordinate n mod 5 dominates the distance
    assert_verbose_allclose(layer(x), x[:, n % 5] + 10.0, atol=1e-5, rtol=0, name="identity")
    plain = LpDist(5, 12, identity_val=None)
    assert (plain.weight.abs() < 10).all()


def test_layer_p_is_mutable_and_validated():
    layer = LpDist(3, 2)
    assert layer.p == 8.0
    layer.p = INF
    x = torch.randn(4, 3)
    layer.eval()
    assert_verbose_allclose(layer(x), lp_dist(x, layer.weight, p=INF), name="p=inf")
    layer.p = 16
    assert layer.p == 16.0
    with pytest.raises(ValueError, match="p must be"):
        layer.p = 0.5
    with pytest.raises(TypeError, match="p must be"):
        layer.p = "inf"
    assert layer.p == 16.0
    assert "p=16.0" in repr(layer) and "mean_shift=True" in repr(layer) and "in_features=3" in repr(layer)


def test_layer_bad_arguments():
    with pytest.raises(ValueError, match="in_features"):
        LpDist(0, 3)
    with pytest.raises(TypeError, match="out_features"):
        LpDist(3, 2.0)
    with pytest.raises(ValueError, match="p must be"):
        LpDist(3, 2, p=0.0)
    with pytest.raises(ValueError, match="identity_val"):
        LpDist(3, 2, identity_val=-1.0)
    with pytest.raises(ValueError, match=r"x must have shape \(B, 3\)"):
        LpDist(3, 2)(torch.zeros(4, 5))


@pytest.mark.parametrize("mean_shift,bias", [(True, True), (False, False), (True, False)])
def test_layer_stack_is_1_lipschitz_in_linf_at_p_inf(mean_shift, bias):
    torch.manual_seed(2)
    net = torch.nn.Sequential(*[LpDist(d_in, d_out, p=INF, mean_shift=mean_shift, bias=bias)
                                for d_in, d_out in ((10, 16), (16, 16), (16, 4))]).double()
    net.train()
    net(torch.rand(64, 10, dtype=torch.float64))  # non-trivial running means
    if bias:
        for m in net:
            torch.nn.init.normal_(m.bias)
    net.eval()
    x = torch.rand(256, 10, dtype=torch.float64)
    eps = torch.rand(256, 1, dtype=torch.float64) * 0.3
    x2 = x + (torch.rand_like(x) * 2 - 1) * eps
    with torch.no_grad():
        lhs = (net(x) - net(x2)).abs().amax(dim=1)
    rhs = (x - x2).abs().amax(dim=1)
    assert (lhs <= rhs * (1 + 1e-12) + 1e-12).all()
    assert (lhs > 0.5 * rhs).any()  # not vacuous: the bound is nearly tight somewhere


# ---------------------------------------------------------- proto_logits routing
@pytest.mark.parametrize("metric,p", [("linf", INF), ("l2", 2.0)])
def test_proto_logits_routes_through_lp_dist(metric, p, backend):
    backend("cpp")
    z, protos = _inputs(11, 4, 6)
    assert_verbose_allclose(drp_kernels.proto_logits(z, protos, metric=metric), -lp_dist(z, protos, p=p),
                            atol=0, rtol=0, name="logits")
    assert_verbose_allclose(drp_kernels.proto_logits(z, protos, metric=metric),
                            reference.proto_logits(z, protos, metric=metric), atol=1e-5, rtol=1e-5, name="ref")
    assert drp_kernels.proto_logits(z.half(), protos.half(), metric=metric).dtype == torch.float32
    assert drp_kernels.proto_logits(z.double(), protos.double(), metric=metric).dtype == torch.float64


# ------------------------------------------------------------ AOT compile for sm_90
AOT_HELPER = REPO / "tools" / "triton_aot.py"


def test_triton_kernels_compile_for_sm90(tmp_path):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, str(AOT_HELPER), "--quick", "--op", "lp_dist", "--arch", "90"],
                          env=env, capture_output=True, text=True, timeout=1800,
                          cwd=REPO)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines and "capture_error" not in lines[0], proc.stderr[-3000:]
    results = [r for r in lines if "ok" in r]
    bad = [r for r in results if not r["ok"]]
    assert not bad, "\n".join(f"{r['kernel']} {r['config']}: {r['error']}" for r in bad)
    compiled = {r["kernel"] for r in results}
    wanted = {f"lp_dist.{k}" for k in lines[0]["defined_kernels"]["lp_dist"]}
    assert wanted <= compiled, f"never compiled: {wanted - compiled}"
    assert all(r["cubin_bytes"] > 0 for r in results)


# -------------------------------------------------------- accuracy targets, schemes, non-finite
TARGET_PS = [1.0, 1.5, 2.0, 3.0, 8.0, 9.0, 64.0, 1000.0, 1e6, INF]


def _identity_like(b, n, d, seed):
    """x ~ N(0, 1), w ~ N(0, 1) with w[n, n mod d] = -10: the LpDist identity init, whose pairs have
    one dominant coordinate (the large-p scheme's best case) next to plain Gaussian pairs (its worst)."""
    x, w = _inputs(b, n, d, seed=seed)
    w[torch.arange(n), torch.arange(n) % d] = -10.0
    w[n // 2:] = torch.randn(n - n // 2, d, generator=torch.Generator().manual_seed(seed + 1))
    return x, w


def _errors(ker, truth):
    """(max relative error of out, norm-wise relative errors of grad_x and grad_w)."""
    out, gx, gw = (t.double() for t in ker)
    t_out, t_gx, t_gw = truth
    rel_out = ((out - t_out).abs() / t_out.abs().clamp_min(1e-300)).max().item()
    return (rel_out, ((gx - t_gx).norm() / t_gx.norm()).item(), ((gw - t_gw).norm() / t_gw.norm()).item())


def _assert_accuracy_contract(x, w, p):
    """float32 kernels against the float64 reference on the same inputs: out within 1e-6
    relative (max), each gradient within 1e-5 norm-wise."""
    truth = _run(_ref, x.double(), w.double(), p)
    rel_out, rel_gx, rel_gw = _errors(_run(_api, x, w, p), truth)
    assert rel_out <= 1e-6, f"out: max relative error {rel_out:.3e}"
    assert rel_gx <= 1e-5 and rel_gw <= 1e-5, f"gradients: {rel_gx:.3e}, {rel_gw:.3e} (norm-wise)"


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("p", TARGET_PS)
def test_float32_accuracy_targets(isa, p, backend, monkeypatch):
    """The kernels' accuracy contract against a float64 reference on the same float32 inputs:
    out within 1e-6 relative, each gradient within 1e-5 norm-wise, with D = 130 (no multiple of any
    vector width), on every SIMD copy (one the CPU lacks falls back to a narrower one)."""
    backend("cpp")
    monkeypatch.setenv("DRP_CPU_ISA", isa)
    x, w = _identity_like(37, 53, 130, seed=11)
    _assert_accuracy_contract(x, w, p)


# Exponents whose power chain takes the two-bit window (lp_dist_kernels.h, tile_ipow_window): the
# forward's p or the backward's p - 1 has pairs of one bits (15, 27, 63, 127, 255; 63 and 255 as a
# forward p too), fixed at compile time (p <= 32) or at run time. 24 and 48 keep the binary chain.
WINDOW_PS = [16.0, 24.0, 28.0, 48.0, 63.0, 64.0, 127.0, 128.0, 255.0, 256.0]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("p", WINDOW_PS)
def test_power_chains_meet_the_accuracy_contract(isa, p, backend, monkeypatch):
    """The kernels' accuracy contract at the exponents of the two power chains, on every SIMD copy.
    The Gaussian pairs scaled by 0.3 have many terms near their maximum, so above p = 24 the
    sparse scheme runs its tiles densely in float (the chains under test), and a chain that
    computed a wrong power would miss the float64 truth by orders of magnitude."""
    backend("cpp")
    monkeypatch.setenv("DRP_CPU_ISA", isa)
    x, w = _identity_like(37, 53, 130, seed=13)
    _assert_accuracy_contract(x * 0.3, w, p)


@pytest.mark.parametrize("p", [25.0, 30.0, 33.0, 64.0, 40.5, 1000.0, 1e6])
def test_sparse_scheme_agrees_with_every_term(p, backend, monkeypatch):
    """Above p = 24 the kernels skip the terms below 2^-40 of a pair's largest one;
    DRP_LP_DIST_SKIP_BITS=0 computes all of them. Both agree to the accuracy contract, and the knob
    is live: skipping everything below 2^-1 changes the result."""
    backend("cpp")
    x, w = _identity_like(29, 41, 70, seed=12)
    x = x * 0.3  # bring the Gaussian coordinates near each pair's maximum: many terms matter
    skipping = _run(_api, x, w, p)
    monkeypatch.setenv("DRP_LP_DIST_SKIP_BITS", "0")
    every = _run(_api, x, w, p)
    rel_out, rel_gx, rel_gw = _errors(skipping, tuple(t.double() for t in every))
    assert rel_out <= 1e-6 and rel_gx <= 1e-5 and rel_gw <= 1e-5, (rel_out, rel_gx, rel_gw)
    if p < 1e5:  # at p = 1e6 only near-exact ties matter, whatever the threshold
        monkeypatch.setenv("DRP_LP_DIST_SKIP_BITS", "1")
        coarse = _run(_api, x, w, p)
        assert not torch.allclose(coarse[1], every[1], rtol=1e-3, atol=0), "the skip threshold has no effect"


def _popcount(words):
    """Set bits of an int64 tensor, counted byte by byte."""
    table = torch.tensor([bin(i).count("1") for i in range(256)])
    return int(table[words.contiguous().view(torch.uint8).long()].sum())


def _assert_map_backward_agrees(x, w, p, stats):
    """The backward from the forward's chunk map agrees with the blocked backward run without a
    map (1e-6 norm-wise) and with the float64 truth (1e-5 norm-wise)."""
    out, idx, inv, r = stats
    g = _upstream(x.shape[0], w.shape[0], torch.float32)
    gx_m, gw_m = torch.ops.drp.lp_dist_cpu_backward(g, x, w, out, idx, inv, r, p, True, True)
    none = torch.empty(0, 0, dtype=torch.int64)
    gx_b, gw_b = torch.ops.drp.lp_dist_cpu_backward(g, x, w, out, none, inv, r, p, True, True)
    for got, ref in ((gx_m, gx_b), (gw_m, gw_b)):
        assert ((got - ref).norm() / ref.norm()).item() <= 1e-6
    truth = _run(_ref, x.double(), w.double(), p)
    _, rel_gx, rel_gw = _errors((out, gx_m, gw_m), truth)
    assert rel_gx <= 1e-5 and rel_gw <= 1e-5, (rel_gx, rel_gw)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("p", [300.0, 1000.0, 1e6])
def test_sparse_backward_from_the_chunk_map(isa, p, monkeypatch):
    """Above p = 24 the forward's stats carry a chunk map: per pair, one bit per 8 coordinates that
    may hold a term that matters ((B, N, W) int64, W words of 64 bits). Where the map flags few
    chunks, the backward visits only those, pair by pair; it agrees with the blocked backward that
    scans everything (run when no map is given) and with the float64 truth, on every SIMD copy.
    D = 520 needs two words per pair."""
    monkeypatch.setenv("DRP_CPU_ISA", isa)
    x, w = _identity_like(21, 34, 520, seed=14)
    out, idx, inv, r = torch.ops.drp.lp_dist_cpu_forward(x, w, p, True)
    nc = (520 + 7) // 8
    assert idx.shape == (21, 34, 2) and idx.dtype == torch.int64
    flagged = _popcount(idx)
    assert 21 * 34 <= flagged <= 21 * 34 * nc // 16, flagged  # every pair has its maximum; few others
    _assert_map_backward_agrees(x, w, p, (out, idx, inv, r))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("p", [300.0, 1000.0])
def test_sparse_backward_with_many_flagged_chunks(isa, p, monkeypatch):
    """Pairs whose |x - w| are spread like u^2 (u uniform) over [0, 1] have several terms near their
    maximum, as a trained net's deeper layers have: the chunk map flags between 1 in 16 and 1 in 2
    of the chunks, where the AVX-512 copy still runs the pair by pair backward and the narrower
    copies the blocked one. Either agrees with the blocked backward run without a map and with
    the float64 truth."""
    monkeypatch.setenv("DRP_CPU_ISA", isa)
    gen = torch.Generator().manual_seed(15)
    x = 0.5 + 1e-3 * torch.randn(21, 520, generator=gen)
    sign = torch.randint(0, 2, (34, 520), generator=gen).float() * 2 - 1
    w = 0.5 + sign * torch.rand(34, 520, generator=gen) ** 2
    out, idx, inv, r = torch.ops.drp.lp_dist_cpu_forward(x, w, p, True)
    nc = (520 + 7) // 8
    flagged = _popcount(idx)
    assert 21 * 34 * nc // 16 < flagged <= 21 * 34 * nc // 2, flagged
    _assert_map_backward_agrees(x, w, p, (out, idx, inv, r))


def test_sparse_backward_rejects_a_wrong_chunk_map():
    x, w = _inputs(4, 5, 20)
    out, idx, inv, r = torch.ops.drp.lp_dist_cpu_forward(x, w, 100.0, True)
    assert idx.shape == (4, 5, 1)
    with pytest.raises(ValueError, match=r"idx must be empty or the forward's chunk map, int64 of shape \(4, 5, 1\)"):
        torch.ops.drp.lp_dist_cpu_backward(torch.ones_like(out), x, w, out, idx[:, :4], inv, r, 100.0, True, True)
    with pytest.raises(ValueError, match="chunk map"):
        torch.ops.drp.lp_dist_cpu_backward(torch.ones_like(out), x, w, out, idx.int(), inv, r, 100.0, True, True)


@pytest.mark.parametrize("p", [3.0, 8.0, 16.0])
def test_prescaled_scheme_redoes_tiny_pairs(p, backend):
    """Up to p = 16 the kernels divide x and w by one power of two and sum |d|^p in one pass; a tile
    holding a pair far smaller than the largest inputs is redone with two passes. Such a pair (its
    distance 1e-6 of the inputs' scale) stays exact, and so does its gradient."""
    backend("cpp")
    x, w = _inputs(9, 12, 30, seed=13)
    x, w = x * 100.0, w * 100.0
    w[5] = x[2] + 1e-4 * torch.randn(30, generator=torch.Generator().manual_seed(3))
    truth = _run(_ref, x.double(), w.double(), p)
    ker = _run(_api, x, w, p)
    assert ker[0][2, 5].item() > 0
    rel_out, rel_gx, rel_gw = _errors(ker, truth)
    assert rel_out <= 1e-6 and rel_gx <= 1e-5 and rel_gw <= 1e-5, (rel_out, rel_gx, rel_gw)


@pytest.mark.parametrize("p", [1.0, 2.0, 8.0, 12.5, 40.0, 1000.0, INF])
def test_nonfinite_inputs_agree_on_every_backend(p, backend):
    """A pair with a NaN has distance NaN, else one with an infinite coordinate inf. Finite p: every
    coordinate of such a pair's rows gets a NaN gradient; p = inf: the gradient sits at the first
    arg-max, NaN counting as the largest value. The same on the C++ kernels, Triton and the reference."""
    x, w = _inputs(5, 6, 11, seed=14)
    x[1, 3] = math.nan
    x[2, 7] = math.inf
    w[4, 2] = -math.inf
    w[3, 5] = math.nan
    up = _upstream(5, 6, torch.float32)
    got = {}
    for name in ("cpp", "triton", "reference"):
        backend(name)
        xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        out = lp_dist(xr, wr, p=p)
        gx, gw = torch.autograd.grad(out, (xr, wr), up)
        got[name] = (out.detach(), gx, gw)
    out = got["reference"][0]
    assert out[1].isnan().all() and out[:, 3].isnan().all()
    assert out[2, [0, 1, 2, 5]].isinf().all() and out[[0, 3], 4].isinf().all()
    if p != INF:  # every coordinate of a non-finite pair's rows
        assert got["reference"][1][[1, 2]].isnan().all() and got["reference"][2][[3, 4]].isnan().all()
    else:  # only the arg-max coordinate of each non-finite pair
        assert got["reference"][1][1].isnan().sum() == 1 and got["reference"][1][2, 7].item() != 0
    for name in ("cpp", "triton"):
        for nm, a, b in zip(("out", "grad_x", "grad_w"), got[name], got["reference"]):
            assert_verbose_allclose(a, b, atol=1e-5, rtol=1e-5, name=f"{name} {nm} p={p}")


def test_inf_forward_without_gradient_matches():
    """p = inf without a gradient skips the arg-max index: same values as with one, float32 and 64."""
    for dt in (torch.float32, torch.float64):
        x, w = _inputs(33, 47, 91, seed=15, dtype=dt)
        plain = lp_dist(x, w, p=INF)
        with_grad = lp_dist(x.clone().requires_grad_(True), w, p=INF)
        assert torch.equal(plain, with_grad.detach())
        out, idx, _, _ = torch.ops.drp.lp_dist_cpu_forward(x, w, INF, False)
        assert idx.numel() == 0 and torch.equal(out, plain)


def test_callers_denormal_mode_is_restored():
    """The kernels run with flush-to-zero set in their workers; the caller's mode is restored."""
    tiny = torch.tensor([1e-40], dtype=torch.float32)
    assert (tiny * 1.0).item() != 0.0  # denormals work here
    x, w = _inputs(64, 64, 64)
    for p in (8.0, 100.0, INF):
        lp_dist(x, w, p=p)
        assert (tiny * 1.0).item() != 0.0, f"denormals flushed after p={p}"
