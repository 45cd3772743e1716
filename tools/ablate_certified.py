"""Short certified-training ablations on Fashion-MNIST (results/fashion-mnist/certified/README.md).

Each variant is `drp train --method certified` with the same data, epochs and seed, a fixed held-out
validation split, one thread per run (two runs side by side, one per core, so they see the same
machine). After training, each run is certified at --eps on the validation split and on the first
--test-points test images. Writes <out>/ablation.json and prints a Markdown table.

    python tools/ablate_certified.py --out runs/ablation --epochs 5 --parallel 2
"""
import argparse
import json
import os
import subprocess
import sys
import time

VARIANTS = {
    "baseline (5x512, eps_train 0.225, CE 0.05)": [],
    "first layer 1024 (identity init)": ["--width-first", "1024"],
    "CE decaying 0.05 -> 0.0002": ["--cert-ce-final", "0.0002"],
    "eps_train 0.3": ["--eps-train", "0.3"],
    "random crop (padding 1)": ["--crop-padding", "1"],
    "width 768": ["--width", "768"],
    # the defaults since the first-layer ablation (first layer 2 x width), and input subsets on top
    "defaults of now (first layer 1024)": [],
    "first layer 1024 + input subsets q 0.75": ["--input-subset", "0.75"],
}


def _train_cmd(name, args, out, epochs, val_split):
    return [sys.executable, "-m", "drp_train", "train", "--method", "certified", "--epochs", str(epochs),
            "--val-split", str(val_split), "--out", out, "--quiet", "--checkpoint-every", "50", *args]


def _certify(run, eps, test_points, val_split):
    import torch

    import drp_kernels
    from drp_train.checkpoint import load_classifier
    from drp_train.data import load_dataset, validation_split

    torch.set_num_threads(1)
    net = load_classifier(run)
    net.eval()
    xt, yt = load_dataset("fashion-mnist", split="train")
    _, held = validation_split(xt.shape[0], val_split)
    xs, ys = load_dataset("fashion-mnist", split="test", limit=test_points)
    res = {}
    for name, x, y in (("val", xt[held], yt[held]), ("test", xs, ys)):
        x = x.float().div(255.0)
        with torch.no_grad():
            clean = (net(x).argmax(1) == y).double().mean().item()
        cert = drp_kernels.certify(net, x, y, eps).double().mean().item()
        res[name] = {"clean": clean, "certified": cert, "n": int(y.numel())}
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/ablation")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--val-split", type=int, default=5000)
    ap.add_argument("--test-points", type=int, default=1000)
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--only", nargs="*", default=None, help="variant names to run (default: all)")
    ap.add_argument("--extra", action="append", default=[], metavar="NAME=ARGS",
                    help="another variant, e.g. 'combined=--width-first 1024 --crop-padding 1'")
    args = ap.parse_args()
    variants = dict(VARIANTS)
    for spec in args.extra:
        name, _, flags = spec.partition("=")
        variants[name] = flags.split()
    names = [n for n in variants if args.only is None or n in args.only]
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "ablation.json")
    done = json.load(open(path)) if os.path.exists(path) else {}
    env = dict(os.environ, OMP_NUM_THREADS="1")
    queue = [n for n in names if n not in done]
    running = []
    core = 0
    while queue or running:
        while queue and len(running) < args.parallel:
            name = queue.pop(0)
            run = os.path.join(args.out, "run-" + "".join(c if c.isalnum() else "-" for c in name)[:40])
            cmd = ["taskset", "-c", str(core % os.cpu_count())] + _train_cmd(name, variants[name], run,
                                                                            args.epochs, args.val_split)
            if os.path.isfile(os.path.join(run, "final.pt")):
                cmd = ["true"]  # trained already: certify it
            else:
                if os.path.isfile(os.path.join(run, "last.pt")):
                    cmd.append("--resume")  # an interrupted run continues where it stopped
                core += 1
            print("start:", " ".join(cmd), flush=True)
            running.append((name, run, subprocess.Popen(cmd, env=env), time.time()))
        time.sleep(5)
        for item in list(running):
            name, run, proc, t0 = item
            if proc.poll() is None:
                continue
            running.remove(item)
            if proc.returncode != 0:
                print(f"FAILED: {name} (exit {proc.returncode})", flush=True)
                continue
            metrics = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
            res = _certify(run, args.eps, args.test_points, args.val_split)
            done[name] = {"flags": variants[name], "run": run, "train_time_s": metrics[-1]["train_time_s"],
                          "epochs": args.epochs, "val": res["val"], "test": res["test"],
                          "val_certified_last_epoch": metrics[-1].get("val_certified_accuracy")}
            with open(path, "w") as f:
                json.dump(done, f, indent=1)
            print(f"done: {name}: {done[name]}", flush=True)
    print("| variant | val clean | val certified | test clean | test certified | train time |")
    print("|---|---|---|---|---|---|")
    for name in names:
        if name in done:
            r = done[name]
            print(f"| {name} | {100 * r['val']['clean']:.1f}% | {100 * r['val']['certified']:.1f}% | "
                  f"{100 * r['test']['clean']:.1f}% | {100 * r['test']['certified']:.1f}% | "
                  f"{r['train_time_s'] / 60:.1f} min |")


if __name__ == "__main__":
    main()
