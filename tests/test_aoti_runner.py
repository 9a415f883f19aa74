"""cpp/examples/aoti_runner.cpp runs an AOTInductor package of a QuantLinear model with no Python
in the process: the package made by layerpress.interop.aoti.export_aoti (torch.export +
aoti_compile_and_package) from a tiny model (per-OC 4-bit and per-IC 3-bit layers), checked
against the eager output saved beside it, and that output against a float64 reference written
here from the layers' dequantised weights. The one AOTI compile (~30-60 s on 2 cores) is shared
by the module's tests."""
from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch
from torch import nn

from layerpress import QuantLinear, QuantSpec
from layerpress.interop.aoti import export_aoti, read_raw_tensor, write_raw_tensor

from lp_testutils import exact_cpu_gemm
from test_cpp_caller import _binary

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _run(*args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    return subprocess.run([_binary("aoti_runner"), *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=300)


def tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(QuantLinear.from_linear(nn.Linear(128, 96), QuantSpec(4, 32)), nn.GELU(),
                         QuantLinear.from_linear(nn.Linear(96, 64), QuantSpec(3, 32, "ic"))).eval()


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    d = tmp_path_factory.mktemp("aoti")
    model = tiny_model()
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(1))
    return model, x, export_aoti(model, [x], d / "tiny.pt2")


def reference64(model, x):
    w1, w2 = (model[i].dequantized_weight(torch.float64) for i in (0, 2))
    h = torch.nn.functional.gelu(x.double() @ w1.t() + model[0].bias.double())
    return h @ w2.t() + model[2].bias.double()


def test_raw_tensor_round_trip(tmp_path):
    t = torch.randn(3, 4, 5)
    write_raw_tensor(t, tmp_path / "t.lpt")
    assert torch.equal(read_raw_tensor(tmp_path / "t.lpt"), t)
    (tmp_path / "bad.lpt").write_bytes(b"LPT1" + b"\0" * 4)
    with pytest.raises(ValueError, match="bad.lpt"):
        read_raw_tensor(tmp_path / "bad.lpt")


def test_package_reference_is_the_eager_model(package):
    model, x, paths = package
    y = read_raw_tensor(paths["outputs"][0])
    assert torch.equal(read_raw_tensor(paths["inputs"][0]), x)
    # the saved output is the eager model's on the active CPU variant; on an exact one the same
    # model meets the float64 reference (the bf16 variant rounds its GEMM operands)
    with torch.no_grad():
        assert torch.equal(y, model(x))
        with exact_cpu_gemm():
            y_exact = model(x)
    ref = reference64(model, x)
    assert (y_exact.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
    loaded = torch._inductor.aoti_load_package(paths["package"])  # the package, from Python
    for m in (1, 5, 33):
        xm = torch.randn(m, 128)
        with torch.no_grad():
            assert (loaded(xm) - model(xm)).abs().max() <= 1e-5 * model(xm).abs().max() + 1e-6


def test_cpp_runner_matches_reference(package):
    _, _, paths = package
    r = _run("--package", paths["package"], "--input", paths["inputs"][0], "--reference",
             paths["outputs"][0], "--bench-M", "1,32", "--repeats", "3")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(s) for s in r.stdout.splitlines()]
    assert lines[0]["check"] == "reference" and lines[0]["ok"] is True and lines[0]["shape"] == [5, 64]
    assert [(d["M"], d["median_ms"] > 0) for d in lines[1:]] == [(1, True), (32, True)]


def test_cpp_runner_detects_a_wrong_reference_and_bad_arguments(package, tmp_path):
    _, _, paths = package
    y = read_raw_tensor(paths["outputs"][0])
    y[2, 3] += 1.0
    write_raw_tensor(y, tmp_path / "wrong.lpt")
    r = _run("--package", paths["package"], "--input", paths["inputs"][0], "--reference",
             tmp_path / "wrong.lpt")
    assert r.returncode == 1 and json.loads(r.stdout)["ok"] is False
    r = _run("--package", paths["package"], "--input", tmp_path / "missing.lpt")
    assert r.returncode == 2 and "missing.lpt" in r.stderr
    r = _run("--package", paths["package"], "--input", paths["inputs"][0], "--library", tmp_path / "no.so")
    assert r.returncode == 2 and "cannot load the layerpress op library" in r.stderr
    r = _run("--bogus")
    assert r.returncode == 2 and "unknown argument --bogus" in r.stderr


def test_export_aoti_argument_errors(tmp_path):
    with pytest.raises(ValueError, match=r"must end in \.pt2"):
        export_aoti(tiny_model(), [torch.randn(4, 128)], tmp_path / "m.so")
    with pytest.raises(ValueError, match="first dimension >= 2"):
        export_aoti(tiny_model(), [torch.randn(1, 128)], tmp_path / "m.pt2")
