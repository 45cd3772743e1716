"""`drp eval` and `drp compare` end to end on tiny Fashion-MNIST runs, and `drp eval` misuse."""
import glob
import json
import os
import random
import subprocess
import sys
import warnings

import pytest
import torch

import drp_kernels
from drp_train import CheckpointError, cli
from drp_train.checkpoint import load_checkpoint, load_classifier
from drp_train.config import TrainConfig
from drp_train.data import load_dataset
from drp_train.train import train

from _helpers import assert_png

FMNIST = "/usr/share/datasets/fashion-mnist"
pytestmark = pytest.mark.skipif(not os.path.isdir(FMNIST), reason="needs the dataset-fashion-mnist package")

RESULT_KEYS = {"eps", "robust_accuracy", "robust", "n", "per_attack", "per_attack_counts", "flags"}


def run_cli(argv, capsys):
    """drp_train.cli.main in-process: (exit code, stdout, stderr)."""
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse exits this way
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def clean_accuracy(model, n):
    x, y = load_dataset("fashion-mnist", split="test", limit=n)
    with torch.no_grad():
        pred = model(x.float() / 255).argmax(dim=1)
    return (pred == y).float().mean().item()


@pytest.fixture(scope="module")
def drp_run(tmp_path_factory):
    """A 2-epoch DRP-cosine CNN on 512 training points (seconds on the CPU; about 60% clean)."""
    out = tmp_path_factory.mktemp("drp_run")
    cfg = TrainConfig(dataset="fashion-mnist", method="drp", metric="cosine", proto_dim=16, model="cnn", epochs=2,
                      batch_size=32, limit_train=512, limit_test=64, seed=0, out=str(out), quiet=True)
    info = train(cfg, progress=False)
    return out, info


def check_eval_schema(doc, eps, n):
    assert isinstance(doc["clean_accuracy"], float) and 0 <= doc["clean_accuracy"] <= 1
    assert [r["eps"] for r in doc["results"]] == eps
    for r in doc["results"]:
        assert set(r) == RESULT_KEYS
        assert isinstance(r["eps"], float) and isinstance(r["robust_accuracy"], float)
        assert isinstance(r["per_attack"], dict) and r["per_attack"]
        # every accuracy is its count over n, in float64 (no float32 artefacts)
        assert r["n"] == n and r["robust_accuracy"] == r["robust"] / n
        assert r["per_attack"] == {k: c / n for k, c in r["per_attack_counts"].items()}
        assert isinstance(r["flags"], list) and all(isinstance(f, str) for f in r["flags"])
        # robust = survived every attack, so it is at most each attack's count and the clean one
        assert r["robust"] <= doc["clean"]
        for name, count in r["per_attack_counts"].items():
            assert 0 <= count <= n, name
            assert r["robust"] <= count, name
    assert doc["n"] == n and doc["clean_accuracy"] == doc["clean"] / n


@pytest.mark.slow
def test_eval_end_to_end_json_and_png(drp_run, tmp_path, capsys):
    out, info = drp_run
    js, png = tmp_path / "eval.json", tmp_path / "eval.png"
    code, stdout, err = run_cli(["eval", "--checkpoint", str(out), "--eps", "0", "0.05", "0.5", "--suite", "quick",
                                 "--limit", "40", "--json", str(js), "--plot", str(png), "--quiet"], capsys)
    assert code == 0, err
    doc = json.loads(js.read_text())
    check_eval_schema(doc, [0.0, 0.05, 0.5], 40)
    assert doc["norm"] == "linf" and doc["world_size"] == 1
    assert doc["points"] == {"suite": {"first": 0, "count": 40}}
    # the clean accuracy is the checkpoint's own accuracy on the first 40 test points
    model = load_classifier(info["checkpoint"])
    assert isinstance(model, drp_kernels.ProtoClassifier)
    assert doc["clean_accuracy"] == pytest.approx(clean_accuracy(model, 40), abs=1e-6)
    assert doc["clean_accuracy"] > 0.3  # it learned something, so the checks below mean something
    # at eps 0 nothing can move: robust accuracy is the clean accuracy
    assert doc["results"][0]["robust"] == doc["clean"]
    # eps 0.5 on [0, 1] images leaves an undefended model at chance or below
    assert doc["results"][2]["robust_accuracy"] <= 0.25
    # no absolute path of this machine: relative to the working directory, else <run folder>/<file>
    ckpt = info["checkpoint"]
    assert not os.path.isabs(doc["checkpoint"])
    assert doc["checkpoint"] in (os.path.relpath(ckpt), os.path.join(os.path.basename(os.path.dirname(ckpt)),
                                                                      os.path.basename(ckpt)))
    assert doc["dataset"] == "fashion-mnist" and doc["method"] == "drp" and doc["suite"] == "quick"
    assert_png(str(png))
    assert "clean accuracy" in stdout and "0.05" in stdout
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]


def test_eval_resolves_a_run_folder_or_a_file(drp_run):
    from drp_train.eval_cli import resolve_checkpoint

    out, info = drp_run
    assert os.path.samefile(resolve_checkpoint(str(out)), info["checkpoint"])
    assert resolve_checkpoint(info["checkpoint"]) == info["checkpoint"]


def _misuse_cases(run_dir, tmp):
    protos = tmp / "protos.pt"
    drp_kernels.save_prototypes(torch.randn(10, 8), str(protos))
    junk = tmp / "junk.pt"
    junk.write_bytes(random.Random(2).randbytes(256))  # the weights-only reader fails with IndexError
    empty = tmp / "empty_dir"
    empty.mkdir()
    base = ["--suite", "quick", "--json", str(tmp / "out.json"), "--quiet"]
    ok = ["--checkpoint", str(run_dir)]
    return {
        "negative eps": ok + ["--eps", "-0.1", "--limit", "4"] + base,
        "negative limit": ok + ["--eps", "0.1", "--limit", "-1"] + base,
        "missing checkpoint": ["--checkpoint", str(tmp / "nope"), "--eps", "0.1", "--limit", "4"] + base,
        "prototypes file": ["--checkpoint", str(protos), "--eps", "0.1", "--limit", "4"] + base,
        "random bytes": ["--checkpoint", str(junk), "--eps", "0.1", "--limit", "4"] + base,
        "folder without checkpoint": ["--checkpoint", str(empty), "--eps", "0.1", "--limit", "4"] + base,
        "json in missing folder": ok + ["--eps", "0.1", "--limit", "4", "--suite", "quick", "--quiet",
                                        "--json", str(tmp / "no" / "out.json")],
    }


@pytest.mark.parametrize("case", ["negative eps", "negative limit", "missing checkpoint", "prototypes file",
                                  "random bytes", "folder without checkpoint", "json in missing folder"])
def test_eval_misuse_is_one_line_exit_2(drp_run, tmp_path, capsys, case):
    run_dir, _ = drp_run
    argv = ["eval"] + _misuse_cases(run_dir, tmp_path)[case]
    code, out, err = run_cli(argv, capsys)
    assert code == 2, (case, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, (case, err)
    assert lines[0].startswith("drp: error:"), (case, err)
    assert "Traceback" not in err
    assert not (tmp_path / "out.json").exists()


@pytest.mark.parametrize("seed", [0, 2, 20, 195])  # UnpicklingError, IndexError, KeyError, UnicodeDecodeError
def test_random_bytes_are_a_corrupt_checkpoint(tmp_path, seed):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(random.Random(seed).randbytes(256))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(CheckpointError, match="corrupt or unreadable"):
            load_checkpoint(str(junk))


def test_eval_wrong_kind_checkpoint_in_a_real_process(tmp_path):
    protos = tmp_path / "protos.pt"
    drp_kernels.save_prototypes(torch.randn(10, 8), str(protos))
    js = tmp_path / "out.json"
    p = subprocess.run([sys.executable, "-m", "drp_train", "eval", "--checkpoint", str(protos), "--eps", "0.1",
                        "--limit", "4", "--json", str(js)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr, p.stderr
    assert "protos.pt" in p.stderr
    assert not js.exists()


@pytest.mark.slow
def test_compare_end_to_end(tmp_path, capsys):
    out = tmp_path / "cmp"
    methods = ["ce", "drp-linf", "drp-cosine", "pgd-at"]
    argv = ["compare", "--preset", "demo", "--out", str(out), "--limit-train", "256", "--limit-test", "64",
            "--eval-limit", "24", "--epochs", "1", "--batch-size", "64", "--attack-steps", "2", "--suite", "quick",
            "--eps", "0.1", "0.5", "--methods", *methods, "--quiet"]
    code, stdout, err = run_cli(argv, capsys)
    assert code == 0, err
    # the printed table: a header with each eps and one row per method
    head = next(line for line in stdout.splitlines() if line.startswith("method"))
    assert "clean" in head and "eps=0.1" in head and "eps=0.5" in head and "train time" in head
    for m in methods:
        assert any(line.split()[:1] == [m] for line in stdout.splitlines()), (m, stdout)
    # the DRP models also get a line under the paper's own attack
    paper_lines = [line.split()[0] for line in stdout.splitlines() if "paper's attack" in line]
    assert paper_lines == ["drp-linf", "drp-cosine"], stdout

    doc = json.loads((out / "compare.json").read_text())
    assert list(doc["models"]) == methods
    assert doc["settings"]["eps"] == [0.1, 0.5] and doc["settings"]["epochs"] == 1
    assert doc["command"].startswith("drp compare --preset demo")
    for m in methods:
        entry = doc["models"][m]
        # no absolute paths of this machine: run folders and checkpoints are relative to --out
        assert not os.path.isabs(entry["checkpoint"]) and not os.path.isabs(entry["run_dir"])
        entry["checkpoint"] = str(out / entry["checkpoint"])
        check_eval_schema(dict(entry["eval"], n=entry["eval"]["n"]), [0.1, 0.5], 24)
        if m.startswith("drp"):
            paper = entry["paper_eval"]
            assert [r["eps"] for r in paper["results"]] == [0.1, 0.5]
            assert paper["clean_accuracy"] == pytest.approx(entry["eval"]["clean_accuracy"], abs=1e-6)
        else:
            assert entry["paper_eval"] is None
        assert entry["train_time_s"] > 0
        assert len(entry["metrics"]) == 1 and entry["metrics"][0]["epoch"] in (0, 1)
        # every method trained the same budget, and the checkpoint is the one evaluated
        cfg = load_checkpoint(entry["checkpoint"])["config"]
        assert (cfg["epochs"], cfg["batch_size"], cfg["seed"], cfg["limit_train"], cfg["model"]) == (
            1, 64, 0, 256, "cnn")
        model = load_classifier(entry["checkpoint"])
        assert entry["eval"]["clean_accuracy"] == pytest.approx(clean_accuracy(model, 24), abs=1e-6)
    assert load_checkpoint(doc["models"]["drp-cosine"]["checkpoint"])["config"]["metric"] == "cosine"
    assert load_checkpoint(doc["models"]["pgd-at"]["checkpoint"])["config"]["method"] == "pgd-at"

    report = (out / "report.md").read_text()
    assert doc["command"] in report
    for m in methods:
        assert f"| {m} |" in report
    assert "## Flags" in report and "## Settings" in report
    for name in ["accuracy_vs_eps.png", "training_curves.png", "projection_drp-linf.png",
                 "projection_drp-cosine.png", "projection_ce.png"]:
        assert_png(str(out / name))
    assert not [f for f in os.listdir(out) if f.startswith(".tmp-")]


@pytest.mark.parametrize("extra, needle", [
    (["--methods", "ce", "svm"], "--methods"),
    (["--eps", "-0.2"], "--eps"),
    (["--epochs", "0"], "--epochs"),
    (["--eval-limit", "0"], "--eval-limit"),
    (["--seed", "-1"], "--seed"),
])
def test_compare_misuse_is_one_line_exit_2(tmp_path, capsys, extra, needle):
    out = tmp_path / "cmp"
    code, _, err = run_cli(["compare", "--preset", "demo", "--out", str(out), "--quiet"] + extra, capsys)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and needle in err and "Traceback" not in err, err
    assert not out.exists() or not os.listdir(out)


def test_compare_refuses_an_used_out_before_training(tmp_path, capsys):
    out = tmp_path / "cmp"
    (out / "drp-linf").mkdir(parents=True)
    (out / "drp-linf" / "final.pt").write_bytes(b"")
    code, _, err = run_cli(["compare", "--preset", "demo", "--out", str(out), "--quiet"], capsys)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "--resume" in err and "drp-linf" in err, err
    assert sorted(p.name for p in out.iterdir()) == ["drp-linf"]
    assert not (out / "ce").exists()


def test_compare_resume_continues_existing_runs_and_starts_the_others(tmp_path):
    from drp_train import compare

    out = tmp_path / "cmp"
    (out / "ce").mkdir(parents=True)
    (out / "ce" / "last.pt").write_bytes(b"")
    settings = dict(compare.PRESETS["demo"], data_dir=None, weight_decay=None, seed=0, out=str(out), quiet=True,
                    resume=True)
    assert compare._train_config(settings, "ce", None).resume is True
    assert compare._train_config(settings, "pgd-at", None).resume is False
    settings["resume"] = False
    assert compare._train_config(settings, "ce", None).resume is False


COMMITTED_CERTIFIED = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                   "results", "fashion-mnist", "certified")


def test_demo_preset_trains_a_small_certified_net_with_its_own_settings(tmp_path):
    from drp_train import compare

    demo = compare.PRESETS["demo"]
    assert demo["methods"] == ["ce", "drp-linf", "pgd-at", "certified"]
    settings = dict(demo, data_dir=None, weight_decay=None, seed=0, out=str(tmp_path), quiet=True, resume=False)
    cert = compare._train_config(settings, "certified", None).resolved()
    ce = compare._train_config(settings, "ce", None).resolved()
    assert (cert.method, cert.model, cert.depth, cert.width, cert.width_first) == ("certified", "linf-dist", 3, 128,
                                                                                   256)
    assert (cert.epochs, cert.batch_size) == (5, 512) and (ce.epochs, ce.batch_size, ce.model) == (2, 128, "cnn")
    assert compare._train_config(settings, "pgd-at", None).resolved().epochs == 1
    assert cert.limit_train == ce.limit_train == 20000
    # an explicit flag applies to every method, the certified one included
    args = cli.build_parser().parse_args(["compare", "--preset", "demo", "--epochs", "1", "--batch-size", "64"])
    s = compare.resolve_settings(args)
    s.update(quiet=True, resume=False)
    cert = compare._train_config(s, "certified", None).resolved()
    assert (cert.epochs, cert.batch_size, cert.depth) == (1, 64, 3)
    args = cli.build_parser().parse_args(["compare", "--preset", "demo", "--epochs", "3"])
    s = compare.resolve_settings(args)
    s.update(quiet=True, resume=False)
    assert compare._train_config(s, "pgd-at", None).resolved().epochs == 3
    assert compare.PRESETS["demo"]["method_settings"]["certified"]["epochs"] == 5  # the preset is untouched


@pytest.mark.slow
@pytest.mark.skipif(not glob.glob(os.path.join(COMMITTED_CERTIFIED, "eval*.json")),
                    reason="needs the committed certified model and its report")
def test_compare_certified_row_and_recertify_line(tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "--preset", "demo", "--out", str(out), "--limit-train", "512", "--limit-test", "64",
            "--eval-limit", "24", "--epochs", "1", "--suite", "quick", "--eps", "0.1", "--methods", "ce",
            "certified", "--recertify", COMMITTED_CERTIFIED, "--quiet"]
    code, stdout, err = run_cli(argv, capsys)
    assert code == 0, err
    lines = stdout.splitlines()
    cert_rows = [line.split() for line in lines if line.startswith("certified")]
    assert [r[1] for r in cert_rows] == ["quick", "certified"], stdout
    doc = json.loads((out / "compare.json").read_text())
    entry = doc["models"]["certified"]
    res = entry["eval"]["results"][0]
    assert entry["eval"]["n"] == 24 and res["n"] == 24  # --eval-limit, though 1000 points were loaded to re-certify
    assert 0 <= res["certified_accuracy"] <= res["robust_accuracy"] <= entry["eval"]["clean_accuracy"]
    assert cert_rows[1][3] == f"{100 * res['certified_accuracy']:.1f}%"
    assert entry["training"]["network"] == "linf-dist 3 x 128, first layer 256"
    cfg = load_checkpoint(str(out / entry["checkpoint"]))["config"]
    assert (cfg["model"], cfg["depth"], cfg["width"], cfg["limit_train"]) == ("linf-dist", 3, 128, 512)
    # the committed model re-certifies to what its eval.json recorded on the first 1000 points
    rec = doc["recertified"]
    assert rec["n"] == 1000 and rec["checkpoint"] == COMMITTED_CERTIFIED
    (r,) = rec["results"]
    assert r["committed"] is not None and r["certified"] == r["committed"], rec
    assert rec["report"] in ("eval.json", "eval-quick.json")
    assert f"{r['certified']}/1000 at eps 0.1 (its {rec['report']}: {r['committed']})" in stdout
    assert "re-certified" in (out / "report.md").read_text()


@pytest.mark.parametrize("target, needle", [("missing", "--recertify"), ("ce", "expected a certified checkpoint")])
def test_compare_recertify_misuse_is_one_line_before_training(tmp_path, capsys, target, needle):
    out = tmp_path / "cmp"
    path = str(tmp_path / "nowhere.pt")
    if target == "ce":
        cfg = TrainConfig(method="ce", epochs=1, limit_train=64, limit_test=16, batch_size=32,
                          out=str(tmp_path / "ce"), quiet=True)
        path = train(cfg, progress=False)["checkpoint"]
    code, _, err = run_cli(["compare", "--preset", "demo", "--out", str(out), "--quiet", "--recertify", path], capsys)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and needle in err and "--recertify" in err, err
    assert not out.exists()
