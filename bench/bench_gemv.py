"""M = 1 low-bit GEMM against the machine's memory bandwidth, with weights larger than the cache.

    python -m bench.bench_gemv                       # Llama-7B MLP shapes, W4/W3/W2, both axes
    python -m bench.bench_gemv --shapes 4096x11008 --bits 4 --rounds 5 --out r.jsonl

Decode streams every weight from DRAM once per token, so a GEMV timed on one weight that stays
in L3 overstates it. Here each case rotates through enough copies of its packed weight that they
take ``--cache-multiple`` times the last-level cache, and the machine's copy bandwidth (a
STREAM-like ``dst.copy_(src)`` of a buffer that size, counted as bytes read plus bytes written) is
timed in the same rounds, interleaved with the GEMVs. Reported per case: the median ms per call,
the packed bytes it reads (codes, scales, zeros), their GB/s and that as a fraction of the copy
bandwidth. torch's ``_weight_int4pack_mm_for_cpu`` (W4, bf16 activations) is timed the same way
as the baseline. One JSON line per measurement on stdout, a table on stderr.
"""
from __future__ import annotations

import argparse
import glob
import statistics
import sys
import time
from typing import List, Optional

import torch

import layerpress
from layerpress import QuantSpec
from layerpress.cli.common import UsageError, int4pack, table, timed_calls

from .bench_gemm import GROUP, INT4PACK, Reporter, layerpress_weight, machine_info, random_weight

SHAPES = [(4096, 11008), (11008, 4096), (4096, 4096)]  # (K, N)


def last_level_cache_bytes() -> int:
    """The largest CPU cache the kernel reports (L3 here), 32 MiB when it says nothing."""
    best = 0
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            text = open(path).read().strip()
        except OSError:
            continue
        unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text[:-1] if text[-1:].isalpha() else text
        if digits.isdigit():
            best = max(best, int(digits) * unit)
    return best or 32 << 20


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def rotating(fns):
    """One callable that runs the next of ``fns`` at each call (a different weight each time)."""
    state = {"i": 0}

    def call():
        i = state["i"]
        state["i"] = (i + 1) % len(fns)
        return fns[i]()
    return call


def parse_shape(text: str):
    try:
        k, n = text.lower().split("x")
        return int(k), int(n)
    except ValueError:
        raise UsageError(f"--shapes: expected KxN such as 4096x11008, got {text!r}") from None


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=[f"{k}x{n}" for k, n in SHAPES],
                    help="KxN (in x out features)")
    ap.add_argument("--bits", nargs="+", type=int, default=[4, 3, 2])
    ap.add_argument("--axes", nargs="+", default=["oc", "ic"], choices=["oc", "ic"])
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median over all)")
    ap.add_argument("--target-s", type=float, default=2.0, help="seconds of calls per case, all rounds")
    ap.add_argument("--cache-multiple", type=float, default=3.0,
                    help="weight copies per case fill this many times the last-level cache")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--variants", nargs="+", default=None,
                    help="CPU GEMM variants to time, each in the same rounds (default: the automatic "
                         "one; opt-in ones such as avx2_lut8 by name)")
    ap.add_argument("--no-baseline", action="store_true", help="skip torch's int4pack")
    ap.add_argument("--resident", action="store_true",
                    help="also time one weight copy called repeatedly (cache-resident when it fits)")
    ap.add_argument("--out", default=None, help="also write the JSON lines here")
    ap.add_argument("--quiet", action="store_true")
    return ap


def run(args) -> int:
    shapes = [parse_shape(s) for s in args.shapes]
    for b in args.bits:
        if b not in (2, 3, 4, 8):
            raise UsageError(f"--bits: expected 2, 3, 4 or 8, got {b}")
    if args.rounds < 1 or args.target_s <= 0 or args.cache_multiple <= 0:
        raise UsageError("--rounds, --target-s and --cache-multiple must be positive")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    reporter = Reporter(args.out, args.quiet)
    log, emit = reporter.log, reporter.emit
    started = time.perf_counter()
    llc = last_level_cache_bytes()
    footprint = int(llc * args.cache_multiple)
    try:
        emit({**machine_info(), "last_level_cache_bytes": llc})
        threads = torch.get_num_threads()
        info = layerpress.build_info()
        known = info["cpu_gemm_variants"] + info["cpu_gemm_opt_in_variants"]
        variants = args.variants or [info["cpu_kernels"]["gemm"]]
        for v in variants:
            if v not in known:
                raise UsageError(f"--variants: {v!r} is not a CPU GEMM variant this machine runs "
                                 f"(it runs {', '.join(known)})")
        src = torch.ones(footprint // 4, dtype=torch.float32)
        dst = torch.empty_like(src)
        copy_bytes = 2 * nbytes(src)
        # The read-only rate (a sum over the same buffer) is the ceiling of a kernel that only
        # reads; the copy rate is the yardstick the issue names.
        items = [({"kind": "copy", "impl": "copy_", "bytes": copy_bytes, "threads": threads},
                  lambda: dst.copy_(src), copy_bytes),
                 ({"kind": "read", "impl": "sum", "bytes": nbytes(src), "threads": threads},
                  lambda: src.sum(), nbytes(src))]
        keep = []
        for si, (K, N) in enumerate(shapes):
            w = random_weight(N, K, seed=si)
            x = torch.randn(1, K, generator=torch.Generator().manual_seed(7))
            base = {"kind": "result", "op": "gemm", "device": "cpu", "M": 1, "K": K, "N": N,
                    "threads": threads, "group_size": GROUP, "dtype": "float32"}
            if not args.no_baseline and 4 in args.bits:
                q, sz = int4pack(w, GROUP)
                copies = max(1, -(-footprint // nbytes(q, sz)))
                ws = [(q.clone(), sz.clone()) for _ in range(copies)]
                keep.append(ws)
                xb = x.to(torch.bfloat16)
                items.append(({**base, "impl": INT4PACK, "bits": 4, "axis": "oc", "dtype": "bfloat16",
                               "copies": copies},
                              rotating([lambda q=q, sz=sz, xb=xb: torch.ops.aten._weight_int4pack_mm_for_cpu(
                                  xb, q, GROUP, sz) for q, sz in ws]), nbytes(q, sz)))
            for bits in args.bits:
                for axis in args.axes:
                    spec = QuantSpec(bits=bits, group_size=GROUP, axis=axis, symmetric=False)
                    q, s, z = layerpress_weight(w, spec)
                    copies = max(1, -(-footprint // nbytes(q, s, z)))
                    ws = [(q.clone(), s.clone(), z.clone()) for _ in range(copies)]
                    keep.append(ws)
                    for variant in variants:
                        fields = {**base, "impl": "layerpress", "variant": variant, "bits": bits,
                                  "axis": axis, "symmetric": False}
                        if args.resident:  # the same weight every call: from cache when it fits
                            items.append(({**fields, "copies": 1},
                                          lambda q=q, s=s, z=z, bits=bits, ax=spec.axis_id, N=N, x=x:
                                          torch.ops.layerpress.gemm(x, q, s, z, None, bits, GROUP, ax, 1, N),
                                          nbytes(q, s, z)))
                        items.append(({**fields, "copies": copies},
                                      rotating([lambda q=q, s=s, z=z, bits=bits, ax=spec.axis_id, N=N, x=x:
                                                torch.ops.layerpress.gemm(x, q, s, z, None, bits, GROUP,
                                                                          ax, 1, N) for q, s, z in ws]),
                                      nbytes(q, s, z)))
            log(f"# K={K} N={N}: weights ready ({time.perf_counter() - started:.0f} s)")
        samples: List[List[float]] = [[] for _ in items]
        with torch.inference_mode():
            for r in range(args.rounds):
                log(f"# round {r + 1}/{args.rounds}, {len(items)} timings")
                for i, (fields, fn, _) in enumerate(items):
                    layerpress.set_cpu_gemm_variant(fields.get("variant", ""))
                    try:
                        samples[i] += timed_calls(fn, args.target_s / args.rounds)
                    finally:
                        layerpress.set_cpu_gemm_variant("")
        copy_gbs = copy_bytes / statistics.median(samples[0]) / 1e9
        read_gbs = nbytes(src) / statistics.median(samples[1]) / 1e9
        rows = []
        for (fields, _, moved), t in zip(items, samples):
            med = statistics.median(t)
            gbs = moved / med / 1e9
            rec = {**fields, "median_ms": round(med * 1e3, 5), "repeats": len(t),
                   "rounds": args.rounds, "bytes": moved, "gb_per_s": round(gbs, 3)}
            if fields["kind"] == "result":
                rec["fraction_of_copy"] = round(gbs / copy_gbs, 4)
                rec["fraction_of_read"] = round(gbs / read_gbs, 4)
                rows.append([f"{fields['K']}x{fields['N']}", fields.get("variant", fields["impl"]),
                             str(fields["bits"]),
                             str(fields["copies"]),
                             fields["axis"], f"{med * 1e3:.3f}", f"{gbs:.1f}", f"{gbs / copy_gbs:.0%}",
                             f"{gbs / read_gbs:.0%}"])
            emit(rec)
    finally:
        reporter.close()
    if not args.quiet:
        print(f"copy bandwidth {copy_gbs:.1f} GB/s (read + write), read {read_gbs:.1f} GB/s, "
              f"{threads} threads, {footprint >> 20} MiB per case", file=sys.stderr)
        print(table(["K x N", "impl", "bits", "copies", "axis", "ms", "GB/s", "of copy", "of read"], rows),
              file=sys.stderr)
        log(f"# {time.perf_counter() - started:.0f} s")
    return 0


def main(argv: Optional[List[str]] = None, prog: Optional[str] = None) -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        return run(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
