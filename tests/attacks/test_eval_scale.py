"""Evaluation at scale: per-point results that do not depend on the batch size, the order of the
points or the shards; resumable sweeps; `drp eval --resume`, Ctrl-C and SIGKILL; sharding over
torchrun; the L2 suite with Square-L2 (against the paper's pseudo-code); exact counts in the JSON.

The committed CE model (results/fashion-mnist/ce/final.pt) is the test model; suites are shrunk
so that each test takes seconds."""
import importlib
import json
import logging
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from drp_kernels import attacks as A
from drp_kernels.attacks import _keys as R

from _helpers import FMNIST_DIR, REPO, load_fmnist, torchrun, torchrun_log

CE = os.path.join(REPO, "results", "fashion-mnist", "ce", "final.pt")
CERTIFIED = os.path.join(REPO, "results", "fashion-mnist", "certified", "final.pt")
TINY = {"ce_steps": 5, "t_steps": 5, "n_targets": 2, "square_queries": 30}

pytestmark = [pytest.mark.skipif(not os.path.isdir(FMNIST_DIR), reason="needs the dataset-fashion-mnist package"),
              pytest.mark.skipif(not os.path.isfile(CE), reason="needs the committed CE model"),
              pytest.mark.usefixtures("one_thread")]

ev = importlib.import_module("drp_kernels.attacks.evaluate")


@pytest.fixture(scope="module")
def ce_model():
    from drp_train.checkpoint import load_classifier

    return load_classifier(CE).eval()


@pytest.fixture
def tiny_suite(monkeypatch):
    monkeypatch.setitem(ev.SUITES, "standard", dict(TINY))


@pytest.fixture
def cheap_checks(monkeypatch):
    """The sanity checks at a fraction of their budgets (the CLI tests are about the plumbing)."""
    checks = importlib.import_module("drp_kernels.attacks.checks")
    monkeypatch.setattr(checks, "QUICK_SQUARE_QUERIES", 20)
    monkeypatch.setattr(checks, "PROBE_STEPS", 3)


def _broken(state):
    """(K, N) int8: the stage that broke each point at each eps, in dataset-index order."""
    order = torch.argsort(state.index)
    return state.broken[:, order]


# ------------------------------------------------------------ per-point invariance
def test_masks_do_not_depend_on_batch_size_order_shards_or_threads(ce_model, monkeypatch):
    # one APGD-CE step leaves points for APGD-T to break; Square's end points are the next eps's starts
    monkeypatch.setitem(ev.SUITES, "standard", {"ce_steps": 1, "t_steps": 5, "n_targets": 2, "square_queries": 30})
    x, y = load_fmnist("t10k", 48)
    kw = dict(eps_list=[0.03, 0.01], suite="standard", progress=False)
    ref = A.sweep(ce_model, x, y, batch_size=137, **kw)  # one chunk
    assert ref.complete()
    b = _broken(ref)
    # a mix of points: broken at 0.01, at 0.03 only, by different stages, and robust
    assert 0 < int((b[1] >= 0).sum()) < int((b >= 0).any(0).sum()) < int((ref.correct == 1).sum())
    assert len(set(b[b >= 0].tolist())) >= 2
    # another order of the same points, keyed by their dataset index, in chunks of 7 (padded to 8 rows)
    perm = torch.randperm(48, generator=torch.Generator().manual_seed(1))
    assert torch.equal(_broken(A.sweep(ce_model, x[perm], y[perm], index=perm, batch_size=7, **kw)), b)
    # two shards, merged
    shards = [A.sweep(ce_model, x[r::2], y[r::2], index=torch.arange(48)[r::2], batch_size=11, **kw) for r in (0, 1)]
    merged = A.SweepState.merge(shards)
    assert torch.equal(merged.index, torch.arange(48)) and torch.equal(merged.broken, b)
    # two threads: batches under 64 rows run single-threaded, so the bits are the same
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert torch.equal(_broken(A.sweep(ce_model, x, y, batch_size=20, **kw)), b)
    finally:
        torch.set_num_threads(n)
    # the report of the merged shards is the single-process report, counts and flags included
    one = A.sweep_report(ce_model, x, y, ref, check_samples=16)
    two = A.sweep_report(ce_model, x, y, merged, check_samples=16)
    strip = lambda rep: [{k: v for k, v in r.items() if k != "timings"} for r in rep["results"]]  # noqa: E731
    assert strip(one) == strip(two) and one["flags"] == two["flags"] and one["clean_count"] == two["clean_count"]


@pytest.mark.slow
@pytest.mark.parametrize("name,n,eps", [("ce", 500, [0.02]), ("certified", 200, [0.1])])
def test_committed_models_bit_identical_masks_at_batch_sizes_50_137_500(name, n, eps, monkeypatch):
    """The target: the same per-point verdict at batch sizes 50, 137, 500 (the certified
    network, whose l-inf distances are exact at p = inf, on fewer points: it is slower)."""
    from drp_train.checkpoint import load_classifier

    path = os.path.join(REPO, "results", "fashion-mnist", name, "final.pt")
    if not os.path.isfile(path):
        pytest.skip(f"needs {path}")
    monkeypatch.setitem(ev.SUITES, "standard", {"ce_steps": 3, "t_steps": 3, "n_targets": 2, "square_queries": 20})
    model = load_classifier(path).eval()
    x, y = load_fmnist("t10k", n)
    masks = [A.sweep(model, x, y, eps_list=eps, batch_size=bs, progress=False).broken for bs in (50, 137, 500)]
    assert torch.equal(masks[0], masks[1]) and torch.equal(masks[0], masks[2])
    assert bool((masks[0] >= 0).any())


def test_public_attacks_key_samples_by_index(ce_model):
    """apgd and square give a sample the same result in any batch when it keeps its index."""
    x, y = load_fmnist("t10k", 24)
    for attack in (lambda xx, yy, i: A.apgd(ce_model, xx, yy, eps=0.03, steps=5, seed=4, index=i),
                   lambda xx, yy, i: A.square(ce_model, xx, yy, eps=0.03, queries=40, seed=4, index=i),
                   lambda xx, yy, i: A.square(ce_model, xx, yy, eps=0.8, queries=40, seed=4, index=i, norm="l2")):
        full = attack(x, y, None)
        part = attack(x[5:17], y[5:17], torch.arange(5, 17))
        assert torch.equal(part, full[5:17])
        assert not torch.equal(attack(x, y, torch.arange(24) + 100), full)  # other indices, other draws


# --------------------------------------------------------------------- resume
def _in_apgd_t(st):
    """In the middle of APGD-T at the first eps (eps_list[0], the smallest): APGD-CE is done for every
    point, APGD-T for some (broken by it, or through it unbroken) and not for others (pos 1)."""
    alive = st.alive()
    ce_done = not bool((alive & (st.pos == 0)).any())
    t_done = (st.broken[0] == 1) | ((st.pos >= 2) & (st.broken[0] < 0) & (st.correct == 1))
    return ce_done and bool(t_done.any()) and bool((alive & (st.pos == 1)).any())


def test_sweep_resumes_after_an_interruption_in_apgd_t(ce_model, tiny_suite, caplog):
    x, y = load_fmnist("t10k", 32)
    kw = dict(eps_list=[0.005, 0.02], suite="standard", batch_size=4)
    ref = A.sweep(ce_model, x, y, progress=False, **kw)
    saved, calls = [], []  # noqa: F841

    def stop_in_apgd_t(st):
        calls.append(1)
        if _in_apgd_t(st):
            saved.append(st.to_dict())
            raise KeyboardInterrupt

    state = A.SweepState(index=torch.arange(32), eps_list=kw["eps_list"], suite="standard", norm="linf", seed=0)
    with caplog.at_level(logging.INFO, logger="drp_kernels.attacks"), pytest.raises(KeyboardInterrupt):
        A.sweep(ce_model, x, y, state=state, progress=True, on_batch=stop_in_apgd_t, **kw)
    # the stopped stage says where it stopped, not "done" with a count it never finished
    last = [r.getMessage() for r in caplog.records if "eps 0.005 apgd-t" in r.getMessage()][-1]
    assert "stopped after" in last and "done in" not in last, last
    caplog.clear()
    back = A.SweepState.from_dict(saved[-1])
    assert torch.equal(back.pos, state.pos) and torch.equal(back.broken, state.broken)
    left = int((back.alive() & (back.pos == 1)).sum())
    assert left > 0
    with caplog.at_level(logging.INFO, logger="drp_kernels.attacks"):
        A.sweep(ce_model, x, y, state=back, progress=True, **kw)
    assert torch.equal(back.broken, ref.broken) and back.complete()
    lines = [r.getMessage() for r in caplog.records]
    # the finished points are not attacked again: APGD-CE at the first eps does not run, APGD-T on the rest only
    assert not [m for m in lines if m.startswith("eps 0.005 apgd-ce")]
    assert f"eps 0.005 apgd-t: {left} points" in [m.split(",")[0] for m in lines]


def test_sweep_refuses_a_state_of_another_sweep(ce_model, tiny_suite):
    x, y = load_fmnist("t10k", 8)
    st = A.SweepState(index=torch.arange(8), eps_list=[0.1], suite="standard", norm="linf", seed=0)
    for kw, what in ((dict(eps_list=[0.2]), "eps list"), (dict(eps_list=[0.1], seed=1), "seed"),
                     (dict(eps_list=[0.1], norm="l2"), "norm"), (dict(eps_list=[0.1], index=torch.arange(8) + 1),
                                                                 "points")):
        with pytest.raises(ValueError, match=what):
            A.sweep(ce_model, x, y, state=st, progress=False, **kw)


# ---------------------------------------------------------------- drp eval CLI
def _run(argv, capsys):
    from drp_train import cli

    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _same_report(a, b):
    """Two `drp eval` JSON files equal but for timings and world size."""
    docs = []
    for path in (a, b):
        d = json.loads(open(path).read())
        for key in ("timings", "eval_time_s", "world_size"):
            d.pop(key, None)
        docs.append(json.dumps(d, sort_keys=True))
    return docs[0] == docs[1]


def _eval_args(json_path, *extra):
    return ["eval", "--checkpoint", CE, "--eps", "0.005", "0.02", "--limit", "24", "--batch-size", "8",
            "--json", str(json_path), "--quiet", *extra]


def test_drp_eval_ctrl_c_then_resume_gives_the_uninterrupted_json(tmp_path, capsys, tiny_suite, cheap_checks,
                                                                  monkeypatch):
    evaluation = importlib.import_module("drp_train.eval_cli")
    ref = tmp_path / "ref.json"
    assert _run(_eval_args(ref), capsys)[0] == 0
    doc = json.loads(ref.read_text())
    # exact counts: every fraction is count / n in float64
    assert doc["clean_accuracy"] == doc["clean"] / 24 and doc["n"] == 24
    for r in doc["results"]:
        assert r["robust_accuracy"] == r["robust"] / 24 and r["n"] == 24
    assert not evaluation.partial_paths(ref)  # nothing left beside a finished report

    js = tmp_path / "eval.json"
    real, writes = evaluation.write_partial, []

    def interrupt_on_the_fifth(*a, **kw):
        real(*a, **kw)
        writes.append(1)
        if len(writes) == 5:
            raise KeyboardInterrupt

    monkeypatch.setattr(evaluation, "write_partial", interrupt_on_the_fifth)
    code, out, err = _run(_eval_args(js), capsys)
    assert code == 130 and not js.exists()
    assert len(err.strip().splitlines()) == 1 and "--resume" in err and "eval.json.partial" in err, err
    assert evaluation.partial_paths(js) == [str(js) + ".partial"]
    monkeypatch.setattr(evaluation, "write_partial", real)
    saved = torch.load(str(js) + ".partial", weights_only=True)
    code, out, err = _run(_eval_args(js, "--resume"), capsys)
    assert code == 0, err
    assert _same_report(js, ref)
    assert not evaluation.partial_paths(js)
    # the report's time counts the run before the interrupt too: its wall time and its stage times
    doc = json.loads(js.read_text())
    assert saved["generation"] == 0 and saved["elapsed_s"] > 0
    assert doc["eval_time_s"] > saved["elapsed_s"]
    before = saved["suites"]["standard"]["timings"]
    assert any(before), before
    for k, tk in enumerate(before):
        for stage, sec in tk.items():
            assert doc["timings"][k][stage] >= sec > 0, (k, stage)


def test_resume_takes_the_time_so_far_from_the_newest_run_only(tmp_path):
    """A resume under another process count leaves the older run's files beside the new ones:
    the time comes from the newest generation (whose rank 0 carries the earlier runs' time)."""
    import drp_train.eval_partial as P
    from drp_train.ddp import DistInfo

    meta = {key: "same" for key, *_ in P._META_CHECKS}
    js = tmp_path / "e.json"

    def state(idx, secs):
        st = A.SweepState(index=torch.tensor(idx), eps_list=[0.1], suite="quick", norm="linf", seed=0)
        st.timings = [{"apgd-ce": secs}]
        return st

    def info(rank, world):
        return DistInfo(rank=rank, world_size=world, local_rank=rank)

    # generation 0 on 2 ranks: 3 s and 4 s; generation 1 on 1 rank: 7 s before + 2 s of its own
    P.write_partial(f"{js}.partial.rank0-of-2", meta, {"quick": state([0, 2], 3.0)}, info(0, 2), elapsed_s=5.0)
    P.write_partial(f"{js}.partial.rank1-of-2", meta, {"quick": state([1, 3], 4.0)}, info(1, 2), elapsed_s=5.5)
    P.write_partial(f"{js}.partial.rank0-of-1", meta, {"quick": state([0, 1, 2, 3], 9.0)}, info(0, 1),
                    generation=1, elapsed_s=8.0)
    states, prior = P.read_partials(P.partial_paths(js), meta)
    assert prior == {"generation": 1, "elapsed_s": 8.0, "timings": {"quick": [{"apgd-ce": 9.0}]}}
    assert states["quick"].index.tolist() == [0, 1, 2, 3]


def test_drp_eval_resume_refuses_a_partial_file_of_another_run(tmp_path, capsys, tiny_suite, cheap_checks,
                                                               monkeypatch):
    evaluation = importlib.import_module("drp_train.eval_cli")
    js = tmp_path / "eval.json"
    code, _, err = _run(_eval_args(js, "--resume"), capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "no partial file" in err, err
    # make a partial file: interrupt at the first write
    monkeypatch.setattr(evaluation, "write_partial",
                        lambda *a, _real=evaluation.write_partial, **kw: (_real(*a, **kw), _raise()))
    assert _run(_eval_args(js), capsys)[0] == 130
    monkeypatch.undo()
    monkeypatch.setitem(ev.SUITES, "standard", dict(TINY))
    partial = str(js) + ".partial"
    before = open(partial, "rb").read()
    cases = [(["--eps", "0.005", "0.03"], "eps list"), (["--seed", "1"], "seed"), (["--suite", "quick"], "suite"),
             (["--limit", "23"], "number of points"), (["--norm", "l2"], "norm")]
    for change, what in cases:
        argv = _eval_args(js, "--resume")
        flag = change[0]
        i = argv.index(flag) if flag in argv else None
        if i is not None:  # replace the option's values
            j = i + 1
            while j < len(argv) and not argv[j].startswith("--"):
                j += 1
            argv = argv[:i] + change + argv[j:]
        else:
            argv = argv + change
        code, out, err = _run(argv, capsys)
        assert code == 2, (what, err)
        assert len(err.strip().splitlines()) == 1 and what in err and "eval.json.partial" in err, (what, err)
        assert not js.exists() and open(partial, "rb").read() == before
    # another model: the same network with another recorded seed is another file, so another model
    from drp_train.checkpoint import load_checkpoint

    other = tmp_path / "other.pt"
    ck = load_checkpoint(CE)
    ck["config"]["seed"] = 12345
    torch.save(ck, str(other))
    argv = _eval_args(js, "--resume")
    argv[argv.index(CE)] = str(other)
    code, _, err = _run(argv, capsys)
    assert code == 2 and "another model" in err and len(err.strip().splitlines()) == 1, err


def _raise():
    raise KeyboardInterrupt


@pytest.mark.parametrize("argv,needle", [
    (["--norm", "l1"], "--norm"),
    (["--norm", "l2", "--suite", "paper"], "L-inf only"),
    (["--norm", "l2", "--eps", "29"], "--eps"),
    (["--resume"], "--resume: needs --json"),
    (["--certify-limit", "10"], "--certify-limit"),
    (["--limit", "-3"], "--limit"),
    (["--limit", "5", "--all"], "--limit 5 with --all"),
    (["--limit", "1000", "--all"], "--limit 1000 with --all"),  # the default's value, given explicitly
])
def test_drp_eval_bad_input_is_one_line_exit_2_nothing_written(argv, needle, tmp_path, capsys):
    base = ["eval", "--checkpoint", CE, "--eps", "0.1", "--limit", "4", "--quiet"]
    if "--resume" not in argv:
        base += ["--json", str(tmp_path / "r.json")]
    merged = base[:]
    for i in range(0, len(argv), 2):  # an option given twice: argparse keeps the last
        merged += argv[i:i + 2]
    code, out, err = _run(merged, capsys)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and needle in err, err
    assert not os.listdir(tmp_path)


# ----------------------------------------------------------------------------- L2
def test_drp_eval_l2_names_the_norm_and_reads_fractions(tmp_path, capsys, tiny_suite, cheap_checks):
    js, png = tmp_path / "l2.json", tmp_path / "l2.png"
    code, out, err = _run(["eval", "--checkpoint", CE, "--norm", "l2", "--eps", "128/255", "1.5", "--limit", "16",
                           "--json", str(js), "--plot", str(png), "--quiet"], capsys)
    assert code == 0, err
    doc = json.loads(js.read_text())
    assert doc["norm"] == "l2" and [r["eps"] for r in doc["results"]] == [128 / 255, 1.5]
    assert list(doc["results"][0]["per_attack"]) == ["apgd-ce", "apgd-t", "square"]
    assert doc["results"][1]["robust"] <= doc["results"][0]["robust"] < doc["clean"]
    assert "L2" in out and png.stat().st_size > 5000


def test_certified_model_counts_both_point_sets_and_l2_is_implied(tmp_path, capsys, cheap_checks, monkeypatch):
    if not os.path.isfile(CERTIFIED):
        pytest.skip("needs the committed certified model")
    monkeypatch.setitem(ev.SUITES, "quick", {"ce_steps": 3, "t_steps": 3, "n_targets": 2, "square_queries": 0})
    for norm, eps in (("linf", "0.1"), ("l2", "0.1")):
        js = tmp_path / f"{norm}.json"
        code, out, err = _run(["eval", "--checkpoint", CERTIFIED, "--norm", norm, "--eps", eps, "--suite", "quick",
                               "--limit", "6", "--certify-limit", "40", "--json", str(js), "--quiet"], capsys)
        assert code == 0, err
        doc = json.loads(js.read_text())
        assert doc["points"] == {"suite": {"first": 0, "count": 6}, "certify": {"first": 0, "count": 40}}
        r = doc["results"][0]
        assert r["certified_n"] == 40 and r["certified_accuracy"] == r["certified"] / 40
        assert r["certified_on_suite_points"] <= r["robust"] and 0 < r["certified"] <= 40
        assert doc["certify_clean_accuracy"] == doc["certify_clean"] / 40
        assert ("implied by the L-inf certificate" in doc["certificate"]) == (norm == "l2")
        assert "certified on the first 40 test points, attacked on the first 6" in out
    # the L2 ball lies in the L-inf ball: the same certificate
    lin, l2 = (json.loads((tmp_path / f"{n}.json").read_text())["results"][0] for n in ("linf", "l2"))
    assert lin["certified"] == l2["certified"] and l2["robust"] >= lin["robust"]


def test_drp_plot_refuses_reports_of_two_norms(tmp_path, capsys):
    paths = []
    for norm in ("linf", "l2"):
        path = tmp_path / f"{norm}.json"
        path.write_text(json.dumps({"clean_accuracy": 0.9, "n": 10, "norm": norm, "suite": "quick", "method": norm,
                                    "results": [{"eps": 0.5, "robust_accuracy": 0.5}]}))
        paths.append(str(path))
    code, out, err = _run(["plot", *paths, "--out", str(tmp_path / "p.png")], capsys)
    assert code == 2 and "mix norms" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "p.png").exists()
    code, out, err = _run(["plot", paths[1], "--out", str(tmp_path / "p.png")], capsys)
    assert code == 0 and (tmp_path / "p.png").stat().st_size > 5000, err


# ---------------------------------------------------------- Square-L2 reference
def _eta(a, b):
    """The paper's pseudo-Gaussian: sum over the concentric squares around the centre of 1/(k+1)^2."""
    out = torch.zeros(a, b, dtype=torch.float64)
    ca, cb = a // 2, b // 2
    for k in range(max(ca, cb) + 1):
        out[max(ca - k, 0):ca + k + 1, max(cb - k, 0):cb + k + 1] += 1.0 / (k + 1) ** 2
    return out


def _meta(s):
    """eta with two halves of opposite sign, unit L2 norm."""
    e = _eta(s, s) if s < 2 else torch.cat([_eta(s // 2, s), -_eta(s - s // 2, s)])
    return e / e.norm()


def _margin(model, x, y):
    with torch.no_grad():
        z = model(x[None].float())[0].double()
    zy = float(z[y])
    z[y] = -math.inf
    return zy - float(z.max())


def _square_l2_reference(model, x, y, eps, queries, key, p_init=0.8):
    """The L2 Square Attack as the paper writes it (Algorithm 1 with Algorithm 3's sampling), one image
    in float64, with the engine's keyed draws for the same random choices (_keys.bits, in the
    engine's layout: init = tile transposes then signs; query t = 4 window corners, a transpose,
    one sign per channel). Returns whether it broke the point."""
    c, h, w = x.shape
    x = x.double()
    keyt = torch.tensor([key])
    t = h // 5
    nt = h // t
    off = (h - nt * t) // 2
    b = R.bits(keyt, 0, nt * nt * (1 + c))[0]
    delta = torch.zeros_like(x)
    for i in range(nt):
        for j in range(nt):
            n = i * nt + j
            e = _meta(t).T if int(R.below(b[n:n + 1], 2)) else _meta(t)
            for ch in range(c):
                sign = float(R.signs(b[nt * nt + n * c + ch:nt * nt + n * c + ch + 1]))
                delta[ch, off + i * t:off + (i + 1) * t, off + j * t:off + (j + 1) * t] += sign * e
    x_best = (x + delta / delta.norm() * eps).clamp(0, 1)
    m_best = _margin(model, x_best, y)
    for it in range(1, queries):
        if m_best <= 0:
            break
        p = p_init / 2 ** sum(int(it / queries * 10000) > k for k in (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000))
        s = max(round(math.sqrt(p * h * w)), 3)
        s += 1 - s % 2
        if s > h - 1:
            s = h - 1 if (h - 1) % 2 else h - 2
        q = R.bits(keyt, it, 5 + c)[0]
        r1, c1, r2, c2 = (int(R.below(q[j:j + 1], h - s + 1)) for j in range(4))
        eta = _meta(s).T if int(R.below(q[4:5], 2)) else _meta(s)
        nu = x_best - x
        unused = max(eps ** 2 - float(nu.pow(2).sum()), 0.0)
        new = nu.clone()
        for ch in range(c):
            rho = float(R.signs(q[5 + ch:6 + ch]))
            w1 = nu[ch, r1:r1 + s, c1:c1 + s]
            both = torch.zeros(h, w, dtype=torch.bool)
            both[r1:r1 + s, c1:c1 + s] = True
            both[r2:r2 + s, c2:c2 + s] = True
            avail = math.sqrt(float(nu[ch][both].pow(2).sum()) + unused / c)
            direction = rho * eta + w1 / (w1.norm() + 1e-10)
            new[ch, r2:r2 + s, c2:c2 + s] = 0.0
            new[ch, r1:r1 + s, c1:c1 + s] = direction / direction.norm() * avail
        x_new = (x + new / new.norm() * eps).clamp(0, 1)
        m_new = _margin(model, x_new, y)
        if m_new < m_best:
            x_best, m_best = x_new, m_new
    return m_best <= 0


def test_square_l2_breaks_what_the_papers_algorithm_breaks(ce_model):
    x, y = load_fmnist("t10k", 16)
    with torch.no_grad():
        keep = ce_model(x).argmax(1) == y
    x, y = x[keep][:12], y[keep][:12]
    eps, queries = 1.5, 100
    ours = A.square(ce_model, x, y, eps=eps, queries=queries, norm="l2", seed=7)
    assert bool(((ours - x).flatten(1).norm(dim=1) <= eps * (1 + 1e-5)).all())
    with torch.no_grad():
        ours_broken = ce_model(ours).argmax(1) != y
    keys = R.point_keys(7, torch.arange(x.shape[0]), R.PUBLIC_IDS["square"])
    ref = torch.tensor([_square_l2_reference(ce_model, x[i], int(y[i]), eps, queries, int(keys[i]))
                        for i in range(x.shape[0])])
    assert 0 < int(ref.sum()) < x.shape[0]  # the budget leaves both broken and robust points
    assert int(ours_broken.sum()) >= int(ref.sum())
    assert bool((ours_broken | ~ref).all())  # every point the paper's algorithm breaks, ours breaks too


# -------------------------------------------------------------- processes
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [os.path.join(REPO, "python"), str(REPO)] + os.environ.get("PYTHONPATH", "").split(os.pathsep)))


QUICK = {"ce_steps": 5, "t_steps": 10, "n_targets": 3, "square_queries": 0}
_LAUNCHER = f"""import importlib, sys
importlib.import_module("drp_kernels.attacks.evaluate").SUITES["quick"] = {QUICK!r}
checks = importlib.import_module("drp_kernels.attacks.checks")
checks.QUICK_SQUARE_QUERIES, checks.PROBE_STEPS = 20, 3
from drp_train.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture
def launcher(tmp_path_factory, monkeypatch, cheap_checks):
    """`drp` in a real process with a smaller quick suite and cheap checks (and the same in this
    process): the script's path."""
    monkeypatch.setitem(ev.SUITES, "quick", dict(QUICK))
    path = tmp_path_factory.mktemp("launcher") / "drp_small.py"
    path.write_text(_LAUNCHER)
    return str(path)


@pytest.mark.slow
def test_two_processes_write_the_single_process_json_and_plot(tmp_path, capsys, launcher):
    """torchrun, 2 processes, gloo on the CPU: the same JSON (timings and world size aside) and PNG."""
    args = ["eval", "--checkpoint", CE, "--eps", "0.01", "0.03", "--suite", "quick", "--limit", "24",
            "--batch-size", "5", "--quiet"]
    one = [*args, "--json", str(tmp_path / "one.json"), "--plot", str(tmp_path / "one.png")]
    assert _run(one, capsys)[0] == 0
    two = [*args, "--json", str(tmp_path / "two.json"), "--plot", str(tmp_path / "two.png")]
    res = torchrun([launcher, *two], env=_env())
    assert res.returncode == 0, torchrun_log(res)
    assert res.stdout.count("wrote ") == 1 and "2 processes" in res.stdout  # rank 0 alone reports
    assert json.loads((tmp_path / "two.json").read_text())["world_size"] == 2
    assert _same_report(tmp_path / "one.json", tmp_path / "two.json")
    assert (tmp_path / "one.png").read_bytes() == (tmp_path / "two.png").read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["one.json", "one.png", "two.json", "two.png"]


@pytest.mark.slow
def test_ranks_that_disagree_on_the_arguments_stop_with_one_message(tmp_path):
    port = str(_free_port())
    procs = []
    for rank, seed in ((0, "0"), (1, "1")):
        env = dict(_env(), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, "-m", "drp_train", "eval", "--checkpoint", CE, "--eps", "0.1",
                                       "--limit", "4", "--seed", seed, "--json", str(tmp_path / "r.json"), "--quiet"],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [2, 2]
    assert len(outs[0][1].strip().splitlines()) == 1 and "ranks disagree on the arguments" in outs[0][1], outs
    assert outs[1][1].strip() == "" and outs[0][0] == outs[1][0] == ""
    assert not os.listdir(tmp_path)


@pytest.mark.slow
def test_sigkill_in_apgd_t_then_resume_gives_the_same_json(tmp_path, capsys, launcher):
    evaluation = importlib.import_module("drp_train.eval_cli")
    args = ["eval", "--checkpoint", CE, "--eps", "0.005", "--suite", "quick", "--limit", "40", "--batch-size", "2"]
    ref = tmp_path / "ref.json"
    assert _run([*args, "--json", str(ref), "--quiet"], capsys)[0] == 0
    js = tmp_path / "eval.json"
    partial = str(js) + ".partial"
    proc = subprocess.Popen([sys.executable, launcher, *args, "--json", str(js), "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    killed, deadline = False, time.time() + 240
    try:
        while proc.poll() is None and time.time() < deadline:
            if os.path.exists(partial):
                try:
                    st = A.SweepState.from_dict(torch.load(partial, weights_only=True)["suites"]["quick"])
                except (OSError, RuntimeError, EOFError, KeyError):
                    st = None  # replaced while read
                if st is not None and _in_apgd_t(st):
                    os.kill(proc.pid, signal.SIGKILL)
                    killed = True
                    break
            time.sleep(0.005)
    finally:
        if proc.poll() is None and not killed:
            proc.kill()
        proc.wait()
    assert killed, "the evaluation ended before APGD-T was half done"
    st = A.SweepState.from_dict(torch.load(partial, weights_only=True)["suites"]["quick"])
    left = int((st.alive() & (st.pos == 1)).sum())
    assert left > 0 and not js.exists()
    res = subprocess.run([sys.executable, launcher, *args, "--json", str(js), "--resume"],
                         capture_output=True, text=True, env=_env(), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert _same_report(js, ref)
    # no finished point attacked again: no APGD-CE at all, APGD-T on the points left only
    assert "apgd-ce:" not in res.stderr
    assert re.search(rf"^eps 0\.005 apgd-t: {left} points,", res.stderr, re.M), res.stderr[-2000:]
    assert not evaluation.partial_paths(js)


def test_merge_takes_each_warm_start_from_the_state_whose_row_it_keeps():
    """Two partial files of one point at different progress (one process, then two): the merged
    state continues from the furthest row and from that row's warm start, not the older one's."""
    kw = dict(eps_list=[0.01, 0.02, 0.03], suite="standard", norm="linf", seed=0, stages=["a", "b"])
    old, new = (A.SweepState(index=torch.tensor([5, 6]), **kw) for _ in range(2))
    for st, pos, fill in ((old, 2, 1.0), (new, 4, 2.0)):  # between eps 1 and 2, between eps 2 and 3
        st.correct[:] = 1
        st.pos[:] = pos
        st.start_index = torch.tensor([5, 6])
        st.start_x = torch.full((2, 3), fill)
    new.pos[1] = 1  # point 6: the old file got further
    for order in ((old, new), (new, old)):
        merged = A.SweepState.merge(order)
        assert merged.pos.tolist() == [4, 2]
        got = dict(zip(merged.start_index.tolist(), merged.start_x[:, 0].tolist()))
        assert got == {5: 2.0, 6: 1.0}, order


def test_read_metrics_skips_an_unfinished_last_line_only(tmp_path):
    from drp_train.run_folder import RunFolder

    folder = RunFolder(str(tmp_path))
    with open(folder.metrics, "w") as f:
        f.write('{"epoch": 1}\n{"epoch": 2}\n{"epo')
    assert folder.read_metrics() == [{"epoch": 1}, {"epoch": 2}]
    with open(folder.metrics, "w") as f:
        f.write('{"epoch": 1}\n{"ep\n{"epoch": 3}\n')
    with pytest.raises(ValueError, match="line 2"):
        folder.read_metrics()


def test_drp_eval_fresh_run_refuses_partial_results_and_keeps_them(tmp_path, capsys, tiny_suite, cheap_checks,
                                                                     monkeypatch):
    evaluation = importlib.import_module("drp_train.eval_cli")
    js = tmp_path / "eval.json"
    monkeypatch.setattr(evaluation, "write_partial",
                        lambda *a, _real=evaluation.write_partial, **kw: (_real(*a, **kw), _raise()))
    assert _run(_eval_args(js), capsys)[0] == 130
    monkeypatch.undo()
    partial = str(js) + ".partial"
    before = open(partial, "rb").read()
    code, _, err = _run(_eval_args(js), capsys)  # the same command without --resume
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "--resume" in err and "eval.json.partial" in err, err
    assert not js.exists() and open(partial, "rb").read() == before
