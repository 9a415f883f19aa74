"""Latency of a QuantLinear model run from C++ as an AOTInductor package (cpp/examples/aoti_runner)
against the same model in Python eager mode and the same package loaded from Python.

    python -m bench.bench_aoti [--M 1,32] [--threads 1] [--rounds 2] [--out FILE]

The model: four 1024x1024 linears (per-OC W4 g128, per-IC W3 g128, per-OC W4 g128, per-OC W8
g128) with GELU between them, fp32 activations. It is compiled once with
layerpress.interop.aoti.export_aoti; then, in ``--rounds`` interleaved rounds, the C++ runner (a
subprocess timing ``loader.run`` itself), Python eager (``model(x)`` under no_grad) and the package
from Python (``aoti_load_package``) are timed at each M. One JSON line per measurement on stdout
(the first, kind "machine", names the machine); medians of repeated calls.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

import layerpress
from layerpress import QuantLinear, QuantSpec
from layerpress.cli.common import measure
from layerpress.interop.aoti import export_aoti

from .bench_gemm import machine_info


def model_1024() -> nn.Module:
    torch.manual_seed(0)
    specs = [QuantSpec(4, 128), QuantSpec(3, 128, "ic"), QuantSpec(4, 128), QuantSpec(8, 128)]
    mods = []
    for i, s in enumerate(specs):
        mods.append(QuantLinear.from_linear(nn.Linear(1024, 1024), s))
        if i < len(specs) - 1:
            mods.append(nn.GELU())
    return nn.Sequential(*mods).eval()


def runner_binary() -> str:
    p = os.path.join(os.path.dirname(layerpress._C.__file__), "bin", "aoti_runner")
    if not os.access(p, os.X_OK):
        sys.exit(f"bench_aoti: {p} is not built; build and install the package")
    return p


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--M", default="1,32")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=200, help="C++ runner calls per M and round")
    ap.add_argument("--out", help="also append the JSON lines to this file")
    args = ap.parse_args(argv)
    ms = [int(v) for v in args.M.split(",")]
    torch.set_num_threads(args.threads)
    lines = [{**machine_info(), "loadavg": os.getloadavg()[0],
              "model": "4x QuantLinear 1024x1024 (W4/W3-ic/W4/W8 g128) + GELU"}]
    model = model_1024()
    with tempfile.TemporaryDirectory() as d:
        paths = export_aoti(model, [torch.randn(8, 1024)], Path(d) / "m.pt2")
        loaded = torch._inductor.aoti_load_package(paths["package"])
        for rnd in range(args.rounds):
            r = subprocess.run([runner_binary(), "--package", paths["package"], "--input",
                                paths["inputs"][0], "--reference", paths["outputs"][0], "--bench-M",
                                args.M, "--repeats", str(args.repeats), "--threads", str(args.threads)],
                               capture_output=True, text=True, timeout=600)
            if r.returncode != 0:
                sys.exit(f"bench_aoti: aoti_runner failed: {r.stderr}")
            for s in r.stdout.splitlines():
                d_ = json.loads(s)
                if d_["check"] == "bench":
                    lines.append({"kind": "latency", "round": rnd, "impl": "aoti_cpp", "M": d_["M"],
                                  "median_ms": d_["median_ms"]})
            for m in ms:
                x = torch.randn(m, 1024)
                with torch.no_grad():
                    eager, n1 = measure(lambda: model(x), target_s=0.5)
                    aoti_py, n2 = measure(lambda: loaded(x), target_s=0.5)
                lines.append({"kind": "latency", "round": rnd, "impl": "python_eager", "M": m,
                              "median_ms": eager, "repeats": n1})
                lines.append({"kind": "latency", "round": rnd, "impl": "aoti_python", "M": m,
                              "median_ms": aoti_py, "repeats": n2})
    for line in lines:
        print(json.dumps(line))
    if args.out:
        with open(args.out, "a", encoding="utf-8") as f:
            for line in lines:
                f.write(json.dumps(line) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
