"""scripts/gpu_check.sh and bench/bench_cuda.py on a machine without a GPU (never skipped): the
script refuses before building anything, the benchmark exits 2 without CUDA, and --dry-run lists
the planned cases of the three suites with the required baselines."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")


def _run(cmd, env=None, timeout=60):
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True, timeout=timeout)


def _no_build_outputs(outdir: Path):
    assert not outdir.exists() or not any(outdir.iterdir()), "gpu_check.sh wrote files without a GPU"


@needs_no_cuda
def test_gpu_check_without_nvidia_smi_says_no_gpu(tmp_path):
    outdir = tmp_path / "out"
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                           if not (Path(p) / "nvidia-smi").exists())
    t0 = time.perf_counter()
    r = _run(["bash", str(SCRIPT), str(outdir)], env={"PATH": path, "LP_PYTHON": sys.executable})
    assert time.perf_counter() - t0 < 5
    assert r.returncode != 0
    assert "gpu_check: no GPU" in r.stderr + r.stdout
    _no_build_outputs(outdir)


@needs_no_cuda
def test_gpu_check_with_nvidia_smi_but_no_cuda_torch_says_no_gpu(tmp_path):
    """nvidia-smi answering is not enough: torch must see the GPU too."""
    fake = tmp_path / "bin"
    fake.mkdir()
    smi = fake / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: Fake GPU (UUID: GPU-0)'\necho 9.0\n")
    smi.chmod(smi.stat().st_mode | stat.S_IEXEC)
    outdir = tmp_path / "out"
    r = _run(["bash", str(SCRIPT), str(outdir)],
             env={"PATH": f"{fake}{os.pathsep}{os.environ.get('PATH', '')}", "LP_PYTHON": sys.executable})
    assert r.returncode != 0
    err = r.stderr + r.stdout
    assert "gpu_check: no GPU" in err and "torch.cuda.is_available()" in err
    _no_build_outputs(outdir)


def _bench_cuda(capsys, *argv):
    """bench.bench_cuda.main in this process (a subprocess would import torch again: seconds)."""
    from bench import bench_cuda
    capsys.readouterr()
    try:
        rc = bench_cuda.main(list(argv))
    except SystemExit as e:  # argparse's usage errors
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def test_bench_cuda_dry_run_lists_the_suites_and_baselines(capsys):
    rc, out, err = _bench_cuda(capsys, "--dry-run", "--quick")
    assert rc == 0, err
    lines = [json.loads(x) for x in out.splitlines() if x.strip()]
    assert lines[0]["kind"] == "plan"
    cases = [c for c in lines if c["kind"] == "case"]
    assert lines[0]["cases"] == len(cases)
    by = {s: [c for c in cases if c["suite"] == s] for s in ("gemm", "norms", "wtacrs")}
    assert all(by.values()), {s: len(v) for s, v in by.items()}
    impls = {i for c in cases for i in c["impls"]}
    for need in ("layerpress", "F.linear float16", "F.linear bfloat16", "aten._weight_int4pack_mm",
                 "eager F.rms_norm", "eager F.layer_norm", "torch.compile", "WTACRSLinear", "nn.Linear"):
        assert need in impls, need
    g = by["gemm"]
    assert {c["M"] for c in g} == {1, 16, 128}
    assert {(c["K"], c["N"]) for c in g} >= {(8192, 8192), (4096, 11008)}
    assert {(c["bits"], c["axis"]) for c in g} == {(4, "oc"), (4, "ic")}
    assert {c["dtype"] for c in g} == {"float16", "bfloat16"}
    assert {c["op"] for c in by["norms"]} == {"rms_norm", "add_rms_norm", "layer_norm"}
    assert {c["mode"] for c in by["norms"]} == {"fwd", "fwdbwd"}
    assert sum("torch.compile" in c["impls"] for c in by["norms"]) <= 6  # compile warm-up is costly


def test_bench_cuda_dry_run_full_and_suite_selection(capsys):
    rc, out, err = _bench_cuda(capsys, "--dry-run", "--suite", "gemm", "--cases", "bits=2,3,8")
    assert rc == 0, err
    cases = [json.loads(x) for x in out.splitlines()][1:]
    assert cases and {c["suite"] for c in cases} == {"gemm"}
    assert {c["bits"] for c in cases} == {2, 3, 8} and {c["axis"] for c in cases} == {"oc"}
    assert {c["M"] for c in cases} == {1, 4, 16, 32, 64, 128, 256}
    rc, _, err = _bench_cuda(capsys, "--dry-run", "--suite", "nope")
    assert rc == 2 and "unknown" in err


@needs_no_cuda
def test_bench_cuda_without_cuda_exits_2():
    """As a command (python -m), the way gpu_check.sh calls it."""
    r = _run([sys.executable, "-m", "bench.bench_cuda", "--quick", "--suite", "norms"])
    assert r.returncode == 2
    assert "no GPU" in r.stderr and "torch.cuda.is_available() is False" in r.stderr
    assert r.stdout == ""
