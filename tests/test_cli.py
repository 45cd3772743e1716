"""The `drp` command line: subcommands end to end and one-line errors (exit 2) on misuse."""
import json
import os
import subprocess
import sys

import pytest
import torch

import drp_kernels
from drp_train.cli import main
from test_data import make_idx_dataset


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
