"""The `drp` command line: subcommands end to end and one-line errors (exit 2) on misuse."""
import json
import logging
import os
import random
import subprocess
import sys

import pytest
import torch

import drp_kernels
from drp_train.cli import main
from _helpers import make_idx_dataset


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    folder, _ = make_idx_dataset(str(tmp_path_factory.mktemp("fmnist-cli")), n_train=128, n_test=64, seed=2)
    return folder


def run_drp(*args, env=None):
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "drp_train", *args], capture_output=True, text=True,
                          env=full_env, timeout=300)


def assert_one_line_error(rc, err, *, code=2, match=None):
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == code, f"exit code {rc}, stderr:\n{err}"
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert "Traceback" not in err
    assert lines[0].startswith("drp"), lines[0]
    assert ": error: " in lines[0]
    if match is not None:
        assert match in lines[0], lines[0]


def call_main(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_help_lists_every_subcommand():
    res = run_drp("--help")
    assert res.returncode == 0 and res.stderr == ""
    for sub in ("prototypes", "train", "eval", "compare"):
        assert sub in res.stdout


def test_prototypes_subcommand_end_to_end(tmp_path):
    out = tmp_path / "p.pt"
    res = run_drp("prototypes", "--classes", "10", "--dim", "20", "--metric", "linf", "--method", "paper",
                  "--seed", "1", "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert "min_distance" in res.stdout and "10 x 20" in res.stdout
    P = drp_kernels.load_prototypes(str(out))
    assert P.shape == (10, 20) and P.dtype == torch.float32
    rep = drp_kernels.separation(P, metric="linf")
    assert f"{rep['min_distance']:.6g}" in res.stdout


@pytest.mark.slow
def test_train_subcommand_end_to_end(tiny_dir, tmp_path, capsys):
    protos = tmp_path / "p.npy"
    rc, out, err = call_main(capsys, "prototypes", "--classes", "10", "--dim", "12", "--metric", "cosine",
                             "--method", "default", "--out", str(protos))
    assert rc == 0, err
    run = tmp_path / "run"
    args = ["train", "--dataset", "fashion-mnist", "--data-dir", tiny_dir, "--method", "drp", "--metric", "cosine",
            "--prototypes", str(protos), "--epochs", "1", "--batch-size", "32", "--lr", "0.05",
            "--schedule", "cyclic", "--limit-train", "96", "--limit-test", "32", "--seed", "3",
            "--out", str(run), "--quiet"]
    rc, out, err = call_main(capsys, *args)
    assert rc == 0, err
    assert "test accuracy" in out and str(run / "final.pt") in out
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["epoch"] == 1
    cfg = json.loads((run / "config.json").read_text())
    assert (cfg["metric"], cfg["schedule"], cfg["seed"], cfg["batch_size"]) == ("cosine", "cyclic", 3, 32)
    # --resume with only --out takes every option from the checkpoint; the run is finished already
    rc, out, err = call_main(capsys, "train", "--out", str(run), "--resume", "--quiet")
    assert rc == 0, err
    # the same --out without --resume is refused and nothing is overwritten
    before = (run / "final.pt").read_bytes()
    rc, out, err = call_main(capsys, *args)
    assert_one_line_error(rc, err, match="already holds a run")
    assert (run / "final.pt").read_bytes() == before


@pytest.mark.parametrize("argv, match", [
    (["train", "--bogus"], "unrecognized arguments: --bogus"),
    (["train", "--eps", "-0.1"], "--eps must be >= 0"),
    (["train", "--epochs", "0"], "--epochs must be >= 1"),
    (["train", "--proto-dim", "0"], "--proto-dim must be >= 1"),
    (["train", "--method", "sgd"], "invalid choice"),
    (["train", "--epochs", "two"], "invalid int value"),
    (["train", "--amp", "bf16", "--device", "cpu"], "needs a CUDA device"),
    (["prototypes", "--dim", "4", "--out", "x.pt"], "required: --classes"),
    (["prototypes", "--classes", "1", "--dim", "4", "--out", "x.pt"], "--classes must be >= 2"),
    (["prototypes", "--classes", "3", "--dim", "4", "--out", "x.txt"], "must end in .pt or .npy"),
    ([], "choose a subcommand"),
])
def test_misuse_gives_one_line_and_exit_2(capsys, tmp_path, tiny_dir, argv, match):
    if argv and argv[0] == "train" and "--bogus" not in argv:
        argv = argv + ["--data-dir", tiny_dir, "--out", str(tmp_path / "o")]
    rc, out, err = call_main(capsys, *argv)
    assert_one_line_error(rc, err, match=match)
    assert not (tmp_path / "o" / "last.pt").exists()


def test_missing_dataset_and_unwritable_out(capsys, tmp_path, tiny_dir):
    missing = str(tmp_path / "no-data")
    rc, out, err = call_main(capsys, "train", "--data-dir", missing, "--out", str(tmp_path / "o"))
    assert_one_line_error(rc, err, match=missing)
    assert "apt-get install dataset-fashion-mnist" in err
    assert not (tmp_path / "o").exists()
    rc, out, err = call_main(capsys, "train", "--dataset", "cifar10", "--out", str(tmp_path / "o"),
                             "--data-dir", missing)
    assert_one_line_error(rc, err, match="cs.toronto.edu")
    blocker = tmp_path / "file"
    blocker.write_text("")
    rc, out, err = call_main(capsys, "train", "--data-dir", tiny_dir, "--out", str(blocker / "run"))
    assert_one_line_error(rc, err, match="cannot be created")


def test_misuse_in_a_real_process_has_no_traceback(tmp_path):
    res = run_drp("train", "--epochs", "0", "--out", str(tmp_path / "o"))
    assert_one_line_error(res.returncode, res.stderr, match="--epochs must be >= 1")
    res = run_drp("train", "--unknown-flag", "3")
    assert_one_line_error(res.returncode, res.stderr, match="--unknown-flag")


def test_eval_rejects_a_checkpoint_of_the_wrong_kind(capsys, tmp_path):
    pytest.importorskip("drp_train.evaluation")
    wrong = tmp_path / "model.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, wrong)
    rc, out, err = call_main(capsys, "eval", "--checkpoint", str(wrong), "--eps", "0.1",
                             "--json", str(tmp_path / "r.json"))
    assert not (tmp_path / "r.json").exists()
    assert_one_line_error(rc, err, match=str(wrong))


# ----------------------------------------------------------------------------- prototypes files and metrics
def test_prototypes_default_method_and_recorded_metadata(tmp_path, capsys):
    for metric, method in (("linf", "box"), ("cosine", "sphere")):
        out = tmp_path / f"{metric}.pt"
        rc, stdout, err = call_main(capsys, "prototypes", "--classes", "10", "--dim", "12", "--metric", metric,
                                    "--out", str(out), "--quiet")
        assert rc == 0, err
        P, info = drp_kernels.load_prototypes(str(out), with_info=True)
        assert info == {"metric": metric, "method": method}
        assert f"method {method}" in stdout
        # the library's best set for the metric: at its known optimum
        rep = drp_kernels.separation(P, metric=metric)
        assert rep["gap"] == pytest.approx(0.0, abs=1e-3)
    rc, stdout, err = call_main(capsys, "prototypes", "--classes", "10", "--dim", "8", "--method", "paper",
                                "--out", str(tmp_path / "paper.npy"), "--quiet")
    assert rc == 0, err
    assert drp_kernels.load_prototypes(str(tmp_path / "paper.npy"), with_info=True)[1]["method"] == "paper"


def test_prototypes_of_another_metric_are_refused_naming_both(tiny_dir, tmp_path, capsys):
    protos = tmp_path / "cos.pt"
    rc, _, err = call_main(capsys, "prototypes", "--classes", "10", "--dim", "12", "--metric", "cosine",
                           "--out", str(protos), "--quiet")
    assert rc == 0, err
    run = tmp_path / "run"
    rc, out, err = call_main(capsys, "train", "--data-dir", tiny_dir, "--prototypes", str(protos), "--epochs", "1",
                             "--limit-train", "64", "--limit-test", "32", "--out", str(run), "--quiet")
    assert_one_line_error(rc, err, match="cosine")
    assert "--metric is linf" in err
    assert not (run / "last.pt").exists() and not (run / "config.json").exists()


@pytest.mark.slow
def test_config_json_records_the_prototype_files_dimension(tiny_dir, tmp_path, capsys):
    protos = tmp_path / "p.pt"
    rc, _, err = call_main(capsys, "prototypes", "--classes", "10", "--dim", "12", "--out", str(protos), "--quiet")
    assert rc == 0, err
    run = tmp_path / "run"
    rc, out, err = call_main(capsys, "train", "--data-dir", tiny_dir, "--prototypes", str(protos), "--epochs", "1",
                             "--batch-size", "32", "--limit-train", "64", "--limit-test", "32", "--out", str(run),
                             "--quiet")
    assert rc == 0, err
    assert json.loads((run / "config.json").read_text())["proto_dim"] == 12
    assert "after 1 epoch," in out  # not "1 epochs"
    # resuming the finished run with the same options is accepted (the dimension came from the file)
    rc, out, err = call_main(capsys, "train", "--data-dir", tiny_dir, "--prototypes", str(protos), "--epochs", "1",
                             "--batch-size", "32", "--limit-train", "64", "--limit-test", "32", "--out", str(run),
                             "--quiet", "--resume")
    assert rc == 0, err
    # a --proto-dim that disagrees with the file is refused
    rc, out, err = call_main(capsys, "train", "--data-dir", tiny_dir, "--prototypes", str(protos), "--proto-dim", "7",
                             "--out", str(tmp_path / "run2"), "--quiet")
    assert_one_line_error(rc, err, match="--proto-dim 7 disagrees")


# ----------------------------------------------------------------------------- bad input
def test_eps_accepts_fractions():
    from drp_train.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["train", "--eps", "8/255"]).eps == pytest.approx(8 / 255)
    assert parser.parse_args(["train", "--eps", "0.1"]).eps == pytest.approx(0.1)
    args = parser.parse_args(["eval", "--checkpoint", "x", "--json", "r.json", "--eps", "2/255", "0.05", "8/255"])
    assert args.eps == pytest.approx([2 / 255, 0.05, 8 / 255])
    args = parser.parse_args(["compare", "--eps", "4/255", "--train-eps", "8/255"])
    assert (args.eps, args.train_eps) == (pytest.approx([4 / 255]), pytest.approx(8 / 255))


@pytest.mark.parametrize("argv, match", [
    (["train", "--eps", "8/0"], "fraction such as 8/255"),
    (["train", "--eps", "eight"], "fraction such as 8/255"),
    (["eval", "--checkpoint", "x", "--json", "r.json", "--eps", "1/"], "fraction such as 8/255"),
    (["prototypes", "--classes", "10", "--dim", "1", "--metric", "cosine", "--out", "P.pt"],
     "--dim 1 with --metric cosine"),
    (["prototypes", "--classes", "10", "--dim", "3", "--method", "sphere", "--out", "P.pt"], "--method sphere"),
    (["train", "--metric", "cosine", "--proto-dim", "1"], "--proto-dim 1 with --metric cosine"),
    (["train", "--proto-method", "sphere"], "--proto-method sphere"),
])
def test_bad_values_one_line_exit_2_nothing_written(capsys, tmp_path, tiny_dir, monkeypatch, argv, match):
    monkeypatch.chdir(tmp_path)
    if argv[0] == "train":
        argv = argv + ["--data-dir", tiny_dir, "--out", str(tmp_path / "o"), "--limit-train", "64"]
    rc, out, err = call_main(capsys, *argv)
    assert_one_line_error(rc, err, match=match)
    leftovers = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert not leftovers, leftovers


def test_output_under_a_file_is_one_clear_line(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc, out, err = call_main(capsys, "prototypes", "--classes", "3", "--dim", "4", "--out", str(blocker / "p.pt"))
    assert_one_line_error(rc, err, match="is a file")
    rc, out, err = call_main(capsys, "eval", "--checkpoint", str(tmp_path), "--eps", "0.1",
                             "--json", str(blocker / "x.json"))
    assert_one_line_error(rc, err, match="is a file")
    rc, out, err = call_main(capsys, "eval", "--checkpoint", str(tmp_path), "--eps", "0.1",
                             "--json", str(tmp_path / "r.json"), "--plot", str(tmp_path / "x.gif"))
    assert_one_line_error(rc, err, match="--plot")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_corrupt_checkpoint_is_called_corrupt_not_unsafe(capsys, tmp_path, tiny_dir):
    # seeded noise: about 1 in 200 random files makes torch.load fail to decode a string, and its
    # "can't decode" holds "code", which the check below rules out (a flake of an os.urandom file)
    noise = random.Random(0).randbytes(4096)
    for name, data in (("garbage.pt", b"\x80\x02garbage"), ("empty.pt", b""), ("noise.pt", noise)):
        path = tmp_path / name
        path.write_bytes(data)
        rc, out, err = call_main(capsys, "eval", "--checkpoint", str(path), "--eps", "0.1",
                                 "--json", str(tmp_path / "r.json"))
        assert_one_line_error(rc, err, match="corrupt or unreadable")
        assert "code" not in err and "refused" not in err
    # a run folder whose last.pt is truncated: resuming it says so too
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"a": torch.zeros(1000)}, run / "full.pt")
    (run / "last.pt").write_bytes((run / "full.pt").read_bytes()[:500])
    rc, out, err = call_main(capsys, "train", "--data-dir", tiny_dir, "--out", str(run), "--resume", "--quiet")
    assert_one_line_error(rc, err, match="corrupt or unreadable")
    assert not (tmp_path / "r.json").exists()


# ----------------------------------------------------------------------------- resume
def test_resume_without_a_run_exits_2_and_starts_nothing(capsys, tmp_path, tiny_dir):
    empty = tmp_path / "empty"
    rc, out, err = call_main(capsys, "train", "--data-dir", tiny_dir, "--out", str(empty), "--resume")
    assert_one_line_error(rc, err, match="no run to continue")
    assert not empty.exists()
    empty.mkdir()
    rc, out, err = call_main(capsys, "train", "--data-dir", tiny_dir, "--out", str(empty), "--resume", "--epochs", "1")
    assert_one_line_error(rc, err, match=str(empty))
    assert list(empty.iterdir()) == []


# ----------------------------------------------------------------------------- logs and help
@pytest.mark.slow
def test_redirected_logs_are_plain_lines_named_by_method(tiny_dir, tmp_path):
    res = run_drp("train", "--data-dir", tiny_dir, "--method", "ce", "--epochs", "2", "--batch-size", "32",
                  "--limit-train", "64", "--limit-test", "32", "--out", str(tmp_path / "run"))
    assert res.returncode == 0, res.stderr
    assert "\r" not in res.stderr and "\x1b" not in res.stderr, res.stderr[:500]
    lines = res.stderr.splitlines()
    epochs = [line for line in lines if line.startswith("ce: epoch ")]
    assert len(epochs) == 2, res.stderr
    assert not [line for line in lines if line.startswith("drp:")], res.stderr
    assert "after 2 epochs," in res.stdout


def test_eval_and_compare_have_help_descriptions():
    for sub, words in (("eval", "Evaluate a checkpoint"), ("compare", "--preset demo")):
        res = run_drp(sub, "--help")
        assert res.returncode == 0
        assert words in " ".join(res.stdout.split()), res.stdout


def test_train_help_derives_defaults_from_trainconfig():
    from drp_train.config import TrainConfig, default_lr

    res = run_drp("train", "--help")
    text = " ".join(res.stdout.split())
    d = TrainConfig()
    assert f"(default {d.epochs})" in text and f"(default {d.resolved().batch_size}; 512 for certified)" in text
    assert f"{default_lr(dataset='fashion-mnist', method='drp'):g} for drp" in text
    assert f"{default_lr(dataset='fashion-mnist', method='drp', proto_method='paper'):g} for drp with paper" in text


# ----------------------------------------------------------------------------- file permissions
@pytest.mark.slow
def test_files_respect_the_umask(tiny_dir, tmp_path, capsys):
    import stat

    old = os.umask(0o022)
    try:
        rc, _, err = call_main(capsys, "prototypes", "--classes", "10", "--dim", "8", "--out",
                               str(tmp_path / "p.npy"), "--quiet")
        assert rc == 0, err
        run = tmp_path / "run"
        rc, _, err = call_main(capsys, "train", "--data-dir", tiny_dir, "--epochs", "1", "--batch-size", "32",
                               "--limit-train", "64", "--limit-test", "32", "--out", str(run), "--quiet")
        assert rc == 0, err
    finally:
        os.umask(old)
    files = [tmp_path / "p.npy", tmp_path / "p.npy.json"] + sorted(run.iterdir())
    assert {p.name for p in run.iterdir()} == {"config.json", "metrics.jsonl", "last.pt", "final.pt"}
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p


def test_warnings_are_one_line_without_paths_and_flags_are_not_repeated(capsys, monkeypatch):
    import warnings

    from drp_kernels.attacks import RobustnessWarning
    from drp_train import cli

    def run(args):
        warnings.warn("zero gradients on 3 points", RobustnessWarning, stacklevel=1)  # also in the result table
        warnings.warn("something\nelse", UserWarning, stacklevel=1)
        return 0
    monkeypatch.setattr(cli, "_run_prototypes", run)
    rc, out, err = call_main(capsys, "prototypes", "--classes", "3", "--dim", "4", "--out", "unused.pt")
    assert rc == 0
    assert err.splitlines() == ["drp: warning: something else"], err


def test_main_hands_the_library_logger_back(capsys):
    attacks_log = logging.getLogger("drp_kernels.attacks")
    before = (list(attacks_log.handlers), attacks_log.level, attacks_log.propagate)
    assert main(["prototypes", "--classes", "3", "--dim", "4", "--out", "/nonexistent-dir/p.pt"]) == 2
    assert (list(attacks_log.handlers), attacks_log.level, attacks_log.propagate) == before
