#!/usr/bin/env bash
# The main job: sets up (scripts/setup.sh), then runs `layerpress demo` -- quantise a random
# 4096x4096 Linear at W4/W3/W2 (per-OC and per-IC), check the low-bit GEMM against the float64
# reference, and benchmark it against F.linear and torch's int4 GEMM.
#   bash scripts/demo.sh [demo options, e.g. --no-bench, --size 2048]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=setup.sh
source scripts/setup.sh
exec "$LP_PYTHON" -m layerpress demo "$@"
