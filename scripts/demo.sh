#!/usr/bin/env bash
# The main job: sets up (scripts/setup.sh), then runs `layerpress quantize` -- quantise the
# bundled real all-MiniLM-L6-v2 layer by layer with the default plan (W4 g128, GPTQ with the
# clipping search, AdaDim axis choice), evaluate it against the fp32 model on held-out
# sentences, and print size, fidelity and forward time against the original.
#   bash scripts/demo.sh [quantize options, e.g. --bits 3.5, --method awq+gptq, --out DIR]
# The low-bit GEMM demo (check + benchmark of a 4096x4096 layer) is `layerpress demo`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=setup.sh
source scripts/setup.sh
exec "$LP_PYTHON" -m layerpress quantize "$@"
