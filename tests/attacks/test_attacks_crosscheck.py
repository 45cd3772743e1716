"""Cross-check of drp_kernels.attacks against torchattacks' APGD, APGD-T and Square.

`make deps` (and so CI) installs torchattacks with `pip install --no-deps torchattacks==3.5.1`:
its metadata pins torchvision, which it never imports, and --no-deps keeps the installed torch.
Elsewhere the file is skipped, with the reason.

On a standard CNN and on a DRP model (ProtoClassifier with L-inf prototypes, trained with
ProtoLoss; its logits are negative distances) both libraries attack the same points with
the same settings, and ours must be no weaker than theirs beyond noise.

The margin comes from the sample count through a paired sign test. Both attacks run on
the same points, so only the points where they disagree carry information. If the two
were equally strong, each of the D disagreeing points would be robust only under ours
with probability 1/2. We fail when "robust only under ours" is so lopsided that a fair
coin gives it with probability below 1 % (one-sided binomial tail). For example, with
D = 7 that means all 7; with D = 20 it means 16 or more.
"""
import math
import os

import pytest
import torch
import torch.nn.functional as F

TA = pytest.importorskip("torchattacks", reason="torchattacks is not installed: pip install --no-deps "
                                                      "torchattacks==3.5.1 (or make deps)")

import drp_kernels  # noqa: E402
from drp_kernels import attacks as A  # noqa: E402

from _helpers import FMNIST_DIR as FMNIST, load_fmnist as _load, small_cnn as _cnn, train_small as _train  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]  # trains two small CNNs
EPS = 0.1
N_TEST = 100
P_VALUE = 0.01


@pytest.fixture(scope="module")
def models():
    if not os.path.isdir(FMNIST):
        pytest.skip(f"Fashion-MNIST not found in {FMNIST}")
    xtr, ytr = _load("train", 3000)
    x, y = _load("t10k", N_TEST)
    torch.manual_seed(0)
    ce = _cnn(10)
    _train(ce, lambda a, b: F.cross_entropy(ce(a), b), xtr, ytr, epochs=2)
    protos = drp_kernels.repulsive_prototypes(10, 32, metric="linf", method="paper")
    body = _cnn(32)
    crit = drp_kernels.ProtoLoss(protos, metric="linf")
    _train(body, lambda a, b: crit(body(a), b), xtr, ytr, epochs=2)
    drp = drp_kernels.ProtoClassifier(body, protos, metric="linf").eval()
    return {"ce": ce, "drp": drp}, x, y


def _robust(model, x_adv, x, y):
    """Per point: still classified correctly; also checks the point lies in the budget."""
    assert x_adv.shape == x.shape
    assert bool((x_adv >= 0).all() and (x_adv <= 1).all())
    assert bool(((x_adv - x).abs() <= EPS + 1e-6).all())
    with torch.no_grad():
        return model(x_adv).argmax(dim=1) == y


def _theirs(attack, x, y):
    """Run a torchattacks attack without leaving its manual_seed in the global RNG."""
    with torch.random.fork_rng(devices=[]):
        return attack(x, y).detach()


def _sign_test_p(k, d):
    """P(X >= k) for X ~ Binomial(d, 1/2)."""
    return sum(math.comb(d, i) for i in range(k, d + 1)) / 2 ** d


def _assert_no_weaker(ours, theirs, what):
    only_ours = int((ours & ~theirs).sum())  # robust under ours, broken by theirs
    only_theirs = int((theirs & ~ours).sum())
    d = only_ours + only_theirs
    p = _sign_test_p(only_ours, d)
    acc_o, acc_t = ours.float().mean().item(), theirs.float().mean().item()
    assert p >= P_VALUE, (
        f"{what}: ours is weaker than torchattacks: robust accuracy {acc_o:.3f} vs {acc_t:.3f} on "
        f"{ours.numel()} points; {only_ours} points survive only ours, {only_theirs} only theirs "
        f"(sign-test p = {p:.4f} < {P_VALUE})")


def _clean_correct(model, x, y):
    with torch.no_grad():
        return model(x).argmax(dim=1) == y


@pytest.mark.parametrize("name", ["ce", "drp"])
def test_apgd_ce_no_weaker_than_torchattacks(models, name):
    nets, x, y = models
    m = nets[name]
    ours = _robust(m, A.apgd(m, x, y, eps=EPS, steps=20, loss="ce", seed=0), x, y)
    theirs = _robust(m, _theirs(TA.APGD(m, eps=EPS, steps=20, loss="ce", seed=0), x, y), x, y)
    assert ours.float().mean() < _clean_correct(m, x, y).float().mean()  # the attack does something
    _assert_no_weaker(ours, theirs, f"APGD-CE on {name}")


@pytest.mark.parametrize("name", ["ce", "drp"])
def test_apgd_dlr_targeted_no_weaker_than_torchattacks(models, name):
    nets, x, y = models
    m = nets[name]
    ours = _robust(m, A.apgd(m, x, y, eps=EPS, steps=20, loss="dlr-t", n_target_classes=9, seed=0), x, y)
    theirs = _robust(m, _theirs(TA.APGDT(m, eps=EPS, steps=20, n_classes=10, seed=0), x, y), x, y)
    _assert_no_weaker(ours, theirs, f"APGD-T on {name}")


@pytest.mark.parametrize("name", ["ce", "drp"])
def test_square_no_weaker_than_torchattacks(models, name):
    nets, x, y = models
    m = nets[name]
    ours = _robust(m, A.square(m, x, y, eps=EPS, queries=300, seed=0), x, y)
    theirs = _robust(m, _theirs(TA.Square(m, eps=EPS, n_queries=300, seed=0), x, y), x, y)
    assert ours.float().mean() < _clean_correct(m, x, y).float().mean()
    _assert_no_weaker(ours, theirs, f"Square on {name}")


def test_quick_suite_no_weaker_than_torchattacks_chain(models):
    """evaluate(suite="quick") (APGD-CE 20 it. -> APGD-T 3 targets x 20 it.) against the same chain
    built from torchattacks; the per-point robust set comes from running each stage ourselves."""
    nets, x, y = models
    m = nets["drp"]
    r = A.evaluate(m, x, y, eps=EPS, suite="quick", progress=False, checks=False)
    apgdt = TA.APGDT(m, eps=EPS, steps=20, n_classes=10, seed=0)
    apgdt.n_target_classes = 3
    chain = TA.MultiAttack([TA.APGD(m, eps=EPS, steps=20, loss="ce", seed=0), apgdt])
    theirs = _robust(m, _theirs(chain, x, y), x, y)
    acc_t = theirs.float().mean().item()
    # evaluate reports only the accuracy: bound the difference by the sign test's worst case,
    # where every disagreement favours ours (k = d), i.e. the smallest d with 2^-d < P_VALUE
    d_max = math.ceil(math.log2(1 / P_VALUE)) - 1
    assert r["robust_accuracy"] <= acc_t + d_max / x.shape[0], (r, acc_t)
