"""The C++ program cpp/examples/dispatcher_caller.cpp calls layerpress::quantize, pack, repack
and gemm through the PyTorch dispatcher with no Python in the process, and checks the GEMM
against its own float64 dequantise + matmul reference (both group axes, 2/3/4/8 bits)."""
from __future__ import annotations

import glob
import json
import os
import subprocess
from pathlib import Path

import pytest

import layerpress

REPO = Path(__file__).resolve().parents[1]


def _binary(name: str = "dispatcher_caller") -> str:
    """The installed copy (next to bench_gemm_cpu in layerpress/bin), else the build tree's."""
    cands = [os.path.join(os.path.dirname(layerpress._C.__file__), "bin", name),
             os.path.join(os.path.dirname(layerpress.__file__), "bin", name)]
    cands += sorted(glob.glob(str(REPO / "build" / "*" / name)))
    for c in cands:
        if os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    pytest.fail(f"{name} is not built (looked in {cands}); build and install the package")


def _run(*args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    return subprocess.run([_binary(), *args], capture_output=True, text=True, env=env, timeout=120)


def test_cpp_caller_matches_reference():
    r = _run("--threads", "1")
    assert r.returncode == 0, r.stderr
    cases = [json.loads(line) for line in r.stdout.splitlines()]
    assert {(c["bits"], c["axis"]) for c in cases} == {(b, a) for b in (2, 3, 4, 8) for a in ("oc", "ic")}
    for c in cases:
        assert c["op"] == "layerpress::gemm" and c["ok"] is True, c
        assert c["max_abs_err"] <= 1e-5 * c["max_abs_ref"] + 1e-5, c


def test_cpp_caller_multithreaded_batch():
    r = _run("--threads", "2", "--M", "33", "--bits", "4")
    assert r.returncode == 0, r.stderr
    assert [json.loads(line)["M"] for line in r.stdout.splitlines()] == [33, 33]


def test_cpp_caller_reports_op_errors():
    # the op's own argument check, raised through the dispatcher as a c10::Error
    r = _run("--bits", "5")
    assert r.returncode == 1
    assert "bits must be one of 2, 3, 4, 8, got 5" in r.stderr
    r = _run("--rows", "3")
    assert r.returncode == 2 and "unknown argument --rows" in r.stderr
