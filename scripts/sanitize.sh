#!/usr/bin/env bash
# The sanitizer step of CI: the C++ libraries built with AddressSanitizer + UBSan, and the
# kernel-level tests run against them (docs/reliability.md).
#
#   bash scripts/sanitize.sh [extra pytest arguments]      # after scripts/setup.sh
#
# 1. builds the op library (_C) and the C++ dispatcher caller with the CMake option
#    LAYERPRESS_SANITIZE=address,undefined into build/sanitize (its own folder: the installed
#    package is untouched), and lays out build/sanitize/pkg/layerpress: links to the Python
#    sources plus the sanitized _C.abi3.so and bin/dispatcher_caller;
# 2. runs the kernel-level tests (format, GEMM at odd shapes under every CPU variant, norms,
#    WTA-CRS, the dispatcher caller, the CUDA emulator built with LP_EMU_SANITIZE) with python -S
#    (no site hooks: the editable install's import hook would otherwise win over PYTHONPATH) and
#    the sanitizer runtimes preloaded. Any report aborts the process: the run fails.
# Environment: LP_PYTHON / PYTHON (interpreter with torch and the test tools),
# LAYERPRESS_SANITIZE (default address,undefined), LAYERPRESS_SANITIZE_TESTS (pytest targets
# instead of the default subset).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$PWD"

# the interpreter scripts/setup.sh set up: LP_PYTHON, else its .venv (PEP 668 systems), else PYTHON / python
if [ -z "${LP_PYTHON:-}" ] && [ -x "$ROOT/.venv/bin/python" ]; then LP_PYTHON="$ROOT/.venv/bin/python"; fi
LP_PYTHON="${LP_PYTHON:-${PYTHON:-$(command -v python || command -v python3)}}"
SAN="${LAYERPRESS_SANITIZE:-address,undefined}"
BUILD="$ROOT/build/sanitize"
JOBS="$(nproc 2>/dev/null || echo 2)"
t0=$(date +%s)

gen=()
if command -v ninja >/dev/null 2>&1 && [ ! -f "$BUILD/Makefile" ]; then gen=(-G Ninja); fi
cmake -S . -B "$BUILD" "${gen[@]}" -DLAYERPRESS_SANITIZE="$SAN" -DCMAKE_BUILD_TYPE=Release \
  -DPython_EXECUTABLE="$LP_PYTHON" >"$BUILD.configure.log" 2>&1 || { cat "$BUILD.configure.log"; exit 1; }
nice cmake --build "$BUILD" --target _C dispatcher_caller -j "$JOBS"
t_build=$(( $(date +%s) - t0 ))

PKG="$BUILD/pkg/layerpress"
rm -rf "$BUILD/pkg"
mkdir -p "$PKG/bin"
for f in "$ROOT"/python/layerpress/*; do
  case "$(basename "$f")" in __pycache__|_C.*|bin) ;; *) ln -s "$f" "$PKG/" ;; esac
done
ln -s "$BUILD/_C.abi3.so" "$PKG/_C.abi3.so"
# a copy, not a link: the caller finds the op library next to its own real path (bin/../_C.abi3.so)
cp "$BUILD/dispatcher_caller" "$PKG/bin/dispatcher_caller"

# python -S skips site-packages: put them on the path ourselves, after the sanitized package
SITE="$("$LP_PYTHON" -c 'import sysconfig; p = sysconfig.get_paths(); print(p["purelib"] + ":" + p["platlib"])')"
PRELOAD="$(gcc -print-file-name=libasan.so)"
case "$SAN" in *undefined*) PRELOAD="$PRELOAD:$(gcc -print-file-name=libubsan.so)" ;; esac

# detect_leaks=0: CPython and torch keep allocations alive until exit on purpose.
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:print_summary=1${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"
export LAYERPRESS_CUDA_EMU_SANITIZE="$SAN"
export PYTHONPATH="$BUILD/pkg:$SITE"
export PYTHONDONTWRITEBYTECODE=1

run_py() { LD_PRELOAD="$PRELOAD" "$LP_PYTHON" -S "$@"; }

# the run must use the sanitized library, or it proves nothing
run_py - <<PY
import layerpress, os
so = os.path.realpath(layerpress._C.__file__)
assert so == os.path.realpath("$BUILD/_C.abi3.so"), f"sanitize.sh: imported {so}, not the sanitized build"
print("sanitize.sh: layerpress._C from", so)
PY

# The kernel-level subset (about 4 minutes on 2 cores): every kernel and tail path, every CPU
# variant forced, not every dtype/shape combination of the full suite.
DEFAULT_TESTS=(
  tests/test_format.py
  tests/test_gemm.py
  tests/test_norms.py
  tests/test_wtacrs.py
  tests/test_cpp_caller.py
  "tests/test_fuzz.py::test_fuzz[ops]"
  tests/test_cuda_emulated.py
  # builds a second, deliberately broken emulator: a test of the tests, not of the kernels
  --deselect tests/test_cuda_emulated.py::test_broken_kernels_fail
  # the larger-M GEMM grid and the thread-order sweeps repeat paths the rest covers (the whole
  # emulated suite ran clean under ASan+UBSan by hand; LAYERPRESS_SANITIZE_TESTS to run it)
  --deselect tests/test_cuda_emulated.py::test_gemm_larger_m
  --deselect tests/test_cuda_emulated.py::test_gemm_under_every_thread_order
  --deselect tests/test_cuda_emulated.py::test_norms_against_float64_and_every_thread_order
)
if [ -n "${LAYERPRESS_SANITIZE_TESTS:-}" ]; then
  read -r -a TESTS <<<"$LAYERPRESS_SANITIZE_TESTS"
else
  TESTS=("${DEFAULT_TESTS[@]}")
fi
rc=0
# --capture=sys: a sanitizer report (written to fd 2 just before the abort) reaches the log
run_py -m pytest -q -p no:cacheprovider --capture=sys "${TESTS[@]}" "$@" || rc=$?
echo "sanitize.sh: $SAN, build ${t_build} s, total $(( $(date +%s) - t0 )) s, pytest exit $rc"
exit "$rc"
