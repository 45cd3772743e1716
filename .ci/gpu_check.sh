#!/usr/bin/env bash
# `make gpu-check OUT=dir`: the whole check to run on a machine with a GPU, within 8 minutes of
# wall time on one H200, offline (no package registry), leaving results even when cut short.
#
# Stages, each under its own `timeout` (SIGINT first, so pytest still writes its JSON), each
# appending to its own file under $OUT (8 files at most, no sub-folders):
#   env        env.json           GPU, driver, versions, measured copy bandwidth and bf16 matmul rate
#   build      build.log          pip install --no-index --no-build-isolation --no-deps -e . (CUDA)
#   tests      pytest.log         the CUDA correctness tests (pytest-xdist)
#   bench_*    bench_<op>.json    one bench file per op at the kernel targets' shapes
#                                 (DRP_BENCH_TARGETS=1); their console output goes to pytest.log
# stages.txt gets one line per stage (name, exit status, seconds) as soon as it ends. A stage that
# would start with less than MIN_STAGE_S seconds left is recorded as skipped. Without a GPU the
# script records why and exits 3 after the env stage; GPU_CHECK_CPU_DRY_RUN=1 instead runs the
# later stages on the CPU without the build (to check this script; the stages get cut short).
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-gpu-check-out}
TOTAL_S=${GPU_CHECK_TOTAL_S:-455}
MIN_STAGE_S=15
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
STAGES="$OUT/stages.txt"
LOG="$OUT/pytest.log"
: >"$STAGES"

PY=${PY:-python}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  PY=python3
fi
export PYTHONUNBUFFERED=1 DRP_BENCH_ECHO=1 DRP_BENCH_TARGETS=1 DRP_BENCH_ROUNDS=${DRP_BENCH_ROUNDS:-10}
export TRITON_DEFAULT_FP_FUSION=${TRITON_DEFAULT_FP_FUSION:-1}

START=$(date +%s)
left() { echo $((TOTAL_S - ($(date +%s) - START))); }

# stage NAME BUDGET_S OUTFILE CMD... : run CMD with at most BUDGET_S seconds (less if the total is short)
stage() {
  local name=$1 budget=$2 out=$3
  shift 3
  local rest
  rest=$(left)
  local t=$((budget < rest ? budget : rest))
  if [ "$t" -lt "$MIN_STAGE_S" ]; then
    echo "$name skipped: $((rest > 0 ? rest : 0))s of the ${TOTAL_S}s budget left" | tee -a "$STAGES"
    return 0
  fi
  echo "== $name (up to ${t}s) ==" >>"$out"
  local t0 rc
  t0=$(date +%s)
  timeout -s INT -k 15 "$t" "$@" >>"$out" 2>&1
  rc=$?
  local status=ok
  [ "$rc" -ne 0 ] && status="failed rc=$rc"
  { [ "$rc" -eq 124 ] || [ "$rc" -eq 130 ] || [ "$rc" -eq 137 ]; } && status="cut at ${t}s (rc=$rc)"
  echo "$name $status $(($(date +%s) - t0))s" | tee -a "$STAGES"
  return 0
}

# ------------------------------------------------------------------ env + copy bandwidth
stage env 45 "$OUT/env.log.tmp" "$PY" - "$OUT/env.json" <<'EOF'
import json, platform, shutil, subprocess, sys, time
out = {"python": platform.python_version(), "platform": platform.platform()}
try:
    import torch
    out["torch"] = torch.__version__
    out["torch_cuda"] = torch.version.cuda
    out["cuda_available"] = torch.cuda.is_available()
except Exception as exc:
    out["torch_error"] = repr(exc)
    torch = None
try:
    import triton
    out["triton"] = triton.__version__
except Exception as exc:
    out["triton_error"] = repr(exc)
for tool, args in (("nvidia-smi", ["--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                   "--format=csv,noheader"]), ("nvcc", ["--version"])):
    if shutil.which(tool):
        r = subprocess.run([tool, *args], capture_output=True, text=True, timeout=30)
        out[tool] = (r.stdout or r.stderr).strip().splitlines()[-1:] if tool == "nvcc" else r.stdout.strip()
if torch is not None and torch.cuda.is_available():
    dev = torch.device("cuda")
    p = torch.cuda.get_device_properties(dev)
    out["device"] = {"name": p.name, "capability": f"{p.major}.{p.minor}", "sms": p.multi_processor_count,
                     "memory_gib": round(p.total_memory / 2**30, 1)}
    def timed_ms(fn, n=10):
        for _ in range(3):
            fn()
        s = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        e = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        for a, b in zip(s, e):
            a.record(); fn(); b.record()
        torch.cuda.synchronize()
        return sorted(a.elapsed_time(b) for a, b in zip(s, e))[n // 2]
    n = 1 << 31
    src = torch.empty(n, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    ms = timed_ms(lambda: dst.copy_(src))
    out["copy_bandwidth_gbps"] = round(2 * n / (ms * 1e-3) / 1e9, 1)
    del src, dst
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    ms = timed_ms(lambda: a @ a)
    out["bf16_matmul_tflops_8192"] = round(2 * 8192**3 / (ms * 1e-3) / 1e12, 1)
json.dump(out, open(sys.argv[1], "w"), indent=1)
print(json.dumps(out))
EOF
cat "$OUT/env.log.tmp" >>"$STAGES" 2>/dev/null
rm -f "$OUT/env.log.tmp"

DRY=${GPU_CHECK_CPU_DRY_RUN:-0}
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
  if [ "$DRY" != 1 ]; then
    echo "no CUDA GPU: build, tests and benchmarks skipped" | tee -a "$STAGES"
    exit 3
  fi
  echo "no CUDA GPU: dry run on the CPU, build skipped" | tee -a "$STAGES"
else
  # ---------------------------------------------------------------- offline build (CUDA)
  ARCH=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
  stage build 130 "$OUT/build.log" env DRP_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="$(nproc)" \
    "$PY" -m pip install --no-index --no-build-isolation --no-deps -e .
  stage build-check 20 "$OUT/build.log" "$PY" -c \
    "from drp_kernels.ops import _extension as e; import sys; print('cuda kernels:', e.has_cuda_kernels(), e.load_error()); sys.exit(0 if e.has_cuda_kernels() else 1)"
fi

# ------------------------------------------------------------------ CUDA correctness tests
tests=(tests/kernels/test_proto_loss.py tests/kernels/test_repulsion.py tests/kernels/test_pgd_step.py
       tests/kernels/test_prototypes.py tests/kernels/test_lp_dist.py)
xdist=()
if "$PY" -c "import xdist" >/dev/null 2>&1; then
  xdist=(-n "$(( $(nproc) < 8 ? $(nproc) : 8 ))")
fi
stage tests 110 "$LOG" "$PY" -m pytest -v --tb=short -rfEs -p no:cacheprovider "${xdist[@]}" "${tests[@]}"

# ------------------------------------------------------------------ benchmarks (one file per op)
bench() {  # bench NAME BUDGET FILES...
  local name=$1 budget=$2
  shift 2
  stage "bench_$name" "$budget" "$LOG" "$PY" -m pytest -q -rs -p no:cacheprovider --benchmark-only \
    --benchmark-json="$OUT/bench_$name.json" "$@"
}
bench proto_loss 55 bench/bench_proto_loss.py
bench repulsion 55 bench/bench_repulsion.py
bench pgd 35 bench/bench_pgd_step.py bench/bench_attacks.py -k "cuda"
[ -f bench/bench_lp_dist.py ] && bench lp_dist 35 bench/bench_lp_dist.py
echo "total $(($(date +%s) - START))s" | tee -a "$STAGES"
