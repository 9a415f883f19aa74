"""Median ratios over several `bench.bench_gemm` runs (JSON-lines files), one row per case.

    python -m bench.gemm_runs_summary run1.jsonl run2.jsonl ... [--markdown]

A single run on a shared machine can be off by tens of percent; the README quotes the median over
six interleaved runs. For every layerpress case (M, K, N, bits, axis, activation dtype) each run
gives the ratio baseline time / layerpress time for F.linear fp32, F.linear bf16 and int4pack
(> 1: layerpress faster); this prints, per case, the median layerpress time and the median and
range of each ratio over the runs.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from typing import Dict, List, Tuple

from .bench_gemm import INT4PACK, fmt_ms, print_aligned_table

BASELINES = (("F.linear", "float32", "vs fp32"), ("F.linear", "bfloat16", "vs bf16"),
             (INT4PACK, "bfloat16", "vs int4pack"))


def read_run(path: str) -> List[dict]:
    with open(path) as f:
        return [d for d in (json.loads(line) for line in f if line.strip().startswith("{"))
                if d.get("kind") == "result" and d.get("source") != "cpp"]


def run_ratios(results: List[dict]) -> Dict[Tuple, Dict[str, float]]:
    """case -> {"ms": ours, "vs fp32": r, ...} for one run."""
    base = {(r["M"], r["K"], r["N"], r["impl"], r["dtype"]): r["median_ms"]
            for r in results if r["impl"] != "layerpress"}
    out = {}
    for r in results:
        if r["impl"] != "layerpress":
            continue
        case = (r["M"], r["K"], r["N"], r["bits"], r["axis"], r["dtype"])
        row = {"ms": r["median_ms"]}
        for impl, dtype, name in BASELINES:
            b = base.get((r["M"], r["K"], r["N"], impl, dtype))
            if b is not None:
                row[name] = b / r["median_ms"]
        out[case] = row
    return out


def summarize(paths: List[str]) -> List[dict]:
    runs = [run_ratios(read_run(p)) for p in paths]
    cases = sorted({c for run in runs for c in run})
    rows = []
    for case in cases:
        per = [run[case] for run in runs if case in run]
        row = {"M": case[0], "K": case[1], "N": case[2], "bits": case[3], "axis": case[4],
               "dtype": case[5], "runs": len(per), "median_ms": statistics.median(p["ms"] for p in per)}
        for _, _, name in BASELINES:
            vals = sorted(p[name] for p in per if name in p)
            if vals:
                row[name] = {"median": statistics.median(vals), "min": vals[0], "max": vals[-1]}
        rows.append(row)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gemm_runs_summary", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="JSON-lines files written by bench.bench_gemm --out")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table (for the README)")
    args = p.parse_args(argv)
    rows = summarize(args.runs)
    for r in rows:
        print(json.dumps({"kind": "summary", **r}))

    def ratio(r, name):
        v = r.get(name)
        return "-" if v is None else f"{v['median']:.2f}× ({v['min']:.2f}–{v['max']:.2f})"

    head = ["M", "K", "N", "bits", "axis", "act", "layerpress ms", "vs fp32", "vs bf16", "vs int4pack"]
    table_rows = [[str(r["M"]), str(r["K"]), str(r["N"]), str(r["bits"]), r["axis"],
                   "fp32" if r["dtype"] == "float32" else "bf16", fmt_ms(r["median_ms"]),
                   ratio(r, "vs fp32"), ratio(r, "vs bf16"), ratio(r, "vs int4pack")] for r in rows]
    if args.markdown:
        print("| " + " | ".join(head) + " |", file=sys.stderr)
        print("|" + "---|" * len(head), file=sys.stderr)
        for t in table_rows:
            print("| " + " | ".join(t) + " |", file=sys.stderr)
    else:
        print_aligned_table(f"median over {len(args.runs)} runs (range in brackets)", head, table_rows,
                            sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
