#!/usr/bin/env bash
# Compile every csrc/**/*.cu with plain nvcc for sm_80 and sm_90. The .cu files
# hold no torch headers, so this works on a machine without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvcc >/dev/null 2>&1; then
  echo "[nvcc-check] nvcc not found: skipped"
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
shopt -s globstar nullglob
n=0
for f in csrc/**/*.cu; do
  for arch in 80 90; do
    nvcc -c -std=c++17 -O3 -gencode "arch=compute_${arch},code=sm_${arch}" "$f" -o "$tmp/$(basename "$f").sm${arch}.o"
  done
  n=$((n + 1))
done
echo "[nvcc-check] compiled $n CUDA source(s) for sm_80 and sm_90"
