"""Re-run the committed Fashion-MNIST evaluations with today's engine and compare them with the
committed figures, side by side with a reseed (the per-point keyed draws must keep the
suite's strength; each robust accuracy should stay within the noise of a reseed).

For each committed report (results/fashion-mnist/*/eval*.json) it runs the same `drp eval`
command (checkpoint, eps, suites, decision rule, points, seed) with each --seeds value, writing
the new reports under --out (results/ is never touched), then writes --out/compare.md: per
model, suite and eps, the committed robust accuracy, the new one for every seed, and the
committed figure's 95% Wilson interval. Copy a new report over the committed one yourself once
the table says it is sound.

    python bench/rerun_evaluations.py --out runs/rerun --processes 2 --seeds 0 1

About 2 hours on the idle 2-core machine with 2 processes per seed (the committed single-process
runs took 3137 s CE, 1172 s PGD-AT, 2033 s certified, 601 s x 2 DRP). --models picks a subset,
--dry-run prints the commands only.
"""
import argparse
import glob
import json
import math
import os
import shlex
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "results", "fashion-mnist")


def _wilson(p, n, z=1.959963984540054):
    if not n:
        return float("nan"), float("nan")
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def _curves(doc):
    """{suite: [(eps, robust accuracy, certified accuracy or None)]} of a `drp eval` report."""
    if "suites" in doc:
        per = doc["suites"]
    else:
        per = {doc.get("suite") or "standard": doc}
    return {s: [(r["eps"], r["robust_accuracy"], r.get("certified_accuracy")) for r in v["results"]]
            for s, v in per.items()}


def _command(report_path, doc, out_json, seed, processes, limit=None):
    run_dir = os.path.dirname(report_path)
    suites = doc["suite"] if isinstance(doc["suite"], list) else [doc["suite"]]
    results = doc.get("results") or next(iter(doc["suites"].values()))["results"]
    eps = [repr(float(r["eps"])) for r in results]
    argv = ["eval", "--checkpoint", os.path.relpath(run_dir, REPO), "--eps", *eps, "--suite", *suites,
            "--limit", str(limit or doc.get("n", 1000)), "--seed", str(seed), "--json", out_json, "--quiet",
            "--plot", out_json[:-5] + ".png"]
    if doc.get("norm", "linf") != "linf":
        argv += ["--norm", doc["norm"]]
    if doc.get("decision") not in (None, "nearest"):
        argv += ["--decision", doc["decision"]]
    if glob.glob(glob.escape(out_json) + ".partial*"):  # an interrupted run of this script: continue it
        argv.append("--resume")
    if processes > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
                "-m", "drp_train", *argv]
    return [sys.executable, "-m", "drp_train", *argv]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for the new reports and compare.md")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="attack seeds to run (default 0 1)")
    p.add_argument("--processes", type=int, default=2, help="torchrun processes per evaluation (default 2)")
    p.add_argument("--models", nargs="+", default=None, help="subset of results/fashion-mnist/* (default all)")
    p.add_argument("--limit", type=int, default=None,
                   help="points per evaluation (default: the committed report's; fewer only to try the script)")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(REPO, "python"), REPO, env.get("PYTHONPATH", "")])
    reports = sorted(glob.glob(os.path.join(RESULTS, "*", "eval*.json")))
    if args.models:
        reports = [r for r in reports if os.path.basename(os.path.dirname(r)) in args.models]
    rows = []
    for path in reports:
        with open(path) as f:
            doc = json.load(f)
        model = os.path.basename(os.path.dirname(path))
        name = model + ("" if os.path.basename(path) == "eval.json" else f" ({os.path.basename(path)[5:-5]})")
        new = {}
        for seed in args.seeds:
            n = args.limit or doc.get("n", 1000)  # in the name: a trial with fewer points is never reused as a full run
            out_json = os.path.join(os.path.abspath(args.out),
                                    f"{model}-{os.path.basename(path)[:-5]}-n{n}-seed{seed}.json")
            cmd = _command(path, doc, out_json, seed, args.processes, args.limit)
            print("$ " + shlex.join(cmd), flush=True)
            if args.dry_run:
                continue
            if not os.path.exists(out_json):
                subprocess.run(cmd, check=True, cwd=REPO, env=env)
            with open(out_json) as f:
                new[seed] = _curves(json.load(f))
        if args.dry_run:
            continue
        n = doc.get("n", 1000)  # the committed figure's interval
        for suite, points in _curves(doc).items():
            for i, (eps, acc, cert) in enumerate(points):
                lo, hi = _wilson(acc, n)
                cells = [f"{100 * new[s][suite][i][1]:.1f}%" for s in args.seeds]
                certs = [new[s][suite][i][2] for s in args.seeds]
                extra = "" if cert is None else f" (certified {100 * cert:.1f}% -> {100 * certs[0]:.1f}%)"
                rows.append(f"| {name} | {suite} | {eps:g} | {100 * acc:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] | "
                            + " | ".join(cells) + f" |{extra}")
    if args.dry_run:
        return 0
    head = ("| model | suite | eps | committed [95% Wilson] | "
            + " | ".join(f"new, seed {s}" for s in args.seeds) + " |\n|" + "---|" * (4 + len(args.seeds)))
    text = head + "\n" + "\n".join(rows) + "\n"
    with open(os.path.join(args.out, "compare.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
