#!/usr/bin/env bash
# By hand, not in CI: does llama.cpp read our GGUF export as we mean it? Builds llama-cpp-python
# (llama.cpp's Python binding) from its PyPI source distribution when it is not installed -- many
# minutes on 2 cores -- then runs scripts/check_llamacpp.py: a synthetic Llama, quantised with
# layerpress, exported to GGUF, must give llama.cpp the same next-token logits as transformers
# computes on our dequantised weights, within the stated tolerance. Prints one JSON line per
# case (commit them under bench/results/); exits 1 if a case is off.
#
#   PYTHON=/path/to/venv/bin/python bash scripts/check_llamacpp.sh [--threads 2] | tee -a FILE
set -euo pipefail
LP_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${LP_PYTHON:-${PYTHON:-$(command -v python || command -v python3)}}"
if ! "$PY" -c "import llama_cpp" 2>/dev/null; then
  echo "check_llamacpp: building llama-cpp-python from source (slow)" >&2
  CMAKE_BUILD_PARALLEL_LEVEL="${JOBS:-2}" CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF}" \
    nice "$PY" -m pip install -q --disable-pip-version-check --no-binary llama-cpp-python llama-cpp-python
fi
cd "$LP_ROOT"
exec "$PY" scripts/check_llamacpp.py "$@"
