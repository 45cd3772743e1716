#!/usr/bin/env bash
# Compile every csrc/**/*.cu with plain nvcc for sm_80 and sm_90, with exactly the nvcc flags
# setup.py builds the extension with (`python setup.py --print-nvcc-flags`: torch's common flags
# plus setup.py's NVCC_FLAGS). The .cu files hold no torch headers, so this works on a machine
# without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvcc >/dev/null 2>&1; then
  echo "[nvcc-check] nvcc not found: skipped"
  exit 0
fi
PY=${PY:-python}
read -r -a flags <<<"$("$PY" setup.py --print-nvcc-flags)"
if [ "${#flags[@]}" -eq 0 ]; then
  echo "[nvcc-check] setup.py printed no nvcc flags" >&2
  exit 1
fi
for f in "${flags[@]}"; do
  if [ "$f" = "--use_fast_math" ] || [ "$f" = "-use_fast_math" ]; then
    echo "[nvcc-check] setup.py passes $f: pgd_step_cuda.cu must stay exact to the reference" >&2
    exit 1
  fi
done
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
shopt -s globstar nullglob
n=0
for f in csrc/**/*.cu; do
  for arch in 80 90; do
    nvcc -c "${flags[@]}" -gencode "arch=compute_${arch},code=sm_${arch}" "$f" \
      -o "$tmp/$(basename "$f").sm${arch}.o"
  done
  n=$((n + 1))
done
echo "[nvcc-check] compiled $n CUDA source(s) for sm_80 and sm_90 with: ${flags[*]}"
