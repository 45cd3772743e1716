"""Real Triton -> PTX -> cubin compilation of every Triton kernel in drp_kernels, for sm_80 and sm_90.

The rest of the suite runs the kernels under ``TRITON_INTERPRET=1``, which accepts code that the
real compiler rejects and knows nothing of shared-memory or register limits. These tests run
``tools/triton_aot.py`` in a subprocess without ``TRITON_INTERPRET``: it drives the real launchers
on fake CUDA tensors, records each launch (block sizes, heuristics, num_warps, num_stages, dot
precision, argument specialisations) and compiles it with ``triton.compile`` for a ``GPUTarget``,
which needs no GPU or driver. A configuration passes when it yields a cubin whose shared memory and
registers fit what Triton's loader checks at launch on that architecture.

Each test uses a fresh Triton cache, so nothing is reused from an earlier run. The default test
(one per architecture) compiles every kernel for every metric / kind / constexpr branch and
fp32, fp16 and bf16 inputs on one odd shape; ``DRP_AOT_FULL=1`` also runs the full matrix
(aligned shapes, every flag, every fp32 dot precision, mixed-dtype inputs) and every
``DRP_AUTOTUNE=1`` config (tens of minutes on 2 cores).
"""
import json
import os
import subprocess
import sys
from collections import defaultdict

import pytest

from _helpers import REPO

HELPER = REPO / "tools" / "triton_aot.py"
ARCHS = (80, 90)
FULL = os.environ.get("DRP_AOT_FULL", "0").strip().lower() in ("1", "true", "yes", "on")
full_only = pytest.mark.skipif(not FULL, reason="set DRP_AOT_FULL=1 for the full compile matrix (minutes)")


def _run_aot(tmp_path, *args, archs=ARCHS, timeout=1800):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, set to silence its warning
    cmd = [sys.executable, str(HELPER), *args]
    for arch in archs:
        cmd += ["--arch", str(arch)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=REPO)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    head = lines[0] if lines else {}
    if "capture_error" in head or proc.returncode not in (0, 1):
        raise AssertionError(f"triton_aot.py failed before compiling (rc={proc.returncode}):\n"
                             f"{head.get('capture_error', '')}\n{proc.stderr[-4000:]}")
    results = [r for r in lines if "ok" in r]
    return proc.returncode, head, results, lines[-1]


def _failure_report(results):
    bad = [r for r in results if not r["ok"]]
    return "\n".join(f"sm_{r['arch']} {r['kernel']} {r['config']} [{r['scenario']}]:\n    {r['error']}"
                     for r in bad)


def _check_all_compiled(rc, head, results, summary, archs=ARCHS):
    assert results, "no kernel configuration was captured"
    assert not [r for r in results if not r["ok"]], "kernels that fail to compile or to fit:\n" + \
        _failure_report(results)
    assert rc == 0 and summary.get("failed") == 0, summary
    # every launchable kernel of every op file was compiled for every architecture
    assert sorted(head["defined_kernels"]) == head["scenario_ops"], \
        f"op files with Triton kernels {sorted(head['defined_kernels'])} vs files the helper drives " \
        f"{head['scenario_ops']}: add the new op to SCENARIOS in tools/triton_aot.py"
    compiled = defaultdict(set)
    for r in results:
        compiled[r["arch"]].add(r["kernel"])
    assert set(compiled) == set(archs)
    for arch in archs:
        for op, kernels in head["defined_kernels"].items():
            missing = {f"{op}.{k}" for k in kernels} - compiled[arch]
            assert not missing, f"sm_{arch}: never launched by the scenarios, so never compiled: {missing}"
    for r in results:
        assert r["cubin_bytes"] > 0 and r["ptx_lines"] > 0


@pytest.mark.parametrize("arch", ARCHS, ids=[f"sm_{a}" for a in ARCHS])
def test_every_kernel_compiles(tmp_path, arch):
    rc, head, results, summary = _run_aot(tmp_path, "--quick", archs=(arch,))
    _check_all_compiled(rc, head, results, summary, archs=(arch,))
    for dt in ("*fp32", "*fp16", "*bf16"):
        assert any(dt in r["config"]["dtypes"] for r in results), f"no {dt} inputs were compiled"
    spills = sorted({(r["arch"], r["kernel"], r["spill_bytes"]) for r in results if r["spill_bytes"]})
    if spills:  # legal, but slow: reported for the benchmarks, not a failure
        print(f"{len(spills)} configs spill registers, e.g. {spills[:3]}")


@full_only
def test_full_matrix_compiles(tmp_path):
    _check_all_compiled(*_run_aot(tmp_path))


@full_only
def test_every_autotune_config_compiles(tmp_path):
    # configs that exceed a launch limit are skipped by the autotuner; the helper fails a launch
    # only when none of its configs works
    rc, head, results, summary = _run_aot(tmp_path, "--autotune", "--quick")
    assert results
    assert rc == 0 and summary["failed"] == 0, _failure_report(results)


def test_harness_reports_compile_errors_and_launch_limits(tmp_path):
    """The helper's own self-test kernels: one does not compile, one needs too much shared memory."""
    rc, _, results, summary = _run_aot(tmp_path, "--op", "_selftest")
    assert rc == 1 and summary["failed"] == len(results) == 2 * len(ARCHS)
    by_kernel = defaultdict(list)
    for r in results:
        by_kernel[r["kernel"].rsplit(".", 1)[-1]].append(r)
    assert {r["arch"] for r in by_kernel["_selftest_mixed_dot_kernel"]} == set(ARCHS)
    for r in by_kernel["_selftest_mixed_dot_kernel"]:
        assert "CompilationError" in r["error"] and "same dtype" in r["error"]
    for r in by_kernel["_selftest_big_tile_kernel"]:
        assert "shared memory" in r["error"] and "OutOfResources" in r["error"]
