"""ProtoLoss / proto_logits: the Triton kernels (under TRITON_INTERPRET=1 without a GPU) against
drp_kernels.reference, plus gradcheck, opcheck, torch.compile, modules and bad input."""
import math

import pytest
import torch
import torch.nn.functional as F

from _helpers import DEVICE, assert_verbose_allclose, optional_hypothesis
from drp_kernels import ProtoClassifier, ProtoLoss, proto_logits, proto_loss, reference

given, settings, st, _ = optional_hypothesis()
METRICS = ["linf", "l2", "cosine"]
REDUCTIONS = ["mean", "sum", "none"]
# CCE's accuracy rule: error vs fp64 ground truth <= same-dtype reference error + tol (relative to scale)
DTYPE_TOL = [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)]


def _inputs(b, d, c, *, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, d, generator=g)
    p = torch.randn(c, d, generator=g)
    y = torch.randint(0, c, (b,), generator=g)
    return z.to(device), p.to(device), y.to(device)


def _loss_and_grads(z, p, y, backend, monkeypatch, *, upstream=None, **opts):
    """Loss and gradients wrt z and prototypes on the given backend."""
    monkeypatch.setenv("DRP_BACKEND", backend)
    z = z.detach().clone().requires_grad_(True)
    p = p.detach().clone().requires_grad_(True)
    out = proto_loss(z, p, y, **opts)
    if upstream is None:
        upstream = torch.linspace(0.5, 1.5, out.numel(), device=out.device, dtype=out.dtype).reshape(out.shape)
    gz, gp = torch.autograd.grad(out, (z, p), upstream)
    return out.detach(), gz, gp


def _logits_and_grads(z, p, backend, monkeypatch, *, metric):
    monkeypatch.setenv("DRP_BACKEND", backend)
    z = z.detach().clone().requires_grad_(True)
    p = p.detach().clone().requires_grad_(True)
    out = proto_logits(z, p, metric=metric)
    gen = torch.Generator().manual_seed(1)
    upstream = torch.randn(out.shape, generator=gen).to(out.device, out.dtype)
    gz, gp = torch.autograd.grad(out, (z, p), upstream)
    return out.detach(), gz, gp


def _check_accuracy(names, kernel, ref, truth, tol):
    for name, k, r, t in zip(names, kernel, ref, truth):
        assert k.dtype == r.dtype and k.shape == r.shape, name
        scale = max(1.0, t.abs().max().item()) if t.numel() else 1.0
        ek = (k.double() - t).abs().max().item() / scale if t.numel() else 0.0
        er = (r.double() - t).abs().max().item() / scale if t.numel() else 0.0
        assert math.isfinite(ek) or not math.isfinite(er), f"{name}: kernel not finite"
        assert ek <= er + tol, f"{name}: kernel error {ek:.3e} > reference error {er:.3e} + {tol:g}"


def _compare_loss(b, d, c, metric, reduction, ce_weight, dtype, tol, monkeypatch, seed=0):
    z32, p32, y = _inputs(b, d, c, seed=seed)
    opts = dict(metric=metric, reduction=reduction, ce_weight=ce_weight, temperature=0.7)
    truth = _loss_and_grads(z32.double(), p32.double(), y, "reference", monkeypatch, **opts)
    zq, pq = z32.to(dtype), p32.to(dtype)
    ref = _loss_and_grads(zq, pq, y, "reference", monkeypatch, **opts)
    ker = _loss_and_grads(zq, pq, y, "triton", monkeypatch, **opts)
    names = ("loss", "grad_z", "grad_prototypes")
    _check_accuracy(names, ker, ref, truth, tol)
    if dtype == torch.float32:
        for name, k, r in zip(names, ker, ref):
            assert_verbose_allclose(k, r, atol=2e-5, rtol=1e-4, name=name)


# ----------------------------------------------------------- kernels vs reference
@pytest.mark.parametrize("dtype,tol", DTYPE_TOL, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("ce_weight", [0.0, 0.5])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("metric", METRICS)
def test_loss_matches_reference_small(metric, reduction, ce_weight, dtype, tol, monkeypatch):
    _compare_loss(9, 20, 11, metric, reduction, ce_weight, dtype, tol, monkeypatch)


@pytest.mark.parametrize("b,d,c", [(37, 130, 257), (1, 130, 257), (37, 130, 1)])
@pytest.mark.parametrize("ce_weight", [0.0, 0.5])
@pytest.mark.parametrize("metric", METRICS)
def test_loss_matches_reference_odd_shapes(metric, ce_weight, b, d, c, monkeypatch):
    _compare_loss(b, d, c, metric, "mean", ce_weight, torch.float32, 1e-5, monkeypatch, seed=1)


@pytest.mark.parametrize("metric", METRICS)
def test_loss_odd_shapes_bf16(metric, monkeypatch):
    _compare_loss(37, 130, 257, metric, "sum", 0.5, torch.bfloat16, 1e-2, monkeypatch, seed=2)


@pytest.mark.parametrize("dtype,tol", DTYPE_TOL, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("metric", METRICS)
def test_logits_match_reference_small(metric, dtype, tol, monkeypatch):
    z32, p32, _ = _inputs(9, 20, 11, seed=3)
    truth = _logits_and_grads(z32.double(), p32.double(), "reference", monkeypatch, metric=metric)
    ref = _logits_and_grads(z32.to(dtype), p32.to(dtype), "reference", monkeypatch, metric=metric)
    ker = _logits_and_grads(z32.to(dtype), p32.to(dtype), "triton", monkeypatch, metric=metric)
    _check_accuracy(("logits", "grad_z", "grad_prototypes"), ker, ref, truth, tol)


@pytest.mark.parametrize("b,d,c", [(37, 130, 257), (1, 7, 1)])
@pytest.mark.parametrize("metric", METRICS)
def test_logits_match_reference_odd_shapes(metric, b, d, c, monkeypatch):
    z, p, _ = _inputs(b, d, c, seed=4)
    ref = _logits_and_grads(z, p, "reference", monkeypatch, metric=metric)
    ker = _logits_and_grads(z, p, "triton", monkeypatch, metric=metric)
    for name, k, r in zip(("logits", "grad_z", "grad_prototypes"), ker, ref):
        assert_verbose_allclose(k, r, atol=2e-5, rtol=1e-4, name=name)


def test_mixed_dtypes_half_z_fp32_prototypes(monkeypatch):
    """The AMP case: bf16 z with the module's fp32 prototypes; gradients come back in each input's dtype."""
    z32, p32, y = _inputs(9, 20, 11, seed=5)
    opts = dict(metric="cosine", reduction="mean", ce_weight=0.3, temperature=0.5)
    truth = _loss_and_grads(z32.double(), p32.double(), y, "reference", monkeypatch, **opts)
    ref = _loss_and_grads(z32.bfloat16(), p32, y, "reference", monkeypatch, **opts)
    ker = _loss_and_grads(z32.bfloat16(), p32, y, "triton", monkeypatch, **opts)
    assert ker[1].dtype == torch.bfloat16 and ker[2].dtype == torch.float32
    _check_accuracy(("loss", "grad_z", "grad_prototypes"), ker, ref, truth, 1e-2)


@pytest.mark.parametrize("metric", METRICS)
def test_strided_inputs(metric, monkeypatch):
    """Non-contiguous z, prototypes and y are read through their strides."""
    z, p, y = _inputs(12, 24, 10, seed=6)
    zt = z.t().contiguous().t()            # column-major view
    pt = torch.cat([p, p], dim=1)[:, ::2]  # stride 2 along D
    yt = torch.stack([y, y], dim=1)[:, 0]  # stride 2
    assert not zt.is_contiguous() and not pt.is_contiguous() and not yt.is_contiguous()
    opts = dict(metric=metric, reduction="sum", ce_weight=0.4)
    ref = _loss_and_grads(z, pt.contiguous(), y, "reference", monkeypatch, **opts)
    ker = _loss_and_grads(zt, pt, yt, "triton", monkeypatch, **opts)
    for name, k, r in zip(("loss", "grad_z", "grad_prototypes"), ker, ref):
        assert_verbose_allclose(k, r, atol=2e-5, rtol=1e-4, name=name)
    monkeypatch.setenv("DRP_BACKEND", "triton")
    assert_verbose_allclose(proto_logits(zt, pt, metric=metric),
                            reference.proto_logits(z, pt.contiguous(), metric=metric),
                            atol=2e-5, rtol=1e-4, name="logits")


def test_linf_ties_take_first_argmax(monkeypatch):
    """Tied |z - p| coordinates: reference and kernel both put the subgradient on the first one."""
    z = torch.tensor([[1.0, -1.0, 0.5, 1.0], [0.0, 0.0, 0.0, 0.0]], device=DEVICE)
    p = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 2.0, -2.0, 0.0]], device=DEVICE)
    y = torch.tensor([0, 1], device=DEVICE)
    one = torch.tensor(1.0, device=DEVICE)
    ref = _loss_and_grads(z, p, y, "reference", monkeypatch, metric="linf", reduction="sum", upstream=one)
    ker = _loss_and_grads(z, p, y, "triton", monkeypatch, metric="linf", reduction="sum", upstream=one)
    expected_gz = torch.tensor([[1.0, 0, 0, 0], [0, -1.0, 0, 0]], device=DEVICE)
    assert_verbose_allclose(ref[1], expected_gz, name="reference grad_z")
    for name, k, r in zip(("loss", "grad_z", "grad_prototypes"), ker, ref):
        assert_verbose_allclose(k, r, name=name)


def test_l2_gradient_is_zero_at_the_prototype(monkeypatch):
    z, p, y = _inputs(4, 6, 3, seed=7)
    z = p[y].clone()
    for backend in ("reference", "triton"):
        loss, gz, gp = _loss_and_grads(z, p, y, backend, monkeypatch, metric="l2", reduction="sum")
        assert loss.item() == 0.0
        assert torch.count_nonzero(gz) == 0 and torch.count_nonzero(gp) == 0, backend


@pytest.mark.parametrize("ce_weight", [0.0, 1.0])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_cosine_zero_row_is_finite(backend, ce_weight, monkeypatch):
    z, p, y = _inputs(5, 8, 4, seed=8)
    z[2] = 0.0
    loss, gz, gp = _loss_and_grads(z, p, y, backend, monkeypatch, metric="cosine", ce_weight=ce_weight)
    assert torch.isfinite(loss).all() and torch.isfinite(gz).all() and torch.isfinite(gp).all()
    if backend == "triton":
        ref = _loss_and_grads(z, p, y, "reference", monkeypatch, metric="cosine", ce_weight=ce_weight)
        for name, k, r in zip(("loss", "grad_z", "grad_prototypes"), (loss, gz, gp), ref):
            assert_verbose_allclose(k, r, atol=1e-5, rtol=1e-4, name=name)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_empty_batch(backend, monkeypatch):
    """B = 0: mean is NaN (torch's mean of nothing), sum is 0, none is empty; backward works."""
    monkeypatch.setenv("DRP_BACKEND", backend)
    z = torch.zeros(0, 5, device=DEVICE, requires_grad=True)
    p = torch.randn(3, 5, device=DEVICE)
    y = torch.zeros(0, dtype=torch.int64, device=DEVICE)
    assert torch.isnan(proto_loss(z, p, y, reduction="mean"))
    s = proto_loss(z, p, y, reduction="sum", ce_weight=0.5)
    assert s.item() == 0.0
    s.backward()
    assert z.grad.shape == (0, 5)
    assert proto_loss(z, p, y, reduction="none").shape == (0,)
    assert proto_logits(z, p, metric="l2").shape == (0, 3)


def _cosine_ce_through_matmul(z, p, y, *, compute_dtype, reduction):
    """Loss and gradients of 1 - cos(z, P[y]) + cross_entropy(cos(z, P), y) via one matmul.

    Same value as reference.proto_loss(metric="cosine", ce_weight=1, temperature=1) for nonzero
    rows, without its B x C x D broadcast, so large shapes stay cheap. Inputs keep their dtype
    (gradients come back in it); the arithmetic runs in ``compute_dtype``.
    """
    z = z.detach().clone().requires_grad_(True)
    p = p.detach().clone().requires_grad_(True)
    cos = F.normalize(z.to(compute_dtype), dim=1) @ F.normalize(p.to(compute_dtype), dim=1).T
    per_sample = 1.0 - cos.gather(1, y[:, None])[:, 0] + F.cross_entropy(cos, y, reduction="none")
    out = per_sample.mean() if reduction == "mean" else per_sample.sum()
    return (out.detach(), *torch.autograd.grad(out, (z, p)))


def test_fused_cosine_ce_fp16_backward_large_c(monkeypatch):
    """fp16 cosine CE at B=512, C=8192 with |P_c| ~ 170: the backward's weights g * softmax / |P_c|
    (~1e-9) lie below fp16's smallest subnormal; the kernel must still be as accurate as PyTorch in fp16
    (fp16 inputs, fp32 arithmetic, fp16 gradients) against an fp64 ground truth."""
    b, c, d = 512, 8192, 32
    reduction = "mean"  # 1 / B makes the weights smallest
    g = torch.Generator().manual_seed(21)
    z = torch.randn(b, d, generator=g).to(DEVICE)
    p = torch.randn(c, d, generator=g).to(DEVICE)
    p = 170.0 * p / p.norm(dim=1, keepdim=True)
    y = torch.randint(0, c, (b,), generator=g).to(DEVICE)
    z16, p16 = z.half(), p.half()
    truth = _cosine_ce_through_matmul(z16.double(), p16.double(), y, compute_dtype=torch.float64,
                                      reduction=reduction)
    torch_fp16 = _cosine_ce_through_matmul(z16, p16, y, compute_dtype=torch.float32, reduction=reduction)
    kernel = _loss_and_grads(z16, p16, y, "triton", monkeypatch, upstream=torch.tensor(1.0, device=DEVICE),
                             metric="cosine", reduction=reduction, ce_weight=1.0, temperature=1.0)
    for name, k, r, t in zip(("loss", "grad_z", "grad_prototypes"), kernel, torch_fp16, truth):
        assert k.dtype == r.dtype and k.shape == r.shape, name
        scale = t.abs().max().item()  # the gradients are ~1e-3: errors relative to their own size
        ek = (k.double() - t).abs().max().item() / scale
        er = (r.double() - t).abs().max().item() / scale
        assert ek <= er + 2e-4, f"{name}: kernel relative error {ek:.3e} > PyTorch fp16 error {er:.3e} + 2e-4"


# ------------------------------------------------------------- gradcheck / opcheck
@pytest.mark.parametrize("ce_weight", [0.0, 0.7])
@pytest.mark.parametrize("metric", METRICS)
def test_gradcheck_reference_float64(metric, ce_weight):
    z, p, y = _inputs(4, 5, 3, seed=9, device="cpu")
    z = z.double().requires_grad_(True)
    p = p.double().requires_grad_(True)
    fn = lambda a, b: reference.proto_loss(a, b, y, metric=metric, ce_weight=ce_weight, temperature=0.8)
    assert torch.autograd.gradcheck(fn, (z, p))
    assert torch.autograd.gradcheck(lambda a, b: reference.proto_logits(a, b, metric=metric), (z, p))


@pytest.mark.parametrize("metric", METRICS)
def test_opcheck(metric):
    z, p, y = _inputs(6, 20, 5, seed=10)
    z.requires_grad_(True)
    p.requires_grad_(True)
    for ce in (0.0, 0.5):
        torch.library.opcheck(torch.ops.drp.proto_loss.default, (z, p, y, metric, ce, 0.9))
    torch.library.opcheck(torch.ops.drp.proto_logits.default, (z, p, metric))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_torch_compile_model_and_loss_fullgraph(backend, monkeypatch):
    monkeypatch.setenv("DRP_BACKEND", backend)
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8)).to(DEVICE)
    crit = ProtoLoss(torch.randn(5, 8, device=DEVICE), metric="cosine", ce_weight=0.5)
    x = torch.randn(7, 10, device=DEVICE)
    y = torch.randint(0, 5, (7,), device=DEVICE)

    def step(x, y):
        return crit(net(x), y)

    eager = step(x, y)
    eager.backward()
    grads = [q.grad.clone() for q in net.parameters()]
    net.zero_grad()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(x, y)
    compiled.backward()
    assert_verbose_allclose(compiled, eager, atol=1e-6, rtol=1e-5, name="loss")
    for q, g in zip(net.parameters(), grads):
        assert_verbose_allclose(q.grad, g, atol=1e-6, rtol=1e-5, name="param grad")
    torch._dynamo.reset()


# ----------------------------------------------------------------------- modules
def test_learnable_prototypes_get_gradients(triton_backend):
    z, p, y = _inputs(6, 8, 4, seed=11)
    crit = ProtoLoss(p, metric="l2", ce_weight=0.5, learnable=True).to(DEVICE)
    assert isinstance(crit.prototypes, torch.nn.Parameter)
    crit(z, y).backward()
    zr = z.clone()
    pr = p.clone().requires_grad_(True)
    reference.proto_loss(zr, pr, y, metric="l2", ce_weight=0.5).backward()
    assert_verbose_allclose(crit.prototypes.grad, pr.grad, atol=1e-5, rtol=1e-4, name="grad_prototypes")
    fixed = ProtoLoss(p)
    assert "prototypes" in dict(fixed.named_buffers()) and not list(fixed.parameters())


def test_module_logits_predict_and_repr():
    z, p, y = _inputs(6, 8, 4, seed=12)
    crit = ProtoLoss(p, metric="linf", reduction="sum").to(DEVICE)
    logits = crit.logits(z)
    assert_verbose_allclose(logits, reference.proto_logits(z, p, metric="linf"), name="logits")
    assert torch.equal(crit.predict(z), logits.argmax(dim=1))
    assert "metric='linf'" in repr(crit) and "num_classes=4" in repr(crit)
    assert_verbose_allclose(crit(z, y), reference.proto_loss(z, p, y, reduction="sum"), name="loss")


def test_proto_classifier_returns_logits_of_net():
    torch.manual_seed(0)
    net = torch.nn.Linear(6, 8).to(DEVICE)
    p = torch.randn(4, 8)
    clf = ProtoClassifier(net, p, metric="cosine").to(DEVICE)
    x = torch.rand(3, 6, device=DEVICE)
    assert clf.net is net and clf.metric == "cosine"
    assert "prototypes" in dict(clf.named_buffers())
    expected = reference.proto_logits(net(x), p.to(DEVICE), metric="cosine")
    assert_verbose_allclose(clf(x), expected, atol=1e-6, rtol=1e-5, name="logits")
    assert "metric='cosine'" in repr(clf)


# --------------------------------------------------------------------- bad input
def _bad_cases():
    z, p, y = _inputs(4, 5, 3)
    return [
        (dict(z=z[0]), "z must be 2-D"),
        (dict(p=torch.randn(3, 6, device=DEVICE)), "D=5 but prototypes have D=6"),
        (dict(y=y.float()), "y must hold integer class indices"),
        (dict(y=y[:3]), r"y must have shape \(4,\)"),
        (dict(y=torch.tensor([0, 1, 3, 0], device=DEVICE)), r"class indices in \[0, 3\), got y\[2\] = 3"),
        (dict(y=torch.tensor([0, -1, 2, 0], device=DEVICE)), r"got y\[1\] = -1"),
        (dict(metric="l1"), "metric must be one of"),
        (dict(p=p[0]), "prototypes must be 2-D"),
        (dict(reduction="avg"), "reduction must be one of"),
        (dict(temperature=0.0), "temperature must be"),
        (dict(z=z.int()), "z must be float32"),
    ]


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("case", range(11))
def test_bad_input_errors_name_the_argument(case, backend, monkeypatch):
    monkeypatch.setenv("DRP_BACKEND", backend)
    z, p, y = _inputs(4, 5, 3)
    over, match = _bad_cases()[case]
    args = dict(z=z, p=p, y=y, metric="linf", reduction="mean", temperature=1.0)
    args.update(over)
    with pytest.raises(ValueError, match=match):
        proto_loss(args["z"], args["p"], args["y"], metric=args["metric"], reduction=args["reduction"],
                   temperature=args["temperature"])


def test_bad_module_options():
    with pytest.raises(ValueError, match="metric must be one of"):
        ProtoLoss(torch.randn(3, 4), metric="cos")
    with pytest.raises(ValueError, match="prototypes must be 2-D"):
        ProtoClassifier(torch.nn.Identity(), torch.randn(4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.cuda
def test_bad_device_for_y():
    z, p, y = _inputs(4, 5, 3, device="cuda")
    with pytest.raises(ValueError, match="y must be on z's device"):
        proto_loss(z, p, y.cpu())


# ------------------------------------------------------------------- properties
@settings(max_examples=12, deadline=None)
@given(b=st.integers(1, 12), d=st.integers(1, 40), c=st.integers(1, 20), metric=st.sampled_from(METRICS),
       ce_weight=st.sampled_from([0.0, 0.3]), seed=st.integers(0, 2**16))
def test_property_kernels_match_reference(b, d, c, metric, ce_weight, seed):
    mp = pytest.MonkeyPatch()
    try:
        z, p, y = _inputs(b, d, c, seed=seed)
        opts = dict(metric=metric, reduction="mean", ce_weight=ce_weight, temperature=0.9)
        ref = _loss_and_grads(z, p, y, "reference", mp, **opts)
        ker = _loss_and_grads(z, p, y, "triton", mp, **opts)
        for name, k, r in zip(("loss", "grad_z", "grad_prototypes"), ker, ref):
            assert_verbose_allclose(k, r, atol=2e-5, rtol=1e-4, name=name)
        mp.setenv("DRP_BACKEND", "triton")
        assert_verbose_allclose(proto_logits(z, p, metric=metric), reference.proto_logits(z, p, metric=metric),
                                atol=2e-5, rtol=1e-4, name="logits")
    finally:
        mp.undo()


# ------------------------------------------------------------------------- CUDA
@pytest.mark.cuda
def test_cuda_loss_only_int64_indexing():
    """B * D > 2**31 elements: row offsets must be computed in int64."""
    b, d, c = 2**22 + 3, 512, 10
    z = torch.randn(b, d, device="cuda", dtype=torch.float16)
    p = torch.randn(c, d, device="cuda", dtype=torch.float16)
    y = torch.randint(0, c, (b,), device="cuda")
    out = proto_loss(z, p, y, metric="linf", reduction="none")
    tail = slice(b - 1000, b)
    assert_verbose_allclose(out[tail], reference.proto_loss(z[tail], p, y[tail], metric="linf", reduction="none"),
                            atol=1e-6, rtol=1e-6, name="tail rows")


@pytest.mark.cuda
def test_cuda_column_major_z_int64_offsets():
    """A column-major z view: D offsets d * stride_zd pass 2**31 elements (int64 D offsets)."""
    b, d, c = 2**22 + 3, 512, 10
    z = torch.randn(d, b, device="cuda", dtype=torch.float16).t()
    assert z.stride() == (1, b) and (d - 1) * b > 2**31
    p = torch.randn(c, d, device="cuda", dtype=torch.float16)
    y = torch.randint(0, c, (b,), device="cuda")
    tail = slice(b - 1000, b)
    for metric in ("linf", "cosine"):
        out = proto_loss(z, p, y, metric=metric, reduction="none")
        ref = reference.proto_loss(z[tail].contiguous(), p, y[tail], metric=metric, reduction="none")
        assert_verbose_allclose(out[tail], ref, atol=1e-5, rtol=1e-5, name=f"{metric} tail rows")


@pytest.mark.cuda
def test_cuda_logits_int64_indexing():
    """B * C > 2**31 logits."""
    b, c, d = 46341, 46341, 16
    z = torch.randn(b, d, device="cuda")
    p = torch.randn(c, d, device="cuda")
    out = proto_logits(z, p, metric="linf")
    tail = slice(b - 64, b)
    assert_verbose_allclose(out[tail], reference.proto_logits(z[tail], p, metric="linf"), atol=1e-5, rtol=1e-5,
                            name="tail rows")
    del out


@pytest.mark.cuda
def test_cuda_fused_ce_never_materialises_bxc():
    b, c, d = 1024, 50000, 64
    z = torch.randn(b, d, device="cuda", requires_grad=True)
    p = torch.randn(c, d, device="cuda")
    y = torch.randint(0, c, (b,), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    proto_loss(z, p, y, metric="cosine", ce_weight=1.0).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 0.1 * b * c * 4, f"peak extra memory {extra} bytes"
