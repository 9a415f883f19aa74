"""The rotated CPU GEMM against the unrotated one, side by side in one run (issue 22 target:
rotated within 1.05x at M = 1, 16, 128, 1024).

    python -m bench.bench_rotation [--ms 1,16,128,1024] [--k 4096 --n 4096] [--block 128] [--out F]

For each M and activation dtype: ``layerpress.ops.gemm`` on a W4 g128 weight without a rotation,
with ``rot_signs``/``rot_block`` (the launcher rotates the activation rows, then the same kernel
runs), and the ``hadamard`` op alone. The three are timed in interleaved rounds and reported as
medians of all samples. JSON lines on stdout (the first describes the machine), a table on stderr.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

from layerpress import QuantSpec, ops
from layerpress.cli.common import table, timed_calls
from layerpress.ops.rotation import hadamard, random_signs

from .bench_gemm import machine_info


def run(ms, k, n, block, dtypes, rounds, target_s):
    spec = QuantSpec(4, 128, "oc", False, torch.float16)
    w = torch.randn(n, k) * 0.02
    codes, s, z = ops.quantize(w, spec)
    nq, ns, nz = ops.repack(ops.pack(codes, 4), s, z, spec)
    signs = random_signs(k, 0)
    rows = []
    for dtype in dtypes:
        for m in ms:
            x = torch.randn(m, k).to(dtype)
            impls = {
                "gemm": lambda: ops.gemm(x, nq, ns, nz, None, spec, n),
                "gemm_rotated": lambda: ops.gemm(x, nq, ns, nz, None, spec, n, rot_signs=signs, rot_block=block),
                "hadamard_alone": lambda: hadamard(x, block, signs),
            }
            samples = {name: [] for name in impls}
            for _ in range(rounds):
                for name, fn in impls.items():
                    samples[name] += timed_calls(fn, target_s / rounds)
            med = {name: statistics.median(t) * 1e3 for name, t in samples.items()}
            for name, t in med.items():
                rec = {"kind": "rotation", "impl": name, "M": m, "K": k, "N": n, "bits": 4, "group": 128,
                       "axis": "oc", "block": block, "dtype": str(dtype).replace("torch.", ""),
                       "median_ms": round(t, 5), "samples": len(samples[name]),
                       "ratio_to_gemm": round(t / med["gemm"], 4)}
                print(json.dumps(rec), flush=True)
                rows.append(rec)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ms", default="1,16,128,1024")
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--target-s", type=float, default=2.0, help="seconds per implementation and case")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    print(json.dumps(machine_info()), flush=True)
    rows = run([int(v) for v in a.ms.split(",")], a.k, a.n, a.block,
               [getattr(torch, d) for d in a.dtypes.split(",")], a.rounds, a.target_s)
    print(table(["dtype", "M", "impl", "median ms", "x gemm"],
                [[r["dtype"], str(r["M"]), r["impl"], f"{r['median_ms']:.4f}", f"{r['ratio_to_gemm']:.3f}"]
                 for r in rows]), file=sys.stderr)


if __name__ == "__main__":
    main()
