"""The fuzz harness: hypothesis-generated cases for each target (tests/fuzz_ops.py,
tests/fuzz_loaders.py), run in a child process so that a crash (segfault, abort, a sanitizer
report) is a failure with its reproducer instead of the end of the test run.

A target is ``(strategy, run)``: ``strategy`` draws a *case* (a JSON-able dict), ``run(case)``
builds the inputs from it deterministically, calls the code under test and raises
``FuzzFailure`` when the outcome is wrong (a wrong result, an exception of the wrong kind or one
that names nothing). Before each case the child writes it to a file; if the child dies, the
parent reads the last case back: that is the reproducer::

    python tests/fuzz_harness.py --replay TARGET 'CASE-JSON'

Used by tests/test_fuzz.py (a fixed number of examples per target, fixed seed) and
scripts/fuzz.sh (``--minutes N``: random seeds until the time is up).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, Tuple

HERE = Path(__file__).resolve().parent

# Exceptions a bad input may raise from the API under test (ValueError covers IntegrityError and
# the ops' tagged std::invalid_argument; the raw ops may deliver RuntimeError, see docs/api.md).
API_ERRORS = (ValueError, TypeError, RuntimeError, FileNotFoundError, OSError, IndexError, OverflowError)


class FuzzFailure(AssertionError):
    """The case ended in a wrong result or an unhelpful error."""


def group_targets(group: str) -> Dict[str, Tuple[Callable, Callable]]:
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    if group == "ops":
        import fuzz_ops
        return fuzz_ops.TARGETS
    if group == "loaders":
        import fuzz_loaders
        return fuzz_loaders.TARGETS
    raise ValueError(f"unknown fuzz group {group!r} (ops, loaders)")


def _target(name: str):
    for group in ("ops", "loaders"):
        targets = group_targets(group)
        if name in targets:
            return targets[name]
    raise ValueError(f"unknown fuzz target {name!r}")


def run_target(name: str, examples: int, seed: int, case_file: Path) -> dict:
    """Runs ``examples`` hypothesis cases of one target in this process. Returns
    ``{"target", "cases", "failure" (None or {"case", "error"})}``."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hyp_seed

    strategy, run = _target(name)
    count = {"n": 0}

    @hyp_seed(seed)
    @settings(max_examples=examples, deadline=None, database=None, derandomize=False,
              phases=(Phase.generate, Phase.shrink), print_blob=False,
              suppress_health_check=list(HealthCheck))
    @given(case=strategy())
    def fuzz(case):
        case_file.write_text(json.dumps({"target": name, "case": case}))
        count["n"] += 1
        try:
            run(case)
        except Exception as e:  # noqa: BLE001  (kept per distinct error; the last is the shrunk one)
            msg = "".join(traceback.format_exception_only(type(e), e)).strip()
            seen[f"{type(e).__name__}: {msg.splitlines()[0][:60]}"] = {"case": case, "error": msg[-2000:]}
            raise

    seen = {}
    failure = None
    try:
        fuzz()
    except Exception as e:  # noqa: BLE001
        found = list(seen.values()) or [{"case": json.loads(case_file.read_text())["case"],
                                        "error": "".join(traceback.format_exception_only(type(e), e)).strip()}]
        failure = dict(found[0], others=found[1:])
    return {"target": name, "cases": count["n"], "failure": failure}


def guarded(names, examples: int, seed: int, timeout: float = 600) -> list:
    """Runs the targets ``names`` in one child process; a child that dies (signal, abort,
    sanitizer) becomes a failure of the target it was in, with the case it was running."""
    with tempfile.TemporaryDirectory(prefix="lp-fuzz-") as tmp:
        case_file, result_file = Path(tmp) / "case.json", Path(tmp) / "result.json"
        cmd = [sys.executable] + (["-S"] if sys.flags.no_site else []) + [
            str(Path(__file__).resolve()), "--child", ",".join(names), "--examples", str(examples),
            "--seed", str(seed), "--case-file", str(case_file), "--result-file", str(result_file)]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            rc, out = r.returncode, (r.stdout + r.stderr)
        except subprocess.TimeoutExpired as e:
            rc, out = "timeout", ((e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or ""))
        done = json.loads(result_file.read_text()) if result_file.exists() else []
        if rc == 0 and len(done) == len(names):
            return done
        last = json.loads(case_file.read_text()) if case_file.exists() else {"target": names[len(done)], "case": None}
        why = (f"killed by signal {signal.Signals(-rc).name}" if isinstance(rc, int) and rc < 0
               else f"child exited with {rc}")
        done.append({"target": last["target"], "cases": None,
                     "failure": {"case": last["case"], "error": f"{why} while running this case\n{out[-4000:]}"}})
        return done


def reproducer(target: str, case) -> str:
    return f"python tests/fuzz_harness.py --replay {target} '{json.dumps(case)}'"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", help="(internal) comma-separated targets to run in this process")
    p.add_argument("--examples", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--case-file")
    p.add_argument("--result-file")
    p.add_argument("--replay", nargs=2, metavar=("TARGET", "CASE_JSON"), help="run one case here")
    p.add_argument("--group", choices=("ops", "loaders", "all"), help="run a group guarded (fuzz.sh)")
    p.add_argument("--minutes", type=float, default=0, help="with --group: keep drawing new seeds for this long")
    args = p.parse_args(argv)
    if args.replay:
        _target(args.replay[0])[1](json.loads(args.replay[1]))
        print("case passed")
        return 0
    if args.child:
        results = []
        for name in args.child.split(","):
            results.append(run_target(name, args.examples, args.seed, Path(args.case_file)))
            Path(args.result_file).write_text(json.dumps(results))
        return 0
    groups = ["ops", "loaders"] if args.group in (None, "all") else [args.group]
    names = [n for g in groups for n in group_targets(g)]
    totals = {n: 0 for n in names}
    failures = []
    deadline = time.time() + args.minutes * 60
    seed = args.seed or int.from_bytes(os.urandom(4), "little")
    while True:
        for res in guarded(names, args.examples, seed, timeout=max(600, args.minutes * 60)):
            totals[res["target"]] += res["cases"] or 0
            if res["failure"]:
                failures.append((res["target"], seed, res["failure"]))
        print(json.dumps({"seed": seed, "cases": totals}), flush=True)
        if failures or time.time() >= deadline:
            break
        seed += 1
    for target, s, f in failures:
        print(f"FAILED {target} (seed {s}): {f['error']}\n  reproduce: {reproducer(target, f['case'])}")
    print(json.dumps({"total_cases": totals, "failures": len(failures)}))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
