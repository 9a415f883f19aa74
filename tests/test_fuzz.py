"""The fuzz suite at its CI budget (tests/fuzz_harness.py, tests/fuzz_ops.py,
tests/fuzz_loaders.py): a fixed number of hypothesis cases per target with a fixed seed, each
group in a child process so that a crash is a failure with its reproducer. The cases run per
target are printed at the end of the pytest run. Longer runs: ``scripts/fuzz.sh --minutes N``.

Environment: LAYERPRESS_FUZZ_EXAMPLES (cases per target, default 100 for the ops and 25 for the
loaders), LAYERPRESS_FUZZ_SEED (default 0)."""
from __future__ import annotations

import os

import pytest

import fuzz_harness

EXAMPLES = {"ops": 100, "loaders": 25}
#: cases run per target in this session, for the terminal summary (conftest.py)
CASES_RUN: dict = {}


@pytest.mark.parametrize("group", ["ops", "loaders"])
def test_fuzz(group):
    names = list(fuzz_harness.group_targets(group))
    examples = int(os.environ.get("LAYERPRESS_FUZZ_EXAMPLES", EXAMPLES[group]))
    seed = int(os.environ.get("LAYERPRESS_FUZZ_SEED", "0"))
    results = fuzz_harness.guarded(names, examples, seed)
    failures = []
    for res in results:
        CASES_RUN[res["target"]] = res["cases"]
        f = res["failure"]
        if f:
            for one in [f] + f.get("others", []):
                failures.append(f"{res['target']}: {one['error']}\n  reproduce: "
                                f"{fuzz_harness.reproducer(res['target'], one['case'])}")
    assert not failures, "\n".join(failures)
    assert [r["target"] for r in results] == names
