"""The evaluation engine: the paper's protocol as a suite, both decision rules, monotone
sweeps, per-point early exit, progress reporting, and `drp eval --suite paper standard`."""
import contextlib
import importlib
import json
import logging
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import drp_kernels
from drp_kernels import attacks as A
from drp_kernels import reference

from _helpers import FMNIST_DIR as FMNIST, NoisyLogits  # noqa: E402
from _helpers import load_fmnist as _load, small_cnn as _cnn, train_small as _train  # noqa: E402
EPS = 0.1
pytestmark = [pytest.mark.skipif(not os.path.isdir(FMNIST), reason="needs the dataset-fashion-mnist package"),
              pytest.mark.usefixtures("one_thread")]

apgd_mod = importlib.import_module("drp_kernels.attacks.apgd")
common = importlib.import_module("drp_kernels.attacks._common")


@pytest.fixture(scope="module")
def models():
    xtr, ytr = _load("train", 2000)
    x, y = _load("t10k", 64)
    torch.manual_seed(0)
    net = _cnn(10)
    _train(net, lambda a, b: F.cross_entropy(net(a), b), xtr, ytr)
    protos = drp_kernels.repulsive_prototypes(10, 16, metric="linf", method="paper")
    body = _cnn(16)
    crit = drp_kernels.ProtoLoss(protos, metric="linf")
    _train(body, lambda a, b: crit(body(a), b), xtr, ytr)
    drp = drp_kernels.ProtoClassifier(body, protos, metric="linf").eval()
    return {"ce": net, "drp": drp}, x, y


def _accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(dim=1) == y).float().mean().item()


def _plain_paper_pgd(model, x, y, eps, steps):
    """The paper's attack written out with reference ops: sign ascent of ||net(x) - P_y||_inf,
    step eps / 4, no random start; a point misclassified at the current iterate stays put."""
    x_adv = x.clone()
    for _ in range(steps):
        xr = x_adv.clone().requires_grad_(True)
        z = model.net(xr)
        d = reference.proto_loss(z, model.prototypes, y, metric=model.metric, reduction="none")
        (g,) = torch.autograd.grad(d.sum(), xr)
        with torch.no_grad():
            active = (model(x_adv).argmax(dim=1) == y).view(-1, 1, 1, 1)
            step = torch.clamp(torch.min(torch.max(x_adv + eps / 4 * g.sign(), x - eps), x + eps), 0, 1)
            x_adv = torch.where(active, step, x_adv)
    return x_adv


# ----------------------------------------------------------------- the paper suite
@contextlib.contextmanager
def _deciding(model, decision):
    """The shared DRP model under ``decision`` for one test; "nearest" again afterwards."""
    model.decision = decision
    try:
        yield model
    finally:
        model.decision = "nearest"


@pytest.mark.parametrize("decision", ["nearest", "paper"])
def test_paper_pgd_matches_the_plain_loop(models, decision):
    nets, x, y = models
    with _deciding(nets["drp"], decision) as m:
        ours = A.paper_pgd(m, x, y, eps=EPS, steps=10)
        plain = _plain_paper_pgd(m, x, y, EPS, 10)
        assert ours.shape == x.shape and not ours.requires_grad
        assert bool(((ours - x).abs() <= EPS).all() and (ours >= 0).all() and (ours <= 1).all())
        torch.testing.assert_close(ours, plain, atol=1e-6, rtol=0)
        assert _accuracy(m, ours, y) < _accuracy(m, x, y)


@pytest.mark.parametrize("decision", ["nearest", "paper"])
def test_paper_suite_reports_the_paper_attack(models, decision):
    nets, x, y = models
    with _deciding(nets["drp"], decision) as m:
        r = A.evaluate(m, x, y, eps=EPS, suite="paper", progress=False, checks=False)
        assert list(r["per_attack"]) == ["paper-pgd-20"]
        assert r["clean_accuracy"] == pytest.approx(_accuracy(m, x, y))
        # the suite's number is the accuracy under paper_pgd, under the model's own decision rule
        assert r["robust_accuracy"] == pytest.approx(_accuracy(m, A.paper_pgd(m, x, y, eps=EPS), y))
        r100 = A.evaluate(m, x, y, eps=EPS, suite="paper-100", progress=False, checks=False)
        assert list(r100["per_attack"]) == ["paper-pgd-100"]
        # the standard-strength APGD suite is at least as strong as the paper's single-direction attack
        q = A.evaluate(m, x, y, eps=EPS, suite="quick", progress=False, checks=False)
        assert q["robust_accuracy"] <= r["robust_accuracy"]


def test_paper_suite_refuses_other_models(models):
    nets, x, y = models
    with pytest.raises(TypeError, match="ProtoClassifier"):
        A.evaluate(nets["ce"], x, y, eps=EPS, suite="paper", progress=False)
    with pytest.raises(TypeError, match="ProtoClassifier"):
        A.paper_pgd(nets["ce"], x, y, eps=EPS)
    with pytest.raises(ValueError, match="norm"):
        A.evaluate(nets["drp"], x, y, eps=EPS, suite="paper", norm="l2", progress=False)
    with pytest.raises(ValueError, match="suite"):
        A.evaluate(nets["drp"], x, y, eps=EPS, suite="paper-50", progress=False)


# ------------------------------------------------------------------- monotone sweeps

def test_sweep_is_monotone_by_construction(models, monkeypatch):
    ev = importlib.import_module("drp_kernels.attacks.evaluate")
    monkeypatch.setitem(ev.SUITES, "quick", {"ce_steps": 2, "t_steps": 2, "n_targets": 2, "square_queries": 0})
    nets, x, y = models
    torch.manual_seed(0)
    # a randomised model: evaluated at each eps on its own, its robust accuracy can rise
    model = NoisyLogits(nets["ce"], scale=2.0)
    eps_list = [0.02, 0.0, 0.01, 0.015, 0.005, 0.02]
    r = A.accuracy_vs_eps(model, x, y, eps_list=eps_list, suite="quick", progress=False, checks=False)
    assert [e["eps"] for e in r["results"]] == eps_list
    # in increasing eps order (the repeated eps in the order given) robust accuracy never rises
    order = sorted(range(len(eps_list)), key=lambda i: eps_list[i])
    seq = [r["results"][i]["robust_accuracy"] for i in order]
    assert all(b <= a for a, b in zip(seq, seq[1:])), seq
    assert seq[0] <= r["clean_accuracy"]
    for res in r["results"]:
        pa = list(res["per_attack"].values())
        assert all(b <= a for a, b in zip(pa, pa[1:])) and pa[-1] == res["robust_accuracy"]


def test_sweep_does_not_attack_broken_points_again(models, monkeypatch):
    """At a larger eps the model only ever sees the points left robust at the smaller one."""
    ev = importlib.import_module("drp_kernels.attacks.sweep")
    nets, x, y = models
    m = nets["ce"]
    current, calls = {}, []

    class Counting(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = m

        def forward(self, xx):
            calls.append((current.get("eps"), xx.shape[0]))
            return self.net(xx)

    run_step = ev._sweep_step

    def tagged(*args, **kw):
        step = args[4]
        current["eps"] = kw["eps_list"][kw["order"][step // len(kw["stages"])]]
        return run_step(*args, **kw)

    monkeypatch.setattr(ev, "_sweep_step", tagged)
    r = A.accuracy_vs_eps(Counting(), x, y, eps_list=[0.3, 0.03], suite="quick", progress=False, checks=False)
    left = round(r["results"][1]["robust_accuracy"] * x.shape[0])  # robust at eps 0.03
    assert 0 < left < x.shape[0]
    assert max(b for e, b in calls if e == 0.03) > left  # the smaller eps attacked more points
    assert max((b for e, b in calls if e == 0.3), default=0) <= left


# --------------------------------------------------------------- APGD early exit
def test_apgd_early_exit_keeps_every_trajectory(models, monkeypatch):
    """Dropping broken points from the working batch changes no surviving point's iterates:
    with the exit postponed to the end of the run the result is the same."""
    nets, x, y = models
    for name in ("ce", "drp"):
        m = nets[name]
        for loss, kw in (("ce", {}), ("dlr-t", {"n_target_classes": 3})):
            a = A.apgd(m, x, y, eps=0.05, steps=25, loss=loss, seed=3, **kw)
            with monkeypatch.context() as mp:
                mp.setattr(common, "exit_every", lambda device: 10 ** 9)
                b = A.apgd(m, x, y, eps=0.05, steps=25, loss=loss, seed=3, **kw)
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_stacked_runs_report_each_point_truthfully(models):
    """With several targets (or restarts) of the same points stacked in one batch, every
    returned point lies in the ball and is reported broken exactly when the model misclassifies it."""
    nets, x, y = models
    for name in ("ce", "drp"):
        m = nets[name]
        with torch.no_grad():
            clean = m(x)
        for loss, runs in (("dlr-t", {"n_target_classes": 5, "restarts": 1}), ("ce", {"n_target_classes": 1,
                                                                                     "restarts": 3})):
            keys = torch.arange(x.shape[0], dtype=torch.int64)
            out, fooled = apgd_mod._apgd(m, x, y, eps=0.03, steps=15, norm="linf", loss=loss, keys=keys,
                                         clean_logits=clean, max_rows=10 ** 6, **runs)
            assert bool(((out - x).abs() <= 0.03).all() and (out >= 0).all() and (out <= 1).all())
            with torch.no_grad():
                wrong = m(out).argmax(dim=1) != y
            assert torch.equal(fooled, wrong), (name, loss)
            assert 0 < int(fooled.sum()) < x.shape[0]


# --------------------------------------------------------------------- progress
def test_progress_names_the_attack_and_the_points_left(models, caplog):
    nets, x, y = models
    with caplog.at_level(logging.INFO, logger="drp_kernels.attacks"):
        A.evaluate(nets["ce"], x[:32], y[:32], eps=EPS, suite="quick", progress=True, checks=False)
    text = "\n".join(r.getMessage() for r in caplog.records if r.name == "drp_kernels.attacks")
    assert "apgd-ce" in text and "apgd-t" in text and "points left" in text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="drp_kernels.attacks"):
        A.evaluate(nets["ce"], x[:32], y[:32], eps=EPS, suite="quick", progress=False, checks=False)
    assert not [r for r in caplog.records if r.name == "drp_kernels.attacks"]


# ------------------------------------------------------------------- drp eval CLI
@pytest.fixture(scope="module")
def drp_linf_run(tmp_path_factory):
    from drp_train.config import TrainConfig
    from drp_train.train import train

    out = tmp_path_factory.mktemp("drp_linf")
    cfg = TrainConfig(dataset="fashion-mnist", method="drp", metric="linf", proto_dim=16, model="cnn", epochs=1,
                      batch_size=32, limit_train=512, limit_test=64, seed=0, out=str(out), quiet=True)
    train(cfg, progress=False)
    return out


def test_drp_eval_paper_and_standard_side_by_side(drp_linf_run, tmp_path, capsys, monkeypatch):
    from drp_train import cli

    ev = importlib.import_module("drp_kernels.attacks.evaluate")
    monkeypatch.setitem(ev.SUITES, "standard", {"ce_steps": 5, "t_steps": 5, "n_targets": 3, "square_queries": 20})
    js = tmp_path / "eval.json"
    code = cli.main(["eval", "--checkpoint", str(drp_linf_run), "--eps", "0.05", "0.1", "--suite", "paper",
                     "standard", "--decision", "paper", "--limit", "24", "--json", str(js), "--quiet"])
    out, err = capsys.readouterr()
    assert code == 0, err
    doc = json.loads(js.read_text())
    assert doc["suite"] == ["paper", "standard"] and set(doc["suites"]) == {"paper", "standard"}
    assert doc["decision"] == "paper"
    assert not os.path.isabs(doc["checkpoint"])
    for suite, stage in (("paper", "paper-pgd-20"), ("standard", "square")):
        res = doc["suites"][suite]["results"]
        assert [r["eps"] for r in res] == [0.05, 0.1]
        assert all(stage in r["per_attack"] for r in res)
    assert "suite paper:" in out and "suite standard:" in out
    # without --json the table still goes to stdout
    code = cli.main(["eval", "--checkpoint", str(drp_linf_run), "--eps", "0.05", "--suite", "paper", "--limit", "8",
                     "--quiet"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "clean accuracy" in out and "paper-pgd-20" in out


def test_drp_eval_paper_suite_needs_a_drp_checkpoint(tmp_path, capsys):
    from drp_train import cli
    from drp_train.config import TrainConfig
    from drp_train.train import train

    cfg = TrainConfig(dataset="fashion-mnist", method="ce", model="cnn", epochs=1, batch_size=64, limit_train=128,
                      limit_test=16, seed=0, out=str(tmp_path / "ce"), quiet=True)
    train(cfg, progress=False)
    for extra in (["--suite", "paper"], ["--decision", "paper"]):
        code = cli.main(["eval", "--checkpoint", str(tmp_path / "ce"), "--eps", "0.1", "--limit", "4", "--quiet",
                         "--json", str(tmp_path / "x.json")] + extra)
        _, err = capsys.readouterr()
        assert code == 2 and err.startswith("drp: error: --") and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "x.json").exists()
