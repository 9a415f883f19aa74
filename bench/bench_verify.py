"""Cost of checking the tensor digests on load (flows/integrity.py): ``load_quantized`` of a
synthetic checkpoint of at least 1 GB with ``verify=True`` and ``verify=False``, both from the page
cache, alternating, medians of the repeats; plus the digest pass alone and ``verify_directory``.

    python -m bench.bench_verify [--gb 1.0] [--repeats 3] [--dir DIR]

The checkpoint (random W4 g128 QuantLinear layers of 4096 x 8192 in a plain nn.Module, about
16.5 MB each) is written to DIR (default: a temporary directory) and deleted afterwards. Output:
JSON lines on stdout (the machine first).
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from layerpress import QuantLinear, QuantSpec
from layerpress.flows.integrity import digest_tensors
from layerpress.flows.io import verify_directory
from layerpress.flows.io import _read_tensors, load_quantized, save_quantized

from .bench_gemm import machine_info

N, K = 4096, 8192


class Stack(nn.Module):
    def __init__(self, layers: int, spec: QuantSpec, fill: bool):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.layers = nn.ModuleList()
        for _ in range(layers):
            m = QuantLinear(K, N, spec, bias=False)
            if fill:
                q = torch.randint(-2 ** 31, 2 ** 31 - 1, (N, K * spec.bits // 32), dtype=torch.int32, generator=g)
                s = (torch.rand(spec.scale_shape(N, K), generator=g) * 0.01 + 1e-3).to(spec.scale_dtype)
                z = torch.randint(0, 16, s.shape, dtype=torch.uint8, generator=g)
                m._set_canonical(q, s, z)
            self.layers.append(m)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gb", type=float, default=1.0, help="checkpoint size, GB (default 1.0)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", help="where to write the checkpoint (deleted afterwards)")
    args = p.parse_args(argv)
    spec = QuantSpec(bits=4, group_size=128)
    per_layer = N * K * spec.bits // 8 + N * (K // 128) * 3  # codes + fp16 scales + u8 zeros
    layers = max(1, int(-(-args.gb * 1e9 // per_layer)))
    print(json.dumps(machine_info()), flush=True)
    root = Path(tempfile.mkdtemp(prefix="lp-bench-verify-", dir=args.dir))
    try:
        t0 = time.perf_counter()
        model = Stack(layers, spec, fill=True)
        path = save_quantized(model, root / "ckpt")
        save_s = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in path.iterdir())
        target = Stack(layers, spec, fill=False)
        load_quantized(path, model=target)  # warm the page cache
        times = {"verify": [], "no_verify": [], "digests_only": [], "verify_directory": []}
        for _ in range(args.repeats):
            for mode in ("verify", "no_verify"):
                t0 = time.perf_counter()
                load_quantized(path, model=target, verify=mode == "verify")
                times[mode].append(time.perf_counter() - t0)
            sd, _ = _read_tensors(path)
            t0 = time.perf_counter()
            digest_tensors(sd)
            times["digests_only"].append(time.perf_counter() - t0)
            del sd
            t0 = time.perf_counter()
            assert all(r["ok"] for r in verify_directory(path))
            times["verify_directory"].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(json.dumps({
            "kind": "load_verify", "bytes": size, "tensors": 3 * layers, "layers": layers,
            "layer": f"QuantLinear {N}x{K} W4 g128", "repeats": args.repeats, "save_s": round(save_s, 2),
            "load_verify_s": round(med["verify"], 3), "load_no_verify_s": round(med["no_verify"], 3),
            "verify_overhead": round(med["verify"] / med["no_verify"] - 1, 3),
            "digest_pass_s": round(med["digests_only"], 3),
            "digest_gb_per_s": round(size / med["digests_only"] / 1e9, 2),
            "verify_directory_s": round(med["verify_directory"], 3),
            "all_s": {k: [round(x, 3) for x in v] for k, v in times.items()}}), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
