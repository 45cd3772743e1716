"""Certified prototype networks: LinfDistNet, drp_kernels.certify, the certified training method,
and `drp eval`'s certified accuracy.

The central property: a point that ``certify`` proves at eps is never broken by an attack at
eps, neither by the standard suite (APGD-CE, APGD-T, Square) nor by random-start PGD on the
margin, on trained and on random networks, at p = inf and at finite p.
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import drp_kernels
from drp_kernels import LinfDistNet, certify
from drp_kernels.attacks import accuracy_vs_eps
from drp_kernels.certified import _interval_dist
from drp_train.config import TrainConfig
from drp_train.errors import ConfigError
from drp_train.data import validation_split
from drp_train.methods import Certified, ce_schedule, p_schedule

from _helpers import FMNIST_DIR, REPO, assert_png, load_fmnist

pytestmark = pytest.mark.usefixtures("one_thread")

HAVE_FMNIST = os.path.isdir(FMNIST_DIR)


def _random_net(*, depth=2, width=16, in_features=12, classes=4, p=math.inf, head="learnable", seed=0):
    g = torch.Generator().manual_seed(seed)
    net = LinfDistNet(in_features, classes, depth=depth, width=width, head=head,
                      prototypes=torch.rand(classes, width, generator=g) * 2 - 1, mean=0.4, std=0.3, p=p)
    with torch.no_grad():
        for layer in net.layers:
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=g))
            layer.running_mean.copy_(torch.randn(layer.running_mean.shape, generator=g))
        if head == "learnable":
            net.offset.copy_(0.3 * torch.randn(classes, generator=g))
    return net.eval()


def _margin(logits, y):
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.scatter(1, y[:, None], -math.inf).amax(dim=1)
    return true - other


def _pgd_margin(model, x, y, eps, *, steps=60, restarts=4, seed=0):
    """Random-start PGD on the logit margin inside the eps ball intersected with [0, 1]; returns
    (B,) bool: True where some iterate was misclassified."""
    g = torch.Generator().manual_seed(seed)
    broken = torch.zeros(x.shape[0], dtype=torch.bool)
    lo, hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    for _ in range(restarts):
        xa = lo + (hi - lo) * torch.rand(x.shape, generator=g)
        for i in range(steps):
            xa.requires_grad_(True)
            logits = model(xa)
            broken |= (logits.argmax(1) != y).detach()
            (grad,) = torch.autograd.grad(_margin(logits, y).sum(), xa)
            step = eps / 4 if i < steps // 2 else eps / 20
            xa = torch.min(torch.max(xa.detach() - step * grad.sign(), lo), hi)
        with torch.no_grad():
            broken |= model(xa).argmax(1) != y
    # the box corners along the gradient sign and random vertices
    with torch.no_grad():
        for _ in range(8):
            corner = torch.where(torch.rand(x.shape, generator=g) < 0.5, lo, hi)
            broken |= model(corner).argmax(1) != y
    return broken


# ----------------------------------------------------------------------------- the network
def test_linf_dist_net_forward_matches_reference():
    net = _random_net(p=math.inf)
    x = torch.rand(7, 3, 2, 2)
    h = (x.reshape(7, -1) - 0.4) / 0.3
    for layer in net.layers:
        h = drp_kernels.reference.lp_dist(h, layer.weight, math.inf) - layer.running_mean
    want = -(drp_kernels.reference.lp_dist(h, net.prototypes, math.inf) + net.offset)
    torch.testing.assert_close(net(x), want, atol=1e-5, rtol=1e-5)
    assert net(x).shape == (7, 4)


def test_p_is_saved_with_the_weights():
    net = _random_net(p=8.0)
    net.set_p(math.inf)
    fresh = LinfDistNet(12, 4, depth=2, width=16, mean=0.4, std=0.3, p=8.0)
    fresh.load_state_dict(net.state_dict())
    assert fresh.p == math.inf and all(layer.p == math.inf for layer in fresh.layers)
    layer = drp_kernels.LpDist(3, 2, p=5.0)
    other = drp_kernels.LpDist(3, 2, p=8.0)
    other.load_state_dict(layer.state_dict())
    assert other.p == 5.0


def test_lipschitz_bound_holds_empirically():
    for p in (math.inf, 8.0):
        net = _random_net(p=p, seed=1)
        lip = net.lipschitz()
        if p == math.inf:
            assert lip == pytest.approx(1 / 0.3)
        else:
            assert lip == pytest.approx((1 / 0.3) * 12 ** (1 / 8) * 16 ** (1 / 8) * 16 ** (1 / 8), rel=1e-5)
        g = torch.Generator().manual_seed(2)
        x = torch.rand(256, 12, generator=g, dtype=torch.float64)
        x2 = (x + 0.05 * (2 * torch.rand(x.shape, generator=g, dtype=torch.float64) - 1))
        net64 = net.double()
        dx = (x - x2).abs().amax(1)
        dd = (net64.distances(x) - net64.distances(x2)).abs().amax(1)
        assert bool((dd <= lip * dx * (1 + 1e-9)).all())


def test_linf_dist_net_rejects_bad_arguments():
    with pytest.raises(ValueError, match="head must be one of learnable, drp"):
        LinfDistNet(4, 3, depth=1, width=4, head="bogus")
    with pytest.raises(ValueError, match="std must be > 0"):
        LinfDistNet(4, 3, depth=1, width=4, std=0.0)
    with pytest.raises(ValueError, match="depth must be an integer >= 1"):
        LinfDistNet(4, 3, depth=0, width=4)
    with pytest.raises(ValueError, match=r"prototypes must have shape \(3, 4\)"):
        LinfDistNet(4, 3, depth=1, width=4, prototypes=torch.zeros(3, 5))
    with pytest.raises(ValueError, match="p must be a float in"):
        LinfDistNet(4, 3, depth=1, width=4).set_p(0.5)
    with pytest.raises(ValueError, match="x must hold 4 values per sample"):
        LinfDistNet(4, 3, depth=1, width=4)(torch.zeros(2, 5))
    drp = LinfDistNet(4, 3, depth=1, width=4, head="drp")
    assert "prototypes" in dict(drp.named_buffers()) and not any("prototypes" in n for n, _ in drp.named_parameters())


# ----------------------------------------------------------------------------- certify
def test_interval_bounds_enclose_sampled_distances():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(5, 6, generator=g, dtype=torch.float64)
    lo = torch.randn(3, 6, generator=g, dtype=torch.float64)
    hi = lo + torch.rand(3, 6, generator=g, dtype=torch.float64)
    for p in (math.inf, 1.0, 3.0, 8.0):
        d_lo, d_hi = _interval_dist(lo, hi, w, p)
        for _ in range(200):
            h = lo + (hi - lo) * torch.rand(lo.shape, generator=g, dtype=torch.float64)
            d = drp_kernels.reference.lp_dist(h, w, p)
            assert bool((d >= d_lo - 1e-12).all()) and bool((d <= d_hi + 1e-12).all())
        # the bounds are attained: the clamp of w into the box gives the lower one
        h_near = torch.max(torch.min(w[None, 0, :], hi), lo)
        torch.testing.assert_close(drp_kernels.reference.lp_dist(h_near, w[:1], p)[:, 0], d_lo[:, 0])


def test_linf_interval_bounds_by_lp_dist_match_the_broadcast():
    g = torch.Generator().manual_seed(14)
    w = 3 * torch.randn(40, 33, generator=g, dtype=torch.float64)
    lo = torch.randn(17, 33, generator=g, dtype=torch.float64)
    hi = lo + torch.rand(17, 33, generator=g, dtype=torch.float64)
    lo[:3] -= 20.0  # boxes holding every w: lower bound 0
    hi[:3] += 20.0
    fast_lo, fast_hi = _interval_dist(lo, hi, w, math.inf)
    far = torch.maximum((lo[:, None] - w).abs(), (hi[:, None] - w).abs()).amax(-1)
    near = ((lo[:, None] - w).clamp_min(0) + (w - hi[:, None]).clamp_min(0)).amax(-1)
    torch.testing.assert_close(fast_hi, far, atol=1e-12, rtol=0)
    torch.testing.assert_close(fast_lo, near, atol=1e-12, rtol=0)
    assert bool((fast_lo == 0).any()) and bool((fast_lo > 0).any())


@pytest.mark.parametrize("p", [math.inf, 8.0, 1000.0])
def test_certified_points_of_random_networks_survive_attacks(p):
    net = _random_net(p=p, width=24, seed=4)
    g = torch.Generator().manual_seed(5)
    x = torch.rand(400, 12, generator=g)
    y = net(x).argmax(1)
    eps = {math.inf: 0.02, 8.0: 0.004, 1000.0: 0.02}[p]
    cert = certify(net, x, y, eps)
    assert 0 < int(cert.sum()) < 400, int(cert.sum())  # neither vacuous nor trivial
    broken = _pgd_margin(net, x[cert], y[cert], eps)
    assert not bool(broken.any()), f"{int(broken.sum())} certified points broken at p={p}"
    # a larger radius certifies no more points (monotone)
    assert bool((certify(net, x, y, 2 * eps) <= cert).all())


def test_certify_is_tighter_than_the_margin_rule_near_the_domain_edge():
    # pixels at 0 or 1 can only move one way: the interval bounds see it, the margin rule does not
    net = _random_net(p=math.inf, width=24, seed=6)
    g = torch.Generator().manual_seed(7)
    x = (torch.rand(400, 12, generator=g) < 0.5).float()
    y = net(x).argmax(1)
    eps = 0.05
    d = net.double().distances(x.double())
    margin = (d.scatter(1, y[:, None], math.inf).amin(1) - d.gather(1, y[:, None]).squeeze(1))
    by_rule = margin > 2 * net.lipschitz() * eps
    cert = certify(net.float(), x, y, eps)
    assert bool((cert >= by_rule).all()) and int(cert.sum()) > int(by_rule.sum())
    assert not bool(_pgd_margin(net.float(), x[cert], y[cert], eps).any())


def test_certify_at_eps_zero_is_correctness():
    net = _random_net(seed=8)
    x = torch.rand(64, 12, generator=torch.Generator().manual_seed(9))
    y = torch.randint(0, 4, (64,), generator=torch.Generator().manual_seed(10))
    pred = net(x).argmax(1)
    cert = certify(net, x, y, 0.0)
    assert bool((cert <= (pred == y)).all()) and int(cert.sum()) >= int((pred == y).sum()) - 2


def test_certify_rejects_bad_inputs():
    net = _random_net()
    x, y = torch.rand(3, 12), torch.tensor([0, 1, 2])
    with pytest.raises(TypeError, match="has no certificate"):
        certify(torch.nn.Linear(12, 4), x, y, 0.1)
    proto = drp_kernels.ProtoClassifier(torch.nn.Linear(12, 4), torch.eye(4), metric="linf")
    with pytest.raises(TypeError, match="ProtoClassifier has no certificate"):
        certify(proto, x, y, 0.1)
    with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
        certify(net, x, y, -0.1)
    with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
        certify(net, x, y, float("nan"))
    with pytest.raises(ValueError, match=r"y must hold class indices in \[0, 4\)"):
        certify(net, x, torch.tensor([0, 1, 4]), 0.1)
    with pytest.raises(ValueError, match=r"y must have shape \(3,\)"):
        certify(net, x, torch.tensor([0, 1]), 0.1)
    with pytest.raises(TypeError, match="y must be an integer"):
        certify(net, x, torch.tensor([0.0, 1.0, 2.0]), 0.1)
    with pytest.raises(ValueError, match="12 values per sample"):
        certify(net, torch.rand(3, 11), y, 0.1)
    with pytest.raises(TypeError, match="x must be a floating-point"):
        certify(net, torch.ones(3, 12, dtype=torch.int64), y, 0.1)
    assert certify(net, x[:0], y[:0], 0.1).shape == (0,)
    net.train()
    certify(net, x, y, 0.1)
    assert net.training  # left in its own mode


# ----------------------------------------------------------------------------- training
def test_p_schedule():
    total = 1000
    ps = [p_schedule(t, total) for t in range(total)]
    assert ps[0] == 8.0 and ps[49] == 8.0 and ps[50] >= 8.0
    finite = [p for p in ps if p != math.inf]
    assert finite == sorted(finite) and all(p == int(p) for p in finite)
    assert max(finite) == 1000.0
    assert ps.index(math.inf) == 900 and all(p == math.inf for p in ps[900:])
    assert p_schedule(0, 1) == math.inf  # a one-step run ends (and starts) at inf


def test_p_schedule_fractions_and_ce_decay():
    ps = [p_schedule(t, 100, hold=0.2, inf=0.3) for t in range(100)]
    assert ps[:20] == [8.0] * 20 and ps[20] == 8.0 and ps[69] == 1000.0
    assert all(p == math.inf for p in ps[70:]) and math.inf not in ps[:70]
    assert ce_schedule(8.0, 0.05, 0.0002) == pytest.approx(0.05)
    assert ce_schedule(1000.0, 0.05, 0.0002) == pytest.approx(0.0002)
    assert ce_schedule(math.inf, 0.05, 0.0002) == pytest.approx(0.0002)
    mid = ce_schedule(math.sqrt(8000.0), 0.05, 0.0002)  # halfway along the geometric schedule
    assert mid == pytest.approx(math.sqrt(0.05 * 0.0002))
    assert ce_schedule(100.0, 0.05, 0.05) == 0.05 and ce_schedule(100.0, 0.0, 0.0) == 0.0
    method = Certified(eps=0.1, eps_train=0.3, ce_weight=0.05, ce_final=0.0002, p_hold=0.0, p_inf=0.5)
    net = _random_net()
    method.before_step(net, 0, 10)
    assert net.p == 8.0 and method.ce_weight == pytest.approx(0.05)
    method.before_step(net, 9, 10)
    assert net.p == math.inf and method.ce_weight == pytest.approx(0.0002)


def test_first_width_gets_identity_init_when_wide_enough():
    torch.manual_seed(3)
    net = LinfDistNet(12, 3, depth=3, width=8, first_width=20, p=math.inf)
    assert [(m.in_features, m.out_features) for m in net.layers] == [(12, 20), (20, 8), (8, 8)]
    n = torch.arange(20)
    assert torch.equal(net.layers[0].weight[n, n % 12], torch.full((20,), -10.0))  # 12 <= 20: identity
    assert not (net.layers[1].weight == -10).any()  # 20 > 8: plain N(0, 1)
    assert "first_width=20" in repr(net) and net.prototypes.shape == (3, 8)
    assert net.lipschitz() == pytest.approx(1.0)
    narrow = LinfDistNet(12, 3, depth=2, width=8, first_width=6)
    assert not (narrow.layers[0].weight == -10).any()
    with pytest.raises(ValueError, match="first_width .* depth 1"):
        LinfDistNet(12, 3, depth=1, width=8, first_width=20)
    with pytest.raises(ValueError, match="first_width"):
        LinfDistNet(12, 3, depth=2, width=8, first_width=0)


def test_validation_split_is_fixed_and_disjoint():
    keep, held = validation_split(1000, 100)
    keep2, held2 = validation_split(1000, 100)
    assert torch.equal(held, held2) and torch.equal(keep, keep2)
    assert held.numel() == 100 and keep.numel() == 900
    assert torch.equal(torch.cat([keep, held]).sort().values, torch.arange(1000))
    assert held.tolist() == sorted(held.tolist())
    with pytest.raises(ValueError, match="n_val"):
        validation_split(10, 10)


def test_recipe_options_are_checked():
    for kwargs, msg in (({"p_hold": 0.6, "p_inf": 0.5}, "--p-hold 0.6 plus --p-inf 0.5 exceed 1"),
                        ({"p_inf": 1.5}, "--p-inf"), ({"crop_padding": -1}, "--crop-padding"),
                        ({"val_split": -5}, "--val-split"), ({"width_first": 0}, "--width-first"),
                        ({"depth": 1, "width_first": 1024}, "--width-first 1024 with --depth 1"),
                        ({"cert_ce_final": 0.0}, "--cert-ce-final and --cert-ce-weight must both be 0"),
                        ({"cert_ce_final": -1.0}, "--cert-ce-final"),
                        ({"input_subset": 0.0}, "--input-subset must be > 0.0, got 0.0"),
                        ({"input_subset": 1.5}, "--input-subset must be <= 1.0, got 1.5"),
                        ({"input_subset": True}, "--input-subset must be a finite number"),
                        ({"input_subset": "0.5"}, "--input-subset must be a finite number")):
        with pytest.raises(ConfigError, match=msg):
            TrainConfig(method="certified", **kwargs).resolved()
    with pytest.raises(ConfigError, match="--input-subset 0.75 needs --method certified"):
        TrainConfig(method="pgd-at", input_subset=0.75).resolved()


def _subset_expected(layer, x, seed):
    # the same draws as LpDist._subset_dist, replayed from the same generator state: the contiguous
    # neuron groups, each over its own sorted column subset, by the float64 reference
    from drp_kernels.layers import SUBSET_GROUPS
    from drp_kernels.reference import lp_dist as ref

    n, d = layer.out_features, layer.in_features
    k = max(1, round(layer.input_subset * d))
    groups = min(n, SUBSET_GROUPS)
    torch.manual_seed(seed)
    out, masks = [], []
    for g in range(groups):
        cols = torch.randperm(d)[:k].sort().values
        rows = slice((g * n) // groups, ((g + 1) * n) // groups)
        out.append(ref(x.double()[:, cols], layer.weight.double()[rows][:, cols], p=layer.p))
        mask = torch.zeros(rows.stop - rows.start, d, dtype=torch.bool)
        mask[:, cols] = True
        masks.append(mask)
    return torch.cat(out, 1), torch.cat(masks, 0)


@pytest.mark.parametrize("p", [8.0, 64.0, math.inf])
@pytest.mark.parametrize("n,d,q", [(40, 37, 0.75), (5, 9, 0.5), (20, 3, 0.1)])
def test_input_subsets_run_each_group_over_its_drawn_columns(p, n, d, q):
    from drp_kernels.layers import LpDist

    torch.manual_seed(1)
    layer = LpDist(d, n, p=p, mean_shift=False, identity_val=None)
    layer.input_subset = q
    x = torch.randn(6, d)
    expect, mask = _subset_expected(layer, x, seed=123)
    torch.manual_seed(123)
    y = layer(x)
    assert torch.allclose(y.double(), expect, rtol=1e-5, atol=1e-6)
    assert mask.sum(1).eq(max(1, round(q * d))).all()
    # columns a group did not draw get no gradient; the drawn ones do
    y.sum().backward()
    assert layer.weight.grad[~mask].abs().max() == 0
    assert layer.weight.grad[mask].ne(0).any()
    # eval mode and input_subset = 1 use every input
    layer.eval()
    full = drp_kernels.lp_dist(x, layer.weight.detach(), p=p)
    assert torch.equal(layer(x).detach(), full)
    layer.train()
    layer.input_subset = 1.0
    assert torch.equal(layer(x).detach(), full)


@pytest.mark.parametrize("n,d,q", [(64, 48, 0.75), (1024, 784, 0.75), (20, 30, 0.1)])
def test_input_subsets_keep_the_identity_coordinates(n, d, q):
    from drp_kernels.layers import SUBSET_GROUPS, LpDist

    torch.manual_seed(2)
    layer = LpDist(d, n, p=8.0, mean_shift=False)  # identity init: neuron j's weight on j mod d is -10
    layer.input_subset = q
    layer(torch.rand(3, d)).sum().backward()
    drawn = layer.weight.grad != 0  # the columns each neuron's distance ran over
    groups = min(n, SUBSET_GROUPS)
    k = max(1, round(q * d))
    for g in range(groups):
        rows = torch.arange((g * n) // groups, ((g + 1) * n) // groups)
        assert drawn[rows, rows % d].all(), "a neuron lost its identity coordinate"
        cols = drawn[rows].any(0)
        assert (drawn[rows] == cols).all()  # one subset per group
        assert int(cols.sum()) == max(k, len(set((rows % d).tolist())))


def test_input_subsets_are_checked_and_not_saved():
    from drp_kernels.layers import LpDist

    layer = LpDist(4, 8)
    for bad, err in ((0.0, ValueError), (1.01, ValueError), (float("nan"), ValueError), (True, TypeError),
                     ("0.5", TypeError)):
        with pytest.raises(err, match="input_subset"):
            layer.input_subset = bad
    assert layer.input_subset == 1.0  # a refused value changes nothing
    net = LinfDistNet(12, 3, depth=2, width=8)
    net.set_input_subset(0.5)
    assert all(layer.input_subset == 0.5 for layer in net.layers)
    fresh = LinfDistNet(12, 3, depth=2, width=8)
    fresh.load_state_dict(net.state_dict())
    assert all(layer.input_subset == 1.0 for layer in fresh.layers)


def test_certified_method_uses_subsets_only_while_p_is_finite():
    net = LinfDistNet(12, 3, depth=2, width=8)
    method = Certified(eps=0.1, eps_train=0.2, ce_weight=0.05, p_hold=0.2, p_inf=0.3, input_subset=0.75)
    method.before_step(net, 0, 10)
    assert net.p == 8.0 and all(layer.input_subset == 0.75 for layer in net.layers)
    method.before_step(net, 9, 10)
    assert net.p == math.inf and all(layer.input_subset == 1.0 for layer in net.layers)
    plain = Certified(eps=0.1, eps_train=0.2, ce_weight=0.05)
    plain.before_step(net, 0, 10)
    assert all(layer.input_subset == 1.0 for layer in net.layers)


def test_certified_config_defaults_and_checks():
    r = TrainConfig(method="certified").resolved()
    assert (r.model, r.optimizer, r.batch_size, r.weight_decay, r.lr) == ("linf-dist", "adam", 512, 0.0, 0.02)
    assert r.eps_train == pytest.approx(0.225) and r.head == "learnable"
    assert TrainConfig().resolved().batch_size == 128 and TrainConfig().resolved().optimizer == "sgd"
    with pytest.raises(ConfigError, match="--method certified needs --model linf-dist"):
        TrainConfig(method="certified", model="cnn").resolved()
    with pytest.raises(ConfigError, match="--model linf-dist is trained with --method certified"):
        TrainConfig(method="ce", model="linf-dist").resolved()
    with pytest.raises(ConfigError, match="--head must be one of learnable, drp"):
        TrainConfig(method="certified", head="x").resolved()
    with pytest.raises(ConfigError, match="--eps must be > 0 for --method certified"):
        TrainConfig(method="certified", eps=0.0).resolved()
    with pytest.raises(ConfigError, match="--eps-train must be >= 0"):
        TrainConfig(method="certified", eps_train=-0.1).resolved()


def test_first_layer_default_and_older_checkpoints():
    from drp_train.checkpoint import config_of, stored_config
    r = TrainConfig(method="certified").resolved()
    assert (r.width, r.width_first) == (512, 1024)  # the measured best recipe
    assert TrainConfig(method="certified", width=64, depth=3).resolved().width_first == 128
    assert TrainConfig(method="certified", width=64, depth=1).resolved().width_first == 64
    assert TrainConfig(method="certified", width_first=700).resolved().width_first == 700
    # a run from before the default (no key, or None stored) keeps its first layer `width` wide
    old = {k: v for k, v in vars(TrainConfig(method="certified", width=96).resolved()).items() if k != "width_first"}
    assert config_of({"config": old}).width_first == 96
    assert stored_config({"config": dict(old, width_first=None)})["width_first"] == 96
    assert stored_config({"config": dict(old, width_first=200)})["width_first"] == 200
    with open(os.path.join(REPO, "results", "fashion-mnist", "certified", "config.json")) as f:
        committed = json.load(f)
    expected = committed.get("width_first") or committed["width"]
    assert config_of({"config": committed}).resolved().width_first == expected


def test_cli_refuses_certified_with_another_model(tmp_path):
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "drp_train", "train", "--method", "certified", "--model", "cnn",
                          "--out", str(out)], capture_output=True, text=True, timeout=120)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert "--method certified needs --model linf-dist" in lines[0]
    assert not out.exists()


def test_certified_loss_is_the_clipped_hinge_plus_ce():
    net = _random_net(seed=11)
    x = torch.rand(32, 12, generator=torch.Generator().manual_seed(12))
    y = torch.randint(0, 4, (32,), generator=torch.Generator().manual_seed(13))
    method = Certified(eps=0.1, eps_train=0.2, ce_weight=0.0)
    loss, logits = method.loss(net, net, x, y, generator=None, autocast=lambda: torch.autocast("cpu", enabled=False))
    theta = 2 * net.lipschitz(p=math.inf) * 0.2
    torch.testing.assert_close(loss, (theta - _margin(net(x), y)).clamp(0, theta).mean())
    with_ce = Certified(eps=0.1, eps_train=0.2, ce_weight=0.5)
    loss2, _ = with_ce.loss(net, net, x, y, generator=None, autocast=lambda: torch.autocast("cpu", enabled=False))
    ce = torch.nn.functional.cross_entropy(net.ce_scale * net(x), y)
    torch.testing.assert_close(loss2, loss + 0.5 * ce)
    assert logits.shape == (32, 4)


def _train_tiny(out, *, epochs=4, head="learnable"):
    # a small net learns slowly from the hinge alone: a full CE term and a larger step help it; the
    # recipe options (first-layer width, decaying CE, crop, validation split, p and lr fractions) ride along
    cmd = [sys.executable, "-m", "drp_train", "train", "--method", "certified", "--depth", "2", "--width", "64",
           "--width-first", "96", "--head", head, "--epochs", str(epochs), "--limit-train", "2304", "--limit-test",
           "500", "--val-split", "256", "--crop-padding", "1", "--batch-size", "64", "--lr", "0.05",
           "--cert-ce-weight", "1", "--cert-ce-final", "0.5", "--p-hold", "0.1", "--p-inf", "0.25",
           "--lr-hold", "0.1", "--out", str(out), "--quiet"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    return res


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    if not HAVE_FMNIST:
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    out = tmp_path_factory.mktemp("cert") / "run"
    _train_tiny(out)
    return out


def test_trained_network_certifies_and_attacks_never_break_a_certified_point(tiny_run):
    from drp_train.checkpoint import load_classifier

    model = load_classifier(str(tiny_run))
    assert isinstance(model, LinfDistNet) and model.p == math.inf
    x, y = load_fmnist("t10k", 100)
    clean = (model(x).argmax(1) == y).float().mean().item()
    assert clean > 0.5
    for eps in (0.1,):
        cert = certify(model, x, y, eps)
        assert int(cert.sum()) >= 10, f"only {int(cert.sum())} points certified at eps {eps}"
        res = accuracy_vs_eps(model, x, y, eps_list=[eps], suite="standard", progress=False, checks=False,
                              return_points=True)
        robust = res["results"][0]["robust"]
        assert not bool((cert & ~robust).any()), "the standard suite broke a certified point"
        assert int(cert.sum()) <= int(robust.sum())
        assert not bool(_pgd_margin(model, x[cert], y[cert], eps, steps=40, restarts=2).any())


def test_run_records_p_validation_and_recipe(tiny_run):
    rows = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["p"] for r in rows][-1] == math.inf and rows[0]["p"] != math.inf
    for r in rows:
        assert 0.0 <= r["val_accuracy"] <= 1.0
        if r["p"] == math.inf:  # certified on the held-out split whenever the net runs at p = inf
            assert 0.0 < r["val_certified_accuracy"] <= r["val_accuracy"]
        else:
            assert r["val_certified_accuracy"] is None
    cfg = json.loads((tiny_run / "config.json").read_text())
    assert (cfg["width_first"], cfg["val_split"], cfg["crop_padding"], cfg["cert_ce_final"]) == (96, 256, 1, 0.5)
    assert (cfg["p_hold"], cfg["p_inf"], cfg["lr_hold"]) == (0.1, 0.25, 0.1)


def test_drp_eval_reports_certified_accuracy(tiny_run, tmp_path):
    js, png = tmp_path / "eval.json", tmp_path / "eval.png"
    res = subprocess.run([sys.executable, "-m", "drp_train", "eval", "--checkpoint", str(tiny_run), "--eps", "0.05",
                          "0.1", "--suite", "quick", "--limit", "100", "--json", str(js), "--plot", str(png),
                          "--quiet"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    data = json.loads(js.read_text())
    assert data["method"] == "certified" and data["model"] == "linf-dist"
    for r in data["results"]:
        assert 0.0 < r["certified_accuracy"] <= r["robust_accuracy"] <= data["clean_accuracy"]
    assert data["results"][1]["certified_accuracy"] <= data["results"][0]["certified_accuracy"]
    assert "certified" in res.stdout
    assert_png(str(png))
    # drp plot: this report beside a committed one, the certified line dashed
    both = tmp_path / "both.png"
    committed = os.path.join(REPO, "results", "fashion-mnist", "drp-linf", "eval.json")
    res = _drp("plot", f"{js}=certified", f"{committed}=DRP", "--out", str(both))
    assert res.returncode == 0, res.stderr
    assert_png(str(both))


def _drp(*args):
    return subprocess.run([sys.executable, "-m", "drp_train", *args], capture_output=True, text=True, timeout=300)


def test_drp_plot_rejects_bad_reports(tmp_path):
    committed = os.path.join(REPO, "results", "fashion-mnist", "drp-linf", "eval.json")
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    cases = [
        ((str(tmp_path / "missing.json"), "--out", str(tmp_path / "a.png")), "cannot read the report"),
        ((str(bad), "--out", str(tmp_path / "a.png")), "not a `drp eval` report"),
        ((committed, "--suite", "quick", "--out", str(tmp_path / "a.png")), "no suite 'quick'"),
        ((committed, committed, "--out", str(tmp_path / "a.png")), "two reports are labelled"),
        ((os.path.join(os.path.dirname(committed), "..", "ce", "eval.json"), "--suite", "paper", "--out",
          str(tmp_path / "a.png")), "the report is of suite 'standard', not 'paper'"),
        ((committed, "--out", str(tmp_path / "a.txt")), "--out: expected a file name ending in .png"),
    ]
    for args, message in cases:
        res = _drp("plot", *args)
        lines = [line for line in res.stderr.splitlines() if line.strip()]
        assert res.returncode == 2 and len(lines) == 1 and message in lines[0], (args, res.stderr)
    assert not list(tmp_path.glob("a.*"))


def test_a_broken_certificate_is_reported_not_hidden(tiny_run, monkeypatch):
    from drp_train import evaluation
    from drp_train.checkpoint import load_classifier

    model = load_classifier(str(tiny_run))
    x, y = load_fmnist("t10k", 30)
    monkeypatch.setattr(evaluation, "certified_points", lambda m, x, y, eps, batch_size=250: torch.ones(
        x.shape[0], dtype=torch.bool))
    with pytest.raises(RuntimeError, match="certificate bug"):
        evaluation.evaluate_model(model, x, y, eps_list=[0.3], suite="quick", progress=False, checks=False)
