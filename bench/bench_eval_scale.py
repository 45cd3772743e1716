"""`drp eval` at scale: one process with one thread against `torchrun` with N processes of one
thread each, on the same points, the same eps and the same suite (the target: two
processes on the 2-core CPU at least 1.7x faster than one, on 1000 points).

A script, not a pytest-benchmark file: each run is a separate `drp eval` process tree, timed
from the outside (wall clock, including start-up), with the 1-minute load average read before
and after it, so a run on a busy machine shows. Rounds alternate 1 process / N processes; the
speedup is best against best. The reports of the two runs must agree point for point (their
JSON, timings and world size aside): that is checked and recorded too.

Full measurement (an idle 2-core machine, about 15 minutes for PGD-AT at the standard suite):

    python bench/bench_eval_scale.py --out bench/results/cpu_eval_scale.json

A quick try (seconds; says nothing about speed):

    python bench/bench_eval_scale.py --limit 16 --suite quick --eps 0.05 --rounds 1 --out /tmp/s.json
"""
import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench import cpu_model  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = 1.7


def _git_commit():
    try:
        return subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _report(path):
    """A `drp eval` JSON without what may differ between the runs (timings, world size)."""
    with open(path) as f:
        doc = json.load(f)
    for key in ("timings", "eval_time_s", "world_size"):
        doc.pop(key, None)
    return doc


def _one_run(processes, eval_args, json_path, env):
    if processes == 1:
        cmd = [sys.executable, "-m", "drp_train", *eval_args, "--json", json_path]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               "-m", "drp_train", *eval_args, "--json", json_path]
    load_before = list(os.getloadavg())
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"bench_eval_scale: `{' '.join(cmd)}` failed ({res.returncode}):\n{res.stderr[-3000:]}")
    return {"processes": processes, "wall_s": wall, "load_before": load_before, "load_after": list(os.getloadavg()),
            "command": cmd[1:]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=os.path.join(REPO, "results", "fashion-mnist", "pgd-at"),
                   help="a `drp train` run or checkpoint (default: the committed PGD-AT model)")
    p.add_argument("--limit", type=int, default=1000, help="test points (default 1000)")
    p.add_argument("--eps", nargs="+", default=["0.1"], help="eps list (default 0.1)")
    p.add_argument("--suite", default="standard", help="attack suite (default standard)")
    p.add_argument("--norm", default="linf", choices=("linf", "l2"))
    p.add_argument("--processes", type=int, default=2, help="torchrun processes (default 2)")
    p.add_argument("--batch-size", type=int, default=None, help="drp eval --batch-size (default: the engine's)")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds of (1 process, N processes)")
    p.add_argument("--out", required=True, help="the JSON to write")
    args = p.parse_args(argv)
    if args.processes < 2 or args.rounds < 1 or args.limit < 1:
        p.error("--processes must be >= 2, --rounds and --limit >= 1")

    eval_args = ["eval", "--checkpoint", args.checkpoint, "--eps", *args.eps, "--suite", args.suite,
                 "--norm", args.norm, "--limit", str(args.limit), "--quiet"]
    if args.batch_size is not None:
        eval_args += ["--batch-size", str(args.batch_size)]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(REPO, "python"), REPO, env.get("PYTHONPATH", "")])
    if os.getloadavg()[0] > 0.5:
        print(f"bench_eval_scale: warning: 1-minute load average {os.getloadavg()[0]:.2f} before the first run; "
              "the machine is not idle, so the timings are not fair", file=sys.stderr)
    work = tempfile.mkdtemp(prefix="bench_eval_scale-")
    runs, reports = [], {}
    try:
        for r in range(args.rounds):
            for procs in (1, args.processes):
                path = os.path.join(work, f"eval-{procs}-{r}.json")
                run = _one_run(procs, eval_args, path, env)
                run["round"] = r
                runs.append(run)
                reports.setdefault(procs, _report(path))
                print(f"round {r}: {procs} process{'es' if procs > 1 else ''}: {run['wall_s']:.1f} s "
                      f"(load {run['load_before'][0]:.2f} -> {run['load_after'][0]:.2f})", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    best = {procs: min(x["wall_s"] for x in runs if x["processes"] == procs) for procs in (1, args.processes)}
    speedup = best[1] / best[args.processes]
    same = json.dumps(reports[1], sort_keys=True) == json.dumps(reports[args.processes], sort_keys=True)
    first = reports[1]
    out = {
        "bench": "eval_scale",
        "machine": {"cpu": cpu_model() or platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                    "commit": _git_commit()},
        "settings": {"checkpoint": os.path.relpath(os.path.abspath(args.checkpoint), REPO), "points": args.limit,
                     "eps": [float(e) if "/" not in e else e for e in args.eps], "suite": args.suite,
                     "norm": args.norm, "processes": args.processes, "threads_per_process": 1,
                     "batch_size": args.batch_size, "rounds": args.rounds},
        "runs": runs,
        "best_wall_s": {str(k): v for k, v in best.items()},
        "speedup": speedup,
        "target": TARGET,
        "met": speedup >= TARGET,
        "same_results": same,
        "robust_accuracy": [r["robust_accuracy"] for r in first.get("results", [])],
        "clean_accuracy": first.get("clean_accuracy"),
    }
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
        f.write("\n")
    print(f"speedup {speedup:.2f}x with {args.processes} processes (target {TARGET}x: "
          f"{'met' if out['met'] else 'missed'}); same results: {same}; wrote {args.out}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
