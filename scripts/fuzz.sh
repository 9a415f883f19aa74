#!/usr/bin/env bash
# Longer fuzz runs than CI's (tests/test_fuzz.py): every target of tests/fuzz_ops.py and
# tests/fuzz_loaders.py, in guarded child processes, with new random seeds until the time is up.
#
#   bash scripts/fuzz.sh --minutes N [--group ops|loaders|all] [--examples E] [--seed S]
#
# Prints a JSON line of cases per target after each round, then the failures with their
# reproducers (python tests/fuzz_harness.py --replay TARGET 'CASE'). Exit status 1 on a failure.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
LP_PYTHON="${LP_PYTHON:-${PYTHON:-$(command -v python || command -v python3)}}"
minutes=10 group=all examples=200 seed=0
while [ $# -gt 0 ]; do
  case "$1" in
    --minutes) minutes="$2"; shift 2 ;;
    --group) group="$2"; shift 2 ;;
    --examples) examples="$2"; shift 2 ;;
    --seed) seed="$2"; shift 2 ;;
    -h|--help) sed -n 2,8p "$0"; exit 0 ;;
    *) echo "fuzz.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
cd tests
exec "$LP_PYTHON" fuzz_harness.py --group "$group" --minutes "$minutes" --examples "$examples" --seed "$seed"
