"""Public API behaviour: one default metric, ProtoLoss' CrossEntropyLoss options, ProtoClassifier
sharing a ProtoLoss and its decision rules, the target check switches and the error policy."""
import inspect

import pytest
import torch
import torch.nn.functional as F

import drp_kernels
from _helpers import DEVICE, assert_verbose_allclose
from drp_kernels import ProtoClassifier, ProtoLoss, paper_logits, proto_logits, proto_loss, reference
from drp_kernels._constants import DEFAULT_METRIC

METRICS = ["linf", "l2", "cosine"]
BACKENDS = ["reference", "triton"]


def _inputs(b, d, c, *, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, d, generator=g)
    p = torch.randn(c, d, generator=g)
    y = torch.randint(0, c, (b,), generator=g)
    return z.to(DEVICE), p.to(DEVICE), y.to(DEVICE)


def _expected(z, p, y, *, metric, reduction, ce_weight, temperature=1.0, ignore_index=-100, weight=None,
              label_smoothing=0.0):
    """The loss built from primitives: distances of the kept samples + F.cross_entropy on the logits."""
    d = reference.proto_distance(z, p, metric=metric)
    keep = y != ignore_index
    dist = d[torch.arange(len(y), device=y.device)[keep], y[keep]]
    per = torch.zeros(len(y), dtype=d.dtype, device=d.device)
    per[keep] = dist
    if reduction == "none":
        out = per
    elif reduction == "sum":
        out = dist.sum()
    else:
        out = dist.mean() if keep.any() else torch.tensor(float("nan"), dtype=d.dtype, device=d.device)
    if ce_weight:
        logits = (1.0 - d if metric == "cosine" else -d) / temperature
        out = out + ce_weight * F.cross_entropy(logits, y, weight=weight, ignore_index=ignore_index,
                                                label_smoothing=label_smoothing, reduction=reduction)
    return out


def _value_and_grads(fn, z, p):
    z = z.detach().clone().requires_grad_(True)
    p = p.detach().clone().requires_grad_(True)
    out = fn(z, p)
    up = torch.linspace(0.5, 1.5, out.numel(), device=out.device, dtype=out.dtype).reshape(out.shape)
    if not out.requires_grad:
        return out.detach(), torch.zeros_like(z), torch.zeros_like(p)
    gz, gp = torch.autograd.grad(out, (z, p), up)
    return out.detach(), gz, gp


def _assert_same(got, want, **tol):
    for name, g, w in zip(("loss", "grad_z", "grad_prototypes"), got, want):
        assert_verbose_allclose(g, w, name=name, **tol)


# ------------------------------------------------------------------ one default metric
def test_one_default_metric_everywhere():
    assert DEFAULT_METRIC == "linf"
    for fn in (drp_kernels.proto_loss, drp_kernels.proto_logits, drp_kernels.paper_logits,
               drp_kernels.repulsion_energy, drp_kernels.repulsive_prototypes, ProtoLoss.__init__,
               drp_kernels.reference.proto_loss, drp_kernels.reference.repulsion_energy):
        assert inspect.signature(fn).parameters["metric"].default == DEFAULT_METRIC, fn
    net = torch.nn.Identity()
    assert ProtoClassifier(net, torch.randn(3, 4)).metric == DEFAULT_METRIC
    assert ProtoLoss(torch.randn(3, 4)).metric == DEFAULT_METRIC


# ------------------------------------------------------------------------ ignore_index
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ce_weight", [0.0, 0.5])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("metric", METRICS)
def test_ignore_index_drops_samples(metric, reduction, ce_weight, backend, monkeypatch):
    monkeypatch.setenv("DRP_BACKEND", backend)
    z, p, y = _inputs(11, 17, 6, seed=1)
    y[[0, 4, 5, 9]] = -100
    opts = dict(metric=metric, reduction=reduction, ce_weight=ce_weight, temperature=0.7)
    got = _value_and_grads(lambda a, b: proto_loss(a, b, y, **opts), z, p)
    want = _value_and_grads(lambda a, b: _expected(a, b, y, **opts), z, p)
    _assert_same(got, want, atol=2e-5, rtol=1e-4)
    assert torch.count_nonzero(got[1][[0, 4, 5, 9]]) == 0  # ignored rows get no gradient
    # a custom ignore_index, with the default -100 now an ordinary out-of-range target
    y2 = torch.where(y == -100, torch.full_like(y, 7), y)
    got2 = _value_and_grads(lambda a, b: proto_loss(a, b, y2, ignore_index=7, **opts), z, p)
    _assert_same(got2, got, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", METRICS)
def test_all_ignored_batch_is_what_cross_entropy_gives(metric, backend, monkeypatch):
    monkeypatch.setenv("DRP_BACKEND", backend)
    z, p, _ = _inputs(5, 8, 4, seed=2)
    y = torch.full((5,), -100, device=DEVICE)
    ce_mean = F.cross_entropy(torch.randn(5, 4, device=DEVICE), y)
    for ce_weight in (0.0, 0.5):
        zz = z.clone().requires_grad_(True)
        mean = proto_loss(zz, p, y, metric=metric, ce_weight=ce_weight)
        assert torch.isnan(mean) and torch.isnan(ce_mean)
        mean.backward()
        assert torch.count_nonzero(zz.grad) == 0 and not torch.isnan(zz.grad).any()
        assert proto_loss(z, p, y, metric=metric, ce_weight=ce_weight, reduction="sum").item() == 0.0
        assert torch.equal(proto_loss(z, p, y, metric=metric, ce_weight=ce_weight, reduction="none"),
                           torch.zeros(5, device=DEVICE))


# ---------------------------------------------------------- weight and label smoothing
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("metric", METRICS)
def test_weight_and_label_smoothing_follow_cross_entropy(metric, reduction, backend, monkeypatch):
    monkeypatch.setenv("DRP_BACKEND", backend)
    z, p, y = _inputs(13, 9, 5, seed=3)
    y[[2, 7]] = -100
    w = torch.tensor([0.5, 2.0, 1.0, 0.25, 3.0], device=DEVICE)
    for extra in (dict(weight=w), dict(label_smoothing=0.2), dict(weight=w, label_smoothing=0.1)):
        opts = dict(metric=metric, reduction=reduction, ce_weight=0.8, temperature=0.5, **extra)
        got = _value_and_grads(lambda a, b, o=opts: proto_loss(a, b, y, **o), z, p)
        want = _value_and_grads(lambda a, b, o=opts: _expected(a, b, y, **o), z, p)
        _assert_same(got, want, atol=2e-5, rtol=1e-4)
    # without the CE term, weight and smoothing change nothing
    plain = proto_loss(z, p, y, metric=metric, reduction=reduction)
    assert torch.equal(proto_loss(z, p, y, metric=metric, reduction=reduction, weight=w, label_smoothing=0.3), plain)


@pytest.mark.parametrize("metric", METRICS)
def test_kernels_match_reference_with_all_options(metric, monkeypatch):
    z, p, y = _inputs(37, 30, 11, seed=4)
    y[::5] = -1
    w = torch.rand(11, generator=torch.Generator().manual_seed(0)).to(DEVICE) + 0.5
    opts = dict(metric=metric, ce_weight=0.3, temperature=0.9, ignore_index=-1, weight=w, label_smoothing=0.05)
    monkeypatch.setenv("DRP_BACKEND", "reference")
    ref = _value_and_grads(lambda a, b: proto_loss(a, b, y, **opts), z, p)
    monkeypatch.setenv("DRP_BACKEND", "triton")
    ker = _value_and_grads(lambda a, b: proto_loss(a, b, y, **opts), z, p)
    _assert_same(ker, ref, atol=2e-5, rtol=1e-4)


# ------------------------------------------------------------------------ target dtypes
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int32, torch.int16, torch.int8])
def test_integer_targets_of_any_width(dtype, backend, monkeypatch):
    monkeypatch.setenv("DRP_BACKEND", backend)
    z, p, y = _inputs(9, 6, 4, seed=5)
    want = proto_loss(z, p, y, ce_weight=0.5, reduction="none")
    assert torch.equal(proto_loss(z, p, y.to(dtype), ce_weight=0.5, reduction="none"), want)
    crit = ProtoLoss(p, ce_weight=0.5, reduction="none")
    assert torch.equal(crit(z, y.to(dtype)), want)


@pytest.mark.parametrize("bad,exc,match", [
    (lambda y: y.float(), ValueError, "y must hold integer class indices"),
    (lambda y: y.bool(), ValueError, "y must hold integer class indices"),
    (lambda y: y.tolist(), TypeError, "y must be a torch.Tensor"),
])
def test_bad_target_types(bad, exc, match):
    z, p, y = _inputs(4, 3, 2, seed=6)
    with pytest.raises(exc, match=match):
        proto_loss(z, p, bad(y))


# -------------------------------------------------------------------- target checks
def test_target_check_switch(monkeypatch):
    monkeypatch.setenv("DRP_BACKEND", "triton")
    z, p, y = _inputs(4, 3, 2, seed=7)
    y[1] = 5
    with pytest.raises(ValueError, match=r"y\[1\] = 5"):
        proto_loss(z, p, y, reduction="none")
    assert drp_kernels.functional.target_checks_enabled()
    monkeypatch.setenv("DRP_CHECK_TARGETS", "0")
    assert not drp_kernels.functional.target_checks_enabled()
    out = proto_loss(z, p, y, reduction="none")  # no check, no sync: the kernel marks the row NaN
    assert torch.isnan(out[1]) and torch.isfinite(out[[0, 2, 3]]).all()


def test_target_check_skipped_during_graph_capture(monkeypatch):
    """While a CUDA stream is captured the check (a host sync) must not run."""
    monkeypatch.setenv("DRP_BACKEND", "triton")
    z, p, y = _inputs(4, 3, 2, seed=8)
    y[2] = -3
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert torch.isnan(proto_loss(z, p, y, reduction="none")[2])
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    with pytest.raises(ValueError, match="ignore_index"):
        proto_loss(z, p, y, reduction="none")


# ------------------------------------------------------------- ProtoLoss module options
def test_proto_loss_module_options_and_repr():
    z, p, y = _inputs(8, 5, 3, seed=9)
    y[0] = 255
    w = torch.tensor([1.0, 2.0, 0.5], device=DEVICE)
    crit = ProtoLoss(p, ce_weight=0.4, ignore_index=255, weight=w, label_smoothing=0.1).to(DEVICE)
    assert "weight" in dict(crit.named_buffers())
    want = _expected(z, p, y, metric="linf", reduction="mean", ce_weight=0.4, ignore_index=255, weight=w,
                     label_smoothing=0.1)
    assert_verbose_allclose(crit(z, y.to(torch.uint8)), want, atol=1e-6, rtol=1e-5, name="loss")
    r = repr(crit)
    assert "ignore_index=255" in r and "label_smoothing=0.1" in r and "weight=" in r
    assert "ignore_index" not in repr(ProtoLoss(p))
    for doc in (ProtoLoss.forward, ProtoLoss.logits, ProtoLoss.predict):
        assert doc.__doc__ and len(doc.__doc__) > 40


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(weight=torch.ones(4)), ValueError, r"weight must be a floating-point tensor of shape \(3,\)"),
    (dict(weight=[1.0, 1.0, 1.0]), TypeError, "weight must be a torch.Tensor"),
    (dict(label_smoothing=1.5), ValueError, "label_smoothing"),
    (dict(ignore_index=1.0), TypeError, "ignore_index"),
    (dict(temperature="1"), TypeError, "temperature"),
    (dict(ce_weight=None), TypeError, "ce_weight"),
    (dict(metric=2), TypeError, "metric"),
    (dict(reduction="avg"), ValueError, "reduction"),
])
def test_proto_loss_bad_options(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        ProtoLoss(torch.randn(3, 4), **kwargs)


def test_functional_error_policy():
    z, p, y = _inputs(4, 3, 2, seed=10)
    with pytest.raises(TypeError, match="z must be a torch.Tensor"):
        proto_loss(z.tolist(), p, y)
    with pytest.raises(TypeError, match="prototypes must be a torch.Tensor"):
        proto_logits(z, p.tolist())
    with pytest.raises(ValueError, match=r"weight must have shape \(2,\)"):
        proto_loss(z, p, y, weight=torch.ones(3, device=DEVICE), ce_weight=1.0)
    with pytest.raises(TypeError, match="P must be a torch.Tensor"):
        drp_kernels.repulsion_energy([[0.0, 1.0]])
    with pytest.raises(TypeError, match="kind"):
        drp_kernels.repulsion_energy(p, kind=None)


# ------------------------------------------------------------------- ProtoClassifier
def test_classifier_shares_a_learnable_proto_loss():
    torch.manual_seed(0)
    net = torch.nn.Linear(6, 4).to(DEVICE)
    crit = ProtoLoss(torch.randn(3, 4), metric="l2", learnable=True).to(DEVICE)
    clf = ProtoClassifier(net, crit)
    assert clf.prototypes is crit.prototypes and clf.metric == "l2"
    assert clf.proto_loss is crit
    assert any(q is crit.prototypes for q in clf.parameters())
    x = torch.rand(5, 6, device=DEVICE)
    y = torch.tensor([0, 1, 2, 0, 1], device=DEVICE)
    opt = torch.optim.SGD(list(net.parameters()) + list(crit.parameters()), lr=0.5)
    before = crit.prototypes.detach().clone()
    crit(net(x), y).backward()
    opt.step()
    assert not torch.equal(crit.prototypes.detach(), before)  # the prototypes moved ...
    want = reference.proto_logits(net(x), crit.prototypes, metric="l2")
    assert_verbose_allclose(clf(x), want, atol=1e-6, rtol=1e-5, name="logits")  # ... and clf sees it
    crit.metric = "cosine"  # options too are read from the loss at every call
    assert clf.metric == "cosine"
    assert_verbose_allclose(clf(x), reference.proto_logits(net(x), crit.prototypes, metric="cosine"),
                            atol=1e-6, rtol=1e-5, name="logits")
    assert "shared with proto_loss" in repr(clf)
    assert set(clf.state_dict()) == {"net.weight", "net.bias", "proto_loss.prototypes"}


def test_classifier_shares_buffer_prototypes_across_moves():
    crit = ProtoLoss(torch.randn(3, 4), metric="cosine")
    clf = ProtoClassifier(torch.nn.Identity(), crit).to(torch.float64)
    assert crit.prototypes.dtype == torch.float64 and clf.prototypes is crit.prototypes
    with pytest.raises(ValueError, match="disagrees"):
        ProtoClassifier(torch.nn.Identity(), crit, metric="linf")
    assert ProtoClassifier(torch.nn.Identity(), crit, metric="cosine").metric == "cosine"


def test_classifier_with_a_tensor_keeps_its_copy():
    p = torch.randn(3, 4)
    clf = ProtoClassifier(torch.nn.Identity(), p, metric="l2")
    p.add_(1.0)
    assert not torch.equal(clf.prototypes, p) and "prototypes" in dict(clf.named_buffers())
    assert clf.metric == "l2" and "decision='nearest'" in repr(clf)


@pytest.mark.parametrize("metric", METRICS)
def test_paper_decision_rule(metric):
    torch.manual_seed(1)
    net = torch.nn.Linear(6, 8).to(DEVICE)
    p = torch.randn(5, 8, device=DEVICE) * 3
    x = torch.rand(7, 6, device=DEVICE)
    clf = ProtoClassifier(net, p, metric=metric, decision="paper")
    z = net(x).double()
    if metric == "linf":
        zn = z / z.abs().amax(dim=1, keepdim=True)
    else:
        zn = z / z.norm(dim=1, keepdim=True)
    want = zn @ p.double().T
    out = clf(x)
    assert out.dtype == torch.float32
    assert_verbose_allclose(out, want, atol=1e-5, rtol=1e-5, name="paper logits")
    assert torch.equal(clf.predict(x), want.argmax(dim=1))
    assert_verbose_allclose(paper_logits(net(x), p, metric=metric), want, atol=1e-5, rtol=1e-5, name="functional")
    x.requires_grad_(True)
    clf(x).sum().backward()  # differentiable, so attacks can target this rule
    assert x.grad is not None and torch.isfinite(x.grad).all()
    nearest = ProtoClassifier(net, p, metric=metric)
    assert torch.equal(nearest.predict(x), reference.proto_logits(net(x), p, metric=metric).argmax(dim=1))
    assert "decision='paper'" in repr(clf)


def test_paper_decision_zero_output_is_finite():
    clf = ProtoClassifier(torch.nn.Identity(), torch.randn(3, 4), decision="paper")
    assert torch.equal(clf(torch.zeros(2, 4)), torch.zeros(2, 3))


def test_classifier_bad_options():
    with pytest.raises(ValueError, match="decision must be one of"):
        ProtoClassifier(torch.nn.Identity(), torch.randn(3, 4), decision="argmax")
    with pytest.raises(TypeError, match="prototypes must be a torch.Tensor"):
        ProtoClassifier(torch.nn.Identity(), "protos.pt")
