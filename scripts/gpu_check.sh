#!/usr/bin/env bash
# The one command a session with a GPU runs (issue 13, part 3): build for the GPU present, run the
# GPU tests, the CUDA emulator's GPU self-test (when present) and the quick GPU benchmarks, and
# write everything into one folder. Sized for a lent H200 with 15 minutes of device time in all:
# the steps' time budgets add up to under 9 minutes (530 s).
#
#   bash scripts/gpu_check.sh [OUTDIR]     # OUTDIR default: $OUT if set, else bench/results/gpu-check-<date>
#
# Through the device tool: run(command="bash scripts/gpu_check.sh", timeout_s=590); $OUT comes back.
# Files written (the device tool returns at most 8 files from $OUT: keep it that way):
#   summary.md          machine, commit, git status, test counts, per-step wall times, the emulator
#                       self-test's output, bench_cuda's tables, nvidia-smi
#   build.log           the pip/CMake/nvcc build
#   tests.log           pytest -m gpu output      tests_junit.xml   its JUnit XML
#   bench_cuda.jsonl    python -m bench.bench_cuda --quick JSON lines
#   bench_gemm_cuda.jsonl  bench_cuda --suite gemm_cpp: the C++ tensor-core GEMM vs cuBLAS lines
#   (plus what scripts/emu_selftest_gpu.sh writes there itself: ptx_selftest.txt, ptx_selftest_build.txt)
# Without a GPU it prints "gpu_check: no GPU (...)" and exits 1 before building anything.
# Exit status: 0 all steps passed, 1 no GPU or some step failed (the other steps still ran).
# No network, no installs besides layerpress itself. LP_PYTHON overrides python3.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
PY="${LP_PYTHON:-python3}"

# ---- 0. is there a GPU? (before anything else; nothing is built without one) ----------------------
if ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "gpu_check: no GPU (nvidia-smi not found); nothing built or run" >&2
  exit 1
fi
if ! smi_list=$(timeout 20 nvidia-smi -L 2>&1) || [ -z "$smi_list" ]; then
  echo "gpu_check: no GPU (nvidia-smi -L failed: ${smi_list:-no output}); nothing built or run" >&2
  exit 1
fi
if ! cuda_ok=$(timeout 60 "$PY" -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available())" 2>&1) \
   || [ "${cuda_ok##* }" != True ]; then
  echo "gpu_check: no GPU (torch.cuda.is_available() is not True under $PY: $cuda_ok); nothing built or run" >&2
  exit 1
fi

outdir="${1:-${OUT:-bench/results/gpu-check-$(date -u +%Y%m%d-%H%M)}}"
mkdir -p "$outdir" || { echo "gpu_check: cannot create $outdir" >&2; exit 1; }
outdir="$(cd "$outdir" && pwd)"
t_all=$(date +%s)
declare -a step_rows=()
tmp=$(mktemp -d)            # logs folded into summary.md (not separate files: the 8-file limit)
trap 'rm -rf "$tmp"' EXIT
failed=0

# run_step NAME BUDGET_S LOG CMD...: runs CMD under `timeout`, output to LOG (and the terminal's
# tail), records rc and wall time; never stops the script.
run_step() {
  local name=$1 budget=$2 log=$3; shift 3
  local t0 rc status
  t0=$(date +%s)
  echo "== gpu_check: $name (budget ${budget}s) ==" >&2
  timeout -k 10 "$budget" "$@" >"$log" 2>&1
  rc=$?
  local dt=$(( $(date +%s) - t0 ))
  if [ $rc -eq 0 ]; then status=ok
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status="TIMEOUT (>${budget}s)"; failed=1
  else status="FAILED (rc $rc)"; failed=1; fi
  tail -n 15 "$log" >&2
  echo "== gpu_check: $name: $status in ${dt}s ==" >&2
  step_rows+=("| $name | $status | ${dt} | ${budget} |")
  return $rc
}

# ---- 1. the arch of the GPU present ---------------------------------------------------------------
cc=$(timeout 20 nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1 | tr -d ' ')
if ! [[ "$cc" =~ ^[0-9]+\.[0-9]+$ ]]; then
  cc=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))" 2>/dev/null)
fi
case "$cc" in
  9.0) arch=90a ;; 8.0) arch=80 ;; 8.6) arch=86 ;; 8.9) arch=89 ;;
  10.0) arch=100a ;; 12.0) arch=120a ;;
  *) arch="${cc/./}" ;;
esac
gpu_name=$(timeout 20 nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1)
echo "gpu_check: $gpu_name, compute capability $cc -> LAYERPRESS_CUDA_ARCHS=$arch; output in $outdir" >&2

# ---- 2. build and install (editable) for that arch only ------------------------------------------
cores=$(nproc 2>/dev/null || echo 8)
t_build=$(date +%s)
run_step build 160 "$outdir/build.log" \
  env CMAKE_ARGS="-DLAYERPRESS_CUDA_ARCHS=$arch" CMAKE_BUILD_PARALLEL_LEVEL="$cores" PIP_DISABLE_PIP_VERSION_CHECK=1 \
  "$PY" -m pip install --no-build-isolation --no-deps --no-index -v -e .
echo "gpu_check: build took $(( $(date +%s) - t_build ))s" >&2

# ---- 3. build_info --------------------------------------------------------------------------------
run_step build_info 15 "$tmp/build_info.txt" "$PY" -c "import layerpress; print(layerpress.build_info())"

# ---- 4. the GPU tests (all of them: no -x; --maxfail bounds a systematically broken kernel) ------
timeout_opt=()
if "$PY" -c "import pytest_timeout" >/dev/null 2>&1; then timeout_opt=(--timeout=60); fi
run_step "pytest -m gpu" 130 "$outdir/tests.log" \
  "$PY" -m pytest -m gpu -q tests -p no:cacheprovider --maxfail=200 -rfE \
  --junitxml="$outdir/tests_junit.xml" "${timeout_opt[@]}"

# ---- 5. HOOK: the CUDA emulator's self-test, compiled with nvcc (written by another engineer) ----
if [ -f scripts/emu_selftest_gpu.sh ]; then
  run_step emu_selftest 45 "$tmp/emu_selftest.log" bash scripts/emu_selftest_gpu.sh "$outdir"
else
  echo "skipped: scripts/emu_selftest_gpu.sh does not exist yet (CUDA emulator self-test hook)" \
    >"$tmp/emu_selftest.log"
  echo "== gpu_check: emu_selftest: skipped (scripts/emu_selftest_gpu.sh not present) ==" >&2
  step_rows+=("| emu_selftest | skipped (scripts/emu_selftest_gpu.sh not present) | 0 | 45 |")
fi

# ---- 6. the quick GPU benchmarks (JSON lines written as they come: a timeout keeps what ran) ------
run_step "bench_cuda --quick" 110 "$tmp/bench_cuda.log" \
  env PYTHONUNBUFFERED=1 "$PY" -m bench.bench_cuda --quick --suite gemm,norms,wtacrs --out "$outdir/bench_cuda.jsonl"

# ---- 6b. the C++ benchmark bench_gemm_cuda: the tensor-core GEMM vs cuBLAS fp16 (issue 14's table) --
run_step "bench_cuda --suite gemm_cpp --quick" 70 "$tmp/bench_gemm_cuda.log" \
  env PYTHONUNBUFFERED=1 "$PY" -m bench.bench_cuda --quick --suite gemm_cpp --out "$outdir/bench_gemm_cuda.jsonl"

# ---- 7. summary.md: machine, commit, counts, step times, bench table, nvidia-smi -----------------
commit=$(git rev-parse HEAD 2>/dev/null || echo unknown)
gstatus=$(git status --short 2>/dev/null)
smi=$(timeout 20 nvidia-smi 2>&1)
counts=$("$PY" - "$outdir/tests_junit.xml" <<'EOF' 2>/dev/null || echo "no JUnit XML (pytest did not finish)"
import sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
print(f"{n['tests'] - n['failures'] - n['errors'] - n['skipped']} passed, {n['failures']} failed, "
      f"{n['skipped']} skipped, {n['errors']} errors ({n['tests']} collected)")
EOF
)
{
  echo "# gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo
  echo "- machine: $gpu_name (compute capability $cc), built for \`$arch\`, $cores CPU cores"
  echo "- torch: $cuda_ok (version, CUDA, is_available)"
  echo "- commit: \`$commit\`$( [ -n "$gstatus" ] && echo " (working tree dirty, see below)")"
  echo "- layerpress.build_info(): \`$(tr '\n' ' ' <"$tmp/build_info.txt" 2>/dev/null | cut -c1-1500)\`"
  echo "- GPU tests: $counts"
  echo "- total wall time: $(( $(date +%s) - t_all ))s"
  echo
  echo "| step | status | wall s | budget s |"
  echo "|---|---|---|---|"
  printf '%s\n' "${step_rows[@]}"
  echo
  echo "## Failed GPU tests"
  echo '```'
  grep -E '^(FAILED|ERROR) ' "$outdir/tests.log" 2>/dev/null | head -n 60
  tail -n 3 "$outdir/tests.log" 2>/dev/null
  echo '```'
  echo
  echo "## CUDA emulator self-test (scripts/emu_selftest_gpu.sh)"
  echo '```'
  tail -n 40 "$tmp/emu_selftest.log" 2>/dev/null
  echo '```'
  echo
  echo "## bench_cuda --quick: progress and tables (ratios = baseline time / layerpress time)"
  echo '```'
  tail -n 200 "$tmp/bench_cuda.log" 2>/dev/null
  echo '```'
  echo
  echo "## bench_gemm_cuda (C++, tensor-core GEMM vs cuBLAS fp16)"
  echo '```'
  tail -n 80 "$tmp/bench_gemm_cuda.log" 2>/dev/null
  echo '```'
  echo
  echo "## git status --short"
  echo '```'
  echo "${gstatus:-(clean)}"
  echo '```'
  echo
  echo "## nvidia-smi"
  echo '```'
  echo "$smi"
  echo '```'
} >"$outdir/summary.md"
nfiles=$(find "$outdir" -type f | wc -l)
if [ "$nfiles" -gt 8 ]; then
  echo "gpu_check: WARNING: $nfiles files in $outdir; the device tool brings back at most 8" >&2
fi

echo "gpu_check: done in $(( $(date +%s) - t_all ))s; $( [ $failed -eq 0 ] && echo 'all steps passed' || echo 'SOME STEPS FAILED' ); see $outdir/summary.md" >&2
exit $failed
