#!/usr/bin/env bash
# The test command: sets up (scripts/setup.sh), then runs the whole test suite.
#   bash scripts/test.sh [extra pytest arguments]
# Exit status: pytest's; "no tests collected" (pytest's 5) counts as a failure.
# LAYERPRESS_SKIP_SETUP=1 skips the setup step (for callers that just ran it).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ "${LAYERPRESS_SKIP_SETUP:-0}" = 1 ]; then
  LP_PYTHON="${LP_PYTHON:-${PYTHON:-$(command -v python || command -v python3)}}"
else
  # shellcheck source=setup.sh
  source scripts/setup.sh  # sets LP_PYTHON
fi

rc=0
"$LP_PYTHON" -m pytest -q tests "$@" || rc=$?
if [ "$rc" -eq 5 ]; then
  echo "test.sh: pytest collected no tests; treating that as a failure" >&2
fi
exit "$rc"
