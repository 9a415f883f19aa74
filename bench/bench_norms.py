"""Fused norm benchmark: layerpress RMSNorm / add+RMSNorm / LayerNorm against PyTorch eager and
``torch.compile`` of the same function, side by side in one run.

    python -m bench.bench_norms                  # hidden 1024/4096/16384 x tokens 4096/16384
    python -m bench.bench_norms --quick          # hidden 4096 x 2048 tokens only
    python -m bench.bench_norms --cases op=rms_norm dtype=bf16 hidden=4096 tokens=2048 mode=fwd

Modes: ``fwd`` (inference mode) and ``fwdbwd`` (forward + backward with input, weight (and bias)
gradients). Each timing is the median of repeated calls after a warm-up (``measure`` of
bench_gemm). Output: one JSON line per (case, implementation) on stdout (the first line, kind
"machine", describes the machine and its load average), then a readable table on stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

import layerpress
from layerpress import norm_ops

from .bench_gemm import (Reporter, UsageError, fmt_ms, fmt_ratio, machine_info, measure,
                         print_aligned_table)

OPS = ["rms_norm", "add_rms_norm", "layer_norm"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DTYPE_ALIASES = {"float32": "float32", "fp32": "float32", "f32": "float32",
                 "bfloat16": "bfloat16", "bf16": "bfloat16"}
HIDDEN = [1024, 4096, 16384]
TOKENS = [4096, 16384]
QUICK = ([4096], [2048])
MODES = ["fwd", "fwdbwd"]
EPS = 1e-6


def eager_fn(op: str):
    if op == "rms_norm":
        return lambda x, r, w, b: F.rms_norm(x, (x.shape[-1],), w, EPS)
    if op == "add_rms_norm":
        def f(x, r, w, b):
            h = x + r
            return F.rms_norm(h, (h.shape[-1],), w, EPS), h
        return f
    return lambda x, r, w, b: F.layer_norm(x, (x.shape[-1],), w, b, EPS)


def layerpress_fn(op: str):
    if op == "rms_norm":
        return lambda x, r, w, b: norm_ops.rms_norm(x, w, EPS)
    if op == "add_rms_norm":
        return lambda x, r, w, b: norm_ops.add_rms_norm(x, r, w, EPS)
    return lambda x, r, w, b: norm_ops.layer_norm(x, w, b, EPS)


def parse_cases(items) -> Dict[str, set]:
    filt: Dict[str, set] = {}
    for item in items or []:
        for tok in item.replace(";", " ").split():
            if "=" not in tok:
                raise UsageError(f"--cases: expected KEY=V1,V2 (keys op, dtype, hidden, tokens, mode), got {tok!r}")
            key, vals = tok.split("=", 1)
            key = key.strip().lower()
            values = [v.strip() for v in vals.split(",") if v.strip()]
            try:
                if key in ("hidden", "tokens"):
                    parsed = {int(v) for v in values}
                elif key == "dtype":
                    parsed = {DTYPE_ALIASES[v.lower()] for v in values}
                elif key == "op":
                    parsed = set(values)
                    if not parsed <= set(OPS):
                        raise ValueError
                elif key == "mode":
                    parsed = set(values)
                    if not parsed <= set(MODES):
                        raise ValueError
                else:
                    raise UsageError(f"--cases: unknown key {key!r} (keys: op, dtype, hidden, tokens, mode)")
            except (ValueError, KeyError):
                raise UsageError(f"--cases: bad value in {tok!r}") from None
            filt[key] = filt.get(key, set()) | parsed
    return filt


def plan_cases(quick: bool, filt: Dict[str, set]) -> List[dict]:
    hidden, tokens = QUICK if quick else (HIDDEN, TOKENS)
    hidden = sorted(filt.get("hidden", hidden))
    tokens = sorted(filt.get("tokens", tokens))
    cases = []
    for mode in MODES:
        for dtype in DTYPES:
            for h in hidden:
                for t in tokens:
                    for op in OPS:
                        c = {"op": op, "dtype": dtype, "hidden": h, "tokens": t, "mode": mode}
                        if all(c[k] in v for k, v in filt.items() if k not in ("hidden", "tokens")):
                            cases.append(c)
    return cases


def make_runner(fn, mode: str, x, r, w, b, gy):
    if mode == "fwd":
        def run():
            with torch.inference_mode():
                fn(x, r, w, b)
        return run
    leaves = [t for t in (x, r, w, b) if t is not None]

    def run_bwd():
        for t in leaves:
            t.grad = None
        out = fn(x, r, w, b)
        outs = list(out) if isinstance(out, tuple) else [out]
        torch.autograd.backward(outs, [gy] * len(outs))
    return run_bwd


def print_table(results: List[dict], file) -> None:
    rows = {}
    for r in results:
        if r.get("kind") != "result":
            continue
        key = (r["mode"], r["op"], r["dtype"], r["hidden"], r["tokens"])
        rows.setdefault(key, {})[r["impl"]] = r["median_ms"]
    if not rows:
        return
    head = ["mode", "op", "dtype", "hidden", "tokens", "layerpress", "eager", "compile", "GB/s lp",
            "vs eager", "vs compile"]
    out = []
    for key, d in rows.items():
        mode, op, dtype, h, t = key
        lp = d.get("layerpress")
        nbytes = h * t * (4 if dtype == "float32" else 2) * (4 if op == "add_rms_norm" else 2)
        gbs = f"{nbytes / (lp * 1e-3) / 1e9:.1f}" if (lp and mode == "fwd") else "-"
        out.append([mode, op, "fp32" if dtype == "float32" else "bf16", str(h), str(t), fmt_ms(lp),
                    fmt_ms(d.get("eager")), fmt_ms(d.get("compile")), gbs,
                    fmt_ratio(d.get("eager"), lp), fmt_ratio(d.get("compile"), lp)])
    print_aligned_table("CPU fused norms, median ms per call ('vs X' = X's time / layerpress's "
                        "time, >1 means layerpress is faster; GB/s = bytes read + written by the "
                        "forward / time)", head, out, file)


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog or "python -m bench.bench_norms",
        description="CPU fused-norm benchmark: layerpress vs PyTorch eager and torch.compile, in one "
                    "run. JSON lines go to stdout, a readable table to stderr.")
    p.add_argument("--quick", action="store_true", help="only hidden 4096 x 2048 tokens")
    p.add_argument("--out", metavar="FILE", help="also write the JSON lines to FILE")
    p.add_argument("--cases", nargs="+", metavar="KEY=V1,V2",
                   help="filter cases; keys op (rms_norm, add_rms_norm, layer_norm), dtype (fp32/bf16), "
                        "hidden, tokens, mode (fwd/fwdbwd)")
    p.add_argument("--target-s", type=float, default=0.5, metavar="S",
                   help="seconds of timed calls per measurement (default 0.5)")
    p.add_argument("--threads", type=int, metavar="T", help="torch.set_num_threads(T)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--list", action="store_true", help="list the selected cases and exit")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    return p


def run(args) -> int:
    cases = plan_cases(args.quick, parse_cases(args.cases))
    if not cases:
        raise UsageError("no case matches --cases " + " ".join(args.cases or []))
    if args.list:
        for c in cases:
            print(json.dumps(c))
        return 0
    if args.target_s <= 0:
        raise UsageError("--target-s must be positive")
    if args.threads is not None:
        if args.threads < 1:
            raise UsageError("--threads must be >= 1")
        torch.set_num_threads(args.threads)

    reporter = Reporter(args.out, args.quiet)
    log, emit, results = reporter.log, reporter.emit, reporter.results

    started = time.perf_counter()
    try:
        info = machine_info()
        info["loadavg"] = list(os.getloadavg())
        info["cpu_norm_kernel"] = os.environ.get("LAYERPRESS_CPU_NORM_KERNEL", "automatic")
        emit(info)
        compiled = {}
        for c in cases:
            dt = DTYPES[c["dtype"]]
            g = torch.Generator().manual_seed(c["hidden"] + c["tokens"])
            shape = (c["tokens"], c["hidden"])
            bwd = c["mode"] == "fwdbwd"
            x = torch.randn(shape, generator=g).to(dt).requires_grad_(bwd)
            r = torch.randn(shape, generator=g).to(dt).requires_grad_(bwd) if c["op"] == "add_rms_norm" else None
            w = (1 + 0.1 * torch.randn(c["hidden"], generator=g)).to(dt).requires_grad_(bwd)
            b = (0.1 * torch.randn(c["hidden"], generator=g)).to(dt).requires_grad_(bwd) \
                if c["op"] == "layer_norm" else None
            gy = torch.randn(shape, generator=g).to(dt) if bwd else None
            impls = [("layerpress", layerpress_fn(c["op"])), ("eager", eager_fn(c["op"]))]
            if not args.no_compile:
                key = (c["op"], c["mode"])
                if key not in compiled:
                    compiled[key] = torch.compile(eager_fn(c["op"]), dynamic=False)
                impls.append(("compile", compiled[key]))
            log(f"# {c['mode']} {c['op']} {c['dtype']} hidden={c['hidden']} tokens={c['tokens']}")
            for name, fn in impls:
                ms, n = measure(make_runner(fn, c["mode"], x, r, w, b, gy), args.target_s)
                emit({"kind": "result", "device": "cpu", "threads": torch.get_num_threads(), **c,
                      "impl": name, "median_ms": round(ms, 5), "repeats": n,
                      "loadavg1": round(os.getloadavg()[0], 2)})
        emit({"kind": "done", "seconds": round(time.perf_counter() - started, 1),
              "loadavg": list(os.getloadavg())})
    finally:
        reporter.close()
    print_table(results, sys.stderr)
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run(args)
    except UsageError as e:
        parser.error(str(e))
        return 2


if __name__ == "__main__":
    sys.exit(main())
