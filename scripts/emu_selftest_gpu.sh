#!/usr/bin/env bash
# The CUDA primitives self-test (cuda/emu/tests/ptx_selftest.cu) on a real GPU: the same checks of
# the mma.m16n8k16 / ldmatrix fragment layouts, cp.async, shuffles, votes, barriers, atomics and
# lop3/prmt that the emulated CI tests run, compiled by nvcc for the GPU present. A pass here is
# what says the emulator's layouts are the hardware's.
#   bash scripts/emu_selftest_gpu.sh [OUTDIR]     (scripts/gpu_check.sh calls it)
# Writes OUTDIR/ptx_selftest.txt; exit status: the program's (0 all passed, 1 a check failed,
# 2 no GPU), or 3 if it does not compile.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out="${1:-${OUT:-.}}"
mkdir -p "$out"
cap="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')"
if [ -z "$cap" ]; then
  echo "emu_selftest_gpu: no GPU (nvidia-smi reports no compute capability)" | tee "$out/ptx_selftest.txt"
  exit 2
fi
case "$cap" in 90|100|120) arch="sm_${cap}a" ;; *) arch="sm_${cap}" ;; esac
bin="$(mktemp -d)/ptx_selftest"
if ! nvcc -std=c++17 -O2 -arch="$arch" -I cuda/kernels cuda/emu/tests/ptx_selftest.cu -o "$bin" \
     > "$out/ptx_selftest_build.txt" 2>&1; then
  echo "emu_selftest_gpu: nvcc failed for $arch (see ptx_selftest_build.txt)" | tee "$out/ptx_selftest.txt"
  exit 3
fi
echo "# ptx_selftest on $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1), $arch" > "$out/ptx_selftest.txt"
timeout 120 "$bin" | tee -a "$out/ptx_selftest.txt"
exit "${PIPESTATUS[0]}"
