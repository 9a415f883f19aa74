"""The rotated CPU GEMM against the unrotated one, side by side in one run (issue 22 target:
rotated within 1.05x at M = 1, 16, 128, 1024).

    python -m bench.bench_rotation [--ms 1,16,128,1024] [--k 4096 --n 4096] [--block 128] [--out F]

For each M and activation dtype: ``layerpress.ops.gemm`` on a W4 g128 weight without a rotation
and with ``rot_signs``/``rot_block`` (the launcher rotates the activation rows, then the same
kernel runs), called alternately in pairs (medians of each, and the median of the per-pair
ratios, which a shared machine's slow moments disturb least), and the ``hadamard`` op alone.
JSON lines on stdout (the first describes the machine), a table on stderr.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from layerpress import QuantSpec, ops
from layerpress.cli.common import table, timed_calls
from layerpress.ops.rotation import hadamard, random_signs

from .bench_gemm import machine_info


def paired_times(fa, fb, target_s, min_pairs=9, max_pairs=4000):
    """Alternating calls a, b, b, a, a, b, ... (after a warm-up of each): per pair the two wall
    times, so that a slow moment of a shared machine hits both members of a pair."""
    fa(), fb()
    t0 = time.perf_counter()
    fa()
    est = time.perf_counter() - t0
    pairs = int(min(max_pairs, max(min_pairs, target_s / max(2 * est, 1e-7))))
    ta, tb = [], []
    for i in range(pairs):
        order = ((fa, ta), (fb, tb)) if i % 2 == 0 else ((fb, tb), (fa, ta))
        for fn, out in order:
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
    return ta, tb


def run(ms, k, n, block, dtypes, target_s):
    spec = QuantSpec(4, 128, "oc", False, torch.float16)
    w = torch.randn(n, k) * 0.02
    codes, s, z = ops.quantize(w, spec)
    nq, ns, nz = ops.repack(ops.pack(codes, 4), s, z, spec)
    signs = random_signs(k, 0)
    rows = []
    for dtype in dtypes:
        for m in ms:
            x = torch.randn(m, k).to(dtype)
            plain = lambda: ops.gemm(x, nq, ns, nz, None, spec, n)  # noqa: E731
            rotated = lambda: ops.gemm(x, nq, ns, nz, None, spec, n, rot_signs=signs, rot_block=block)  # noqa: E731
            ta, tb = paired_times(plain, rotated, target_s)
            th = timed_calls(lambda: hadamard(x, block, signs), min(target_s, 1.0))
            med = {"gemm": statistics.median(ta), "gemm_rotated": statistics.median(tb),
                   "hadamard_alone": statistics.median(th)}
            pair_ratio = statistics.median(b_ / a_ for a_, b_ in zip(ta, tb))
            for name, t in med.items():
                rec = {"kind": "rotation", "impl": name, "M": m, "K": k, "N": n, "bits": 4, "group": 128,
                       "axis": "oc", "block": block, "dtype": str(dtype).replace("torch.", ""),
                       "median_ms": round(t * 1e3, 5), "samples": len(th if name == "hadamard_alone" else ta),
                       "ratio_to_gemm": round(t / med["gemm"], 4)}
                if name == "gemm_rotated":
                    rec["median_paired_ratio"] = round(pair_ratio, 4)
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
    ap.add_argument("--target-s", type=float, default=2.0, help="seconds per implementation and case")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    print(json.dumps(machine_info()), flush=True)
    rows = run([int(v) for v in a.ms.split(",")], a.k, a.n, a.block,
               [getattr(torch, d) for d in a.dtypes.split(",")], a.target_s)
    print(table(["dtype", "M", "impl", "median ms", "x gemm", "paired ratio"],
                [[r["dtype"], str(r["M"]), r["impl"], f"{r['median_ms']:.4f}", f"{r['ratio_to_gemm']:.3f}",
                  f"{r['median_paired_ratio']:.3f}" if "median_paired_ratio" in r else ""]
                 for r in rows]), file=sys.stderr)


if __name__ == "__main__":
    main()
