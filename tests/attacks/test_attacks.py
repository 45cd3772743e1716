"""drp_kernels.attacks on a small CNN trained here on a Fashion-MNIST subset."""
import importlib
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import drp_kernels
from drp_kernels import attacks as A

from _helpers import FMNIST_DIR as FMNIST, NoisyLogits, load_fmnist, small_cnn  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
EPS = 0.1


def train(net, x, y, *, epochs=2, seed=0, loss_fn=F.cross_entropy):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(epochs):
        perm = torch.randperm(x.shape[0], generator=g)
        for i in range(0, x.shape[0], 64):
            b = perm[i:i + 64]
            loss = loss_fn(net(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


@pytest.fixture(scope="module")
def data():
    if not os.path.isdir(FMNIST):
        pytest.skip(f"Fashion-MNIST not found in {FMNIST} (Debian package dataset-fashion-mnist)")
    xtr, ytr = load_fmnist("train", 2500)
    xte, yte = load_fmnist("t10k", 120)
    torch.manual_seed(0)
    net = train(small_cnn(), xtr, ytr)
    for p in net.parameters():
        p.grad = None
    return net, xte, yte


def accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(dim=1) == y).float().mean().item()


def assert_in_linf_ball(x_adv, x, eps):
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert not x_adv.requires_grad
    assert bool((x_adv >= 0).all() and (x_adv <= 1).all())
    assert bool((x_adv <= x + eps).all() and (x_adv >= x - eps).all())


# -------------------------------------------------------------------- strength
def test_pgd_and_apgd_drive_accuracy_far_below_clean(data):
    net, x, y = data
    clean = accuracy(net, x, y)
    assert clean > 0.7
    runs = {
        "pgd": A.pgd(net, x, y, eps=EPS, alpha=EPS / 4, steps=20, seed=0),
        "apgd-ce": A.apgd(net, x, y, eps=EPS, steps=20),
        "apgd-t": A.apgd(net, x, y, eps=EPS, steps=20, loss="dlr-t", n_target_classes=3),
    }
    for name, x_adv in runs.items():
        assert_in_linf_ball(x_adv, x, EPS)
        assert accuracy(net, x_adv, y) < 0.5 * clean, name
    # the iterative attacks beat the single-step one
    assert accuracy(net, runs["apgd-ce"], y) <= accuracy(net, A.fgsm(net, x, y, eps=EPS), y)
    for p in net.parameters():
        assert p.grad is None  # only input gradients are taken


def test_pgd_matches_a_plain_loop(data):
    net, x, y = data
    alpha, steps = 0.01, 10
    x_ref = x.clone()
    x_free = x.clone()
    for _ in range(steps):
        for buf, freeze in ((x_ref, True), (x_free, False)):
            xr = buf.clone().requires_grad_(True)
            out = net(xr)
            (g,) = torch.autograd.grad(F.cross_entropy(out, y, reduction="sum"), xr)
            new = torch.min(torch.max(buf + alpha * g.sign(), x - EPS), x + EPS).clamp(0, 1)
            if freeze:
                keep = (out.argmax(1) == y).view(-1, 1, 1, 1)
                new = torch.where(keep, new, buf)
            buf.copy_(new.detach())
    x_adv = A.pgd(net, x, y, eps=EPS, alpha=alpha, steps=steps, random_start=False)
    from _helpers import assert_verbose_allclose
    assert_verbose_allclose(x_adv, x_ref, atol=1e-6, rtol=0, name="pgd vs plain loop")
    # freezing only keeps points that were fooled: it fools a superset of the plain loop
    with torch.no_grad():
        fooled = net(x_adv).argmax(1) != y
        fooled_free = net(x_free).argmax(1) != y
    assert bool((fooled | ~fooled_free).all())


def test_pgd_restarts_keep_the_worst_case(data):
    net, x, y = data
    kw = dict(eps=0.05, alpha=0.0125, steps=5, seed=3)
    one = A.pgd(net, x, y, restarts=1, **kw)
    three = A.pgd(net, x, y, restarts=3, **kw)
    with torch.no_grad():
        f1 = net(one).argmax(1) != y
        f3 = net(three).argmax(1) != y
    assert bool((f3 | ~f1).all()) and int(f3.sum()) >= int(f1.sum())
    assert_in_linf_ball(three, x, 0.05)


def test_pgd_dlr_and_callable_loss(data):
    net, x, y = data
    own = lambda out, yy: -out.gather(1, yy[:, None]).squeeze(1)  # ascend -z_y
    for loss in ("dlr", own):
        x_adv = A.pgd(net, x[:64], y[:64], eps=EPS, alpha=0.02, steps=10, loss=loss, seed=0)
        assert_in_linf_ball(x_adv, x[:64], EPS)
        assert accuracy(net, x_adv, y[:64]) < accuracy(net, x[:64], y[:64])


def test_apgd_l2_and_per_sample_eps(data):
    net, x, y = data
    x, y = x[:64], y[:64]
    eps = torch.linspace(0.0, 2.0, 64)
    x_adv = A.apgd(net, x, y, eps=eps, steps=10, norm="l2")
    dist = (x_adv - x).flatten(1).norm(dim=1)
    assert bool((dist <= eps * (1 + 1e-5) + 1e-6).all())
    assert bool((x_adv >= 0).all() and (x_adv <= 1).all())
    assert accuracy(net, x_adv, y) < accuracy(net, x, y)
    assert torch.equal(x_adv[0], x[0])  # eps 0 leaves the point alone


def test_square_and_hsj_reduce_accuracy(data):
    net, x, y = data
    x, y = x[:60], y[:60]
    clean = accuracy(net, x, y)
    x_sq = A.square(net, x, y, eps=EPS, queries=300, seed=0)
    assert_in_linf_ball(x_sq, x, EPS)
    assert accuracy(net, x_sq, y) < clean - 0.25
    x_h = A.hop_skip_jump(net, x[:20], y[:20], norm="l2", steps=6, init_evals=50, seed=0)
    with torch.no_grad():
        fooled = net(x_h).argmax(1) != y[:20]
    correct = net(x[:20]).argmax(1) == y[:20]
    assert bool(fooled[correct].all())  # every correct point got an adversarial (no eps)
    dist = (x_h - x[:20]).flatten(1).norm(dim=1)[correct]
    assert float(dist.median()) < 3.0  # far closer than the uniform-noise start (~8)
    # under an l2 budget of 1.5 the accuracy drops, and returned points respect the budget
    x_b = A.hop_skip_jump(net, x[:20], y[:20], norm="l2", steps=6, init_evals=50, eps=1.5, seed=0)
    assert bool(((x_b - x[:20]).flatten(1).norm(dim=1) <= 1.5 + 1e-5).all())
    assert accuracy(net, x_b, y[:20]) < accuracy(net, x[:20], y[:20])


def test_same_seed_same_result(data):
    net, x, y = data
    x, y = x[:32], y[:32]
    calls = {
        "pgd": lambda s: A.pgd(net, x, y, eps=EPS, alpha=0.02, steps=3, seed=s),
        "apgd": lambda s: A.apgd(net, x, y, eps=EPS, steps=5, seed=s),
        "square": lambda s: A.square(net, x, y, eps=EPS, queries=20, seed=s),
        "hsj": lambda s: A.hop_skip_jump(net, x[:6], y[:6], steps=2, init_evals=10, seed=s),
    }
    for name, f in calls.items():
        assert torch.equal(f(1), f(1)), name
    assert not torch.equal(calls["pgd"](1), calls["pgd"](2))


# ------------------------------------------------------------------ evaluation
def test_evaluate_quick_contract_and_no_false_flags(data):
    net, x, y = data
    x, y = x[:100], y[:100]
    r = A.evaluate(net, x, y, eps=EPS, suite="quick", batch_size=40, progress=False, check_samples=24)
    assert set(r) == {"clean_accuracy", "clean_count", "robust_accuracy", "robust_count", "per_attack",
                      "per_attack_counts", "timings", "flags", "n"}
    assert r["robust_accuracy"] == r["robust_count"] / 100 and r["clean_accuracy"] == r["clean_count"] / 100
    assert r["per_attack"] == {k: c / 100 for k, c in r["per_attack_counts"].items()}
    assert r["n"] == 100 and list(r["per_attack"]) == ["apgd-ce", "apgd-t"]
    assert r["clean_accuracy"] == pytest.approx(accuracy(net, x, y))
    pa = list(r["per_attack"].values())
    assert r["clean_accuracy"] >= pa[0] >= pa[1] == r["robust_accuracy"]
    assert r["robust_accuracy"] < 0.5 * r["clean_accuracy"]
    pgd_acc = accuracy(net, A.pgd(net, x, y, eps=EPS, alpha=EPS / 4, steps=20, seed=0), y)
    assert r["robust_accuracy"] <= pgd_acc + 0.02
    assert {"apgd-ce", "apgd-t", "checks", "total"} <= set(r["timings"])
    assert r["flags"] == []
    again = A.evaluate(net, x, y, eps=EPS, suite="quick", batch_size=40, progress=False, checks=False)
    assert again["robust_accuracy"] == r["robust_accuracy"]


def test_evaluate_standard_suite_runs_square_last(data, monkeypatch):
    ev = importlib.import_module("drp_kernels.attacks.evaluate")
    monkeypatch.setitem(ev.SUITES, "standard", {"ce_steps": 10, "t_steps": 10, "n_targets": 9, "square_queries": 50})
    net, x, y = data
    r = A.evaluate(net, x[:40], y[:40], eps=0.05, suite="standard", progress=False, checks=False)
    assert list(r["per_attack"]) == ["apgd-ce", "apgd-t", "square"]
    assert r["per_attack"]["square"] == r["robust_accuracy"] <= r["per_attack"]["apgd-t"]


def test_accuracy_vs_eps(data):
    net, x, y = data
    x, y = x[:60], y[:60]
    r = A.accuracy_vs_eps(net, x, y, eps_list=[0.0, 0.05, 0.5], suite="quick", progress=False, check_samples=16)
    accs = [e["robust_accuracy"] for e in r["results"]]
    assert [e["eps"] for e in r["results"]] == [0.0, 0.05, 0.5]
    assert accs[0] == pytest.approx(r["clean_accuracy"])
    assert accs[0] >= accs[1] >= accs[2]
    assert accs[2] <= 0.15  # chance level at eps 0.5 (everything can become the 0.5 image)
    assert r["flags"] == []


class _Rounded(nn.Module):
    """Quantises its input: the gradient is zero almost everywhere (masked gradients)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(torch.round(x * 255) / 255)


@pytest.mark.parametrize("wrap,expected", [
    (_Rounded, ("zero gradients", "black-box beats white-box", "not at chance at large eps")),
    (lambda net: nn.Sequential(net, nn.Softmax(dim=1)), ("probabilities",)),
    (NoisyLogits, ("random",)),
])
def test_flags_fire_on_broken_models(data, wrap, expected):
    net, x, y = data
    model = wrap(net)
    with pytest.warns(A.RobustnessWarning, match=expected[0]):
        r = A.evaluate(model, x[:24], y[:24], eps=EPS, suite="quick", progress=False, check_samples=12)
    for flag in expected:
        assert any(f.startswith(flag) for f in r["flags"]), (flag, r["flags"])


def test_masked_gradients_fail_the_large_eps_check(data):
    net, x, y = data
    with pytest.warns(A.RobustnessWarning):
        r = A.accuracy_vs_eps(_Rounded(net), x[:24], y[:24], eps_list=[0.05], suite="quick", progress=False,
                              check_samples=24)
    assert any(f.startswith("zero gradients") for f in r["flags"])
    # the rounded model is as weak as the plain one, yet the gradient attacks cannot show it
    assert r["results"][0]["robust_accuracy"] > A.evaluate(
        net, x[:24], y[:24], eps=0.05, suite="quick", progress=False, checks=False)["robust_accuracy"]


def test_transfer_bypasses_masked_gradients(data):
    net, x, y = data
    x, y = x[:64], y[:64]
    r = A.transfer(net, _Rounded(net), x, y, attack="pgd", eps=EPS, alpha=EPS / 4, steps=10, seed=0)
    assert_in_linf_ball(r["x_adv"], x, EPS)
    assert r["target_accuracy"] < 0.6 * r["target_clean_accuracy"]
    assert r["source_accuracy"] == pytest.approx(accuracy(net, r["x_adv"], y))
    r2 = A.transfer(net, net, x, y, attack=lambda m, xx, yy, **kw: A.fgsm(m, xx, yy, **kw), eps=EPS)
    assert r2["target_accuracy"] == pytest.approx(r2["source_accuracy"])


def test_proto_classifier_can_be_attacked(data):
    net, x, y = data
    x, y = x[:48], y[:48]
    torch.manual_seed(1)
    protos = torch.rand(10, 16) * 2 - 1
    body = small_cnn(out=16)
    xtr, ytr = load_fmnist("train", 1000)
    model = drp_kernels.ProtoClassifier(body, protos, metric="linf")
    train(model, xtr, ytr, epochs=1, loss_fn=lambda out, yy: -out.gather(1, yy[:, None]).mean())
    clean = accuracy(model, x, y)
    own = lambda out, yy: -out.gather(1, yy[:, None]).squeeze(1)  # the paper's L-inf distance to P[y]
    for x_adv in (A.pgd(model, x, y, eps=EPS, alpha=0.02, steps=10, loss=own, seed=0),
                  A.apgd(model, x, y, eps=EPS, steps=10, loss="dlr-t", n_target_classes=3)):
        assert_in_linf_ball(x_adv, x, EPS)
        assert accuracy(model, x_adv, y) < clean
    r = A.evaluate(model, x, y, eps=EPS, suite="quick", progress=False, checks=False)
    assert r["robust_accuracy"] < r["clean_accuracy"]


@pytest.mark.cuda
def test_attacks_on_cuda_match_the_cpu_bounds(data):
    net, x, y = data
    dev = torch.device("cuda")
    netc, xc, yc = net.to(dev), x.to(dev), y.to(dev)
    try:
        for x_adv in (A.pgd(netc, xc, yc, eps=EPS, alpha=0.02, steps=10, seed=0),
                      A.apgd(netc, xc, yc, eps=EPS, steps=10),
                      A.square(netc, xc, yc, eps=EPS, queries=50)):
            assert x_adv.device.type == "cuda"
            assert_in_linf_ball(x_adv, xc, EPS)
            assert accuracy(netc, x_adv, yc) < accuracy(netc, xc, yc)
        x_ref = A.pgd(net.cpu(), x, y, eps=EPS, alpha=0.02, steps=10, random_start=False)
        x_gpu = A.pgd(net.to(dev), xc, yc, eps=EPS, alpha=0.02, steps=10, random_start=False)
        agree = (x_gpu.cpu() - x_ref).abs().flatten(1).amax(1) < 1e-4
        assert float(agree.float().mean()) > 0.9  # sign flips of near-zero gradients aside
        r = A.evaluate(net.to(dev), x, y, eps=EPS, suite="quick", progress=False)
        assert r["robust_accuracy"] < 0.5 * r["clean_accuracy"]
    finally:
        net.cpu()


def test_square_p_schedule_is_a_deprecated_name_of_window_fraction():
    import importlib
    sq = importlib.import_module("drp_kernels.attacks.square")
    with pytest.warns(DeprecationWarning, match="window_fraction"):
        got = [sq.p_schedule(0.8, it, 5000) for it in (0, 10, 600, 4999)]
    assert got == [sq.window_fraction(0.8, it, 5000) for it in (0, 10, 600, 4999)]
    assert got[0] == 0.8 and got[-1] < got[0]
