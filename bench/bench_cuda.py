"""GPU benchmark suites: layerpress's CUDA GEMM, fused norms and WTA-CRS linear against PyTorch's
own CUDA baselines, side by side in one run (SPEC.md §3).

    python -m bench.bench_cuda --quick --out bench_cuda.jsonl     # what scripts/gpu_check.sh runs
    python -m bench.bench_cuda --suite gemm --cases M=1,16 bits=4 axis=oc dtype=bf16
    python -m bench.bench_cuda --dry-run --quick                   # list the cases; no CUDA needed

Suites (``--suite gemm,norms,wtacrs,gemm_cpp``, default the first three):

- **gemm**: ``torch.ops.layerpress.gemm`` on ``Layout.CUDA_MMA`` (the tensor-core kernel's layout,
  what ``QuantLinear`` uses on CUDA; ``--layout canonical`` times the simple kernel instead), fp16 and bf16 activations, asymmetric RTN group 128, W4 per-OC and per-IC (plus W2/W3/W8
  per-OC in the full run), against ``F.linear`` fp16/bf16 (cuBLAS) and
  ``torch.ops.aten._weight_int4pack_mm`` (tinygemm, bf16 activations, W4 g128 with the same codes).
  Every case checks the layerpress result against the float64 dequantise-then-matmul reference
  (``max_rel_err`` = max |y - ref| / max |ref|; ``ok`` false and the case counted failed above
  ``tol``). Timing: CUDA events around a CUDA graph of ``inner`` calls (back-to-back launches when
  capture fails: field ``timing``), median over ``repeats``; several weight copies (> 4x the L2 in
  all) rotated so the weights are read from HBM (field ``l2``). ``gbps`` counts the packed weight,
  scales, zeros, activations and output once per call; ``frac_copy`` divides it by the
  device-to-device copy bandwidth measured at the start of the run (kind "copy_bandwidth").
- **gemm_cpp**: the C++ binary ``bench_gemm_cuda`` (bench/cpp/bench_gemm_cuda.cu, no Python in the
  timed loop): the tensor-core GEMM against cuBLAS ``cublasGemmEx`` fp16 in the same process, L2
  flushed before every call, K = N = 8192 and Llama-7B's 4096 x 11008 / 11008 x 4096, g128
  asymmetric; its JSON lines are passed through (kind "result", suite "gemm_cpp", field
  ``speedup`` = cuBLAS time / ours). cuBLAS comes from the CUDA torch's ``nvidia.cublas`` wheel.
- **norms**: layerpress RMSNorm, add+RMSNorm, LayerNorm (``layerpress.norm_ops``) against eager
  ``F.rms_norm``/``F.layer_norm`` and ``torch.compile`` of the same eager function (compiled for a
  few cases only: warm-up is expensive), forward (inference mode) and forward+backward; L2 flushed
  (a memset of 4x the L2) before every timed call; GB/s from a minimal byte count (``bytes``).
- **wtacrs**: one training step (forward, backward, SGD) of ``WTACRSLinear`` against a dense
  ``nn.Linear`` of the same size: median step time and the peak CUDA memory of the step
  (``torch.cuda.max_memory_allocated`` above what was allocated before it) and the memory kept by
  the forward for backward.

Output: one JSON line per measurement on stdout (the first, kind "machine", names the GPU, its
compute capability, torch/CUDA versions, the driver and the commit), then readable tables on
stderr (ratios = baseline time / layerpress time, > 1 means layerpress is faster). Exit status:
0 all ran and were correct, 1 some case failed or was wrong, 2 no CUDA / bad usage.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from .bench_gemm import (Reporter, UsageError, fmt_ratio, machine_info, print_aligned_table)
from .bench_norms import eager_fn, layerpress_fn, make_runner  # the same functions as the CPU suite

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUITES = ["gemm", "norms", "wtacrs", "gemm_cpp"]
DEFAULT_SUITES = ["gemm", "norms", "wtacrs"]
# bench_gemm_cuda runs: (shapes KxN, M list, bits, axes); quick is what scripts/gpu_check.sh runs
CPP_RUNS_QUICK = [("8192x8192", "1,16,64,128,512", "4", "0,1"), ("8192x8192", "1,16", "2,3,8", "0"),
                  ("4096x11008,11008x4096", "1,16,128", "4", "0")]
CPP_RUNS_FULL = [("8192x8192,4096x11008,11008x4096", "1,16,32,64,128,256,512,1024", "2,3,4,8", "0,1")]
GROUP = 128
DTYPE_ALIASES = {"fp16": "float16", "float16": "float16", "half": "float16",
                 "bf16": "bfloat16", "bfloat16": "bfloat16"}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
INT4PACK = "aten._weight_int4pack_mm"
FLINEAR = "F.linear"
COMPILE = "torch.compile"

GEMM_SHAPES_QUICK = [(8192, 8192), (4096, 11008)]            # (K = in features, N = out features)
GEMM_SHAPES_FULL = [(8192, 8192), (4096, 11008), (11008, 4096)]
GEMM_MS_QUICK = [1, 16, 128]
GEMM_MS_FULL = [1, 4, 16, 32, 64, 128, 256]
GEMM_SPECS_QUICK = [(4, "oc"), (4, "ic")]
GEMM_SPECS_FULL = [(4, "oc"), (4, "ic"), (2, "oc"), (3, "oc"), (8, "oc")]
NORM_OPS = ["rms_norm", "add_rms_norm", "layer_norm"]
NORM_HIDDEN_QUICK = [4096]
NORM_HIDDEN_FULL = [1024, 4096, 8192]
NORM_TOKENS = [4096, 16384]
NORM_MODES = ["fwd", "fwdbwd"]
WTACRS_SHAPES = [(4096, 4096, 8192)]  # (in, out, tokens)
WTACRS_RATIO = 0.3


# ---- plan ------------------------------------------------------------------------------------------

def parse_cases(items) -> Dict[str, set]:
    """``KEY=V1,V2`` filters. Keys: M, K, N, bits, axis, dtype, op, hidden, tokens, mode."""
    filt: Dict[str, set] = {}
    for item in items or []:
        if "=" not in item:
            raise UsageError(f"--cases: expected KEY=V1,V2, got {item!r}")
        key, vals = item.split("=", 1)
        key = key.strip()
        vs = [v.strip() for v in vals.split(",") if v.strip()]
        if key in ("M", "K", "N", "bits", "hidden", "tokens"):
            try:
                filt[key] = {int(v) for v in vs}
            except ValueError:
                raise UsageError(f"--cases {key}: integers expected, got {vals!r}") from None
        elif key == "dtype":
            bad = [v for v in vs if v not in DTYPE_ALIASES]
            if bad:
                raise UsageError(f"--cases dtype: unknown {bad} (fp16, bf16)")
            filt[key] = {DTYPE_ALIASES[v] for v in vs}
        elif key in ("axis", "op", "mode"):
            filt[key] = set(vs)
        else:
            raise UsageError(f"--cases: unknown key {key!r} (M, K, N, bits, axis, dtype, op, "
                             "hidden, tokens, mode)")
    return filt


def _keep(case: dict, filt: Dict[str, set]) -> bool:
    return all(case[k] in v for k, v in filt.items() if k in case)


def plan(suites: List[str], quick: bool, filt: Dict[str, set], compile_norms: bool) -> List[dict]:
    cases: List[dict] = []
    if "gemm" in suites:
        shapes = GEMM_SHAPES_QUICK if quick else GEMM_SHAPES_FULL
        for k, n in shapes:  # one quantised weight per (shape, spec): it is built once
            for bits, axis in (GEMM_SPECS_QUICK if quick else GEMM_SPECS_FULL):
                for dtype in ("float16", "bfloat16"):
                    base = [f"{FLINEAR} {dtype}"] + ([INT4PACK] if dtype == "bfloat16" else [])
                    for m in (GEMM_MS_QUICK if quick else GEMM_MS_FULL):
                        c = {"suite": "gemm", "M": m, "K": k, "N": n, "bits": bits, "axis": axis,
                             "group": GROUP, "dtype": dtype, "impls": ["layerpress"] + base}
                        if _keep(c, filt):
                            cases.append(c)
    if "norms" in suites:
        for hidden in (NORM_HIDDEN_QUICK if quick else NORM_HIDDEN_FULL):
            for tokens in NORM_TOKENS:
                for dtype in ("bfloat16", "float16"):
                    for mode in NORM_MODES:
                        for op in NORM_OPS:
                            # torch.compile warm-up costs seconds per case: bf16 at 4096 tokens only
                            comp = compile_norms and dtype == "bfloat16" and tokens == 4096 and (
                                not quick or mode == "fwd" or op == "rms_norm")
                            c = {"suite": "norms", "op": op, "dtype": dtype, "hidden": hidden,
                                 "tokens": tokens, "mode": mode,
                                 "impls": ["layerpress", "eager " + _eager_name(op)]
                                 + ([COMPILE] if comp else [])}
                            if _keep(c, filt):
                                cases.append(c)
    if "wtacrs" in suites:
        for fin, fout, tokens in WTACRS_SHAPES:
            c = {"suite": "wtacrs", "in": fin, "out": fout, "tokens": tokens, "dtype": "bfloat16",
                 "ratio": WTACRS_RATIO, "impls": ["WTACRSLinear", "nn.Linear"]}
            if _keep(c, filt):
                cases.append(c)
    return cases


def _eager_name(op: str) -> str:
    return {"rms_norm": "F.rms_norm", "add_rms_norm": "add+F.rms_norm",
            "layer_norm": "F.layer_norm"}[op]


# ---- machine ---------------------------------------------------------------------------------------

def _run_text(cmd: List[str]) -> Optional[str]:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=REPO_ROOT)
        return r.stdout.strip() if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def gpu_machine_info() -> dict:
    d = machine_info()  # CPU, torch, python, layerpress.build_info(), time
    props = torch.cuda.get_device_properties(0)
    d.update({
        "gpu": torch.cuda.get_device_name(0),
        "compute_capability": "%d.%d" % torch.cuda.get_device_capability(0),
        "gpu_memory_gib": round(props.total_memory / 2**30, 1),
        "sm_count": props.multi_processor_count,
        "l2_bytes": l2_bytes(),
        "torch_cuda": torch.version.cuda,
        "driver": _run_text(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
        "commit": _run_text(["git", "rev-parse", "HEAD"]),
        "dirty": bool(_run_text(["git", "status", "--short", "--untracked-files=no"])),
    })
    return d


def l2_bytes() -> int:
    return int(getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0) or 50 * 2**20)


# ---- timing ----------------------------------------------------------------------------------------

def _events_ms(fn: Callable[[], object], repeats: int, before: Optional[Callable[[], object]] = None):
    """Median and all times (ms) of ``fn()`` between two CUDA events, ``before()`` (an L2 flush)
    queued ahead of each start event."""
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times), times


def time_rotated(calls: List[Callable[[], object]], inner: int, repeats: int, use_graph: bool = True):
    """Per-call time (ms) of the calls in ``calls`` (one per weight copy), rotated: a CUDA graph
    of ``inner`` calls replayed ``repeats`` times (or, when capture fails, ``inner`` back-to-back
    launches), median of the replays / inner. Returns (median_ms, timing label)."""
    for c in calls:  # warm-up (lazy initialisation, cuBLAS handles, autotuning)
        c()
    torch.cuda.synchronize()
    if use_graph:
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for c in calls:
                    c()
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for i in range(inner):
                    calls[i % len(calls)]()
            g.replay()
            torch.cuda.synchronize()
            med, _ = _events_ms(g.replay, repeats)
            del g
            return med / inner, f"cuda graph of {inner} calls, median of {repeats} replays"
        except Exception as e:  # capture not supported by some op: fall back
            torch.cuda.synchronize()
            label = f"back-to-back ({type(e).__name__} in graph capture)"
    else:
        label = "back-to-back"

    def block():
        for i in range(inner):
            calls[i % len(calls)]()
    med, _ = _events_ms(block, repeats)
    return med / inner, f"{label}: {inner} launches, median of {repeats}"


def copy_bandwidth(reporter: Reporter, repeats: int) -> float:
    """Device-to-device copy bandwidth (GB/s, bytes read + written) of a 1 GiB tensor."""
    n = 2**30
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    med, _ = _events_ms(lambda: dst.copy_(src), repeats)
    gbps = 2 * n / (med * 1e-3) / 1e9
    reporter.emit({"kind": "copy_bandwidth", "bytes": n, "median_ms": med, "gbps": gbps,
                   "how": "dst.copy_(src), 1 GiB uint8, bytes read + written, CUDA events"})
    del src, dst
    torch.cuda.empty_cache()
    return gbps


def make_flush():
    buf = torch.empty(4 * l2_bytes(), dtype=torch.uint8, device="cuda")
    return (lambda: buf.zero_()), f"flushed: memset of {buf.numel() >> 20} MiB (4x L2) before each call"


# ---- gemm ------------------------------------------------------------------------------------------

def int4pack_cuda(codes: torch.Tensor, s: torch.Tensor, z: torch.Tensor, inner_k_tiles: int = 8):
    """layerpress W4 g128 per-OC codes [N, K] uint8, scales/zeros [N, K/g] -> the CUDA tinygemm
    layout: ``_convert_weight_to_int4pack`` takes uint8 [N, K/2] (even k in the high nibble) on
    the GPU; tinygemm computes (q - 8)·scale + zero, so zero = (8 - z)·s; scales_and_zeros bf16
    [K/g, N, 2]."""
    c = codes.to(torch.int32)
    u8 = ((c[:, ::2] << 4) | c[:, 1::2]).to(torch.uint8).cuda()
    packed = torch.ops.aten._convert_weight_to_int4pack(u8, inner_k_tiles)
    sf = s.float()
    sz = torch.stack([sf, (8.0 - z.float()) * sf], dim=-1).transpose(0, 1).contiguous()
    return packed, sz.to(torch.bfloat16).cuda()


def _nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def _copies_for(weight_bytes: int) -> int:
    return int(min(16, max(2, math.ceil(4 * l2_bytes() / max(weight_bytes, 1)))))


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    y = y.double()
    if not torch.isfinite(y).all():
        return float("inf")
    return ((y - ref).abs().max() / ref.abs().max().clamp_min(1e-300)).item()


def run_gemm(cases: List[dict], reporter: Reporter, args, copy_gbps: float) -> int:
    from layerpress import Layout, QuantSpec, ops
    failures = 0
    repeats = 10 if args.quick else 30
    weights: Dict[tuple, tuple] = {}   # (K, N, bits, axis) -> CPU (codes, q, s, z), GPU copies, ref w
    dense: Dict[tuple, list] = {}      # (K, N, dtype) -> GPU weight copies
    i4: Dict[tuple, list] = {}
    baseline_done = set()
    layout = Layout.CUDA_MMA if args.layout == "cuda_mma" else Layout.CANONICAL

    def get_weight(k, n, bits, axis):
        key = (k, n, bits, axis)
        if key not in weights:
            weights.clear()            # one quantised weight on the GPU at a time
            torch.cuda.empty_cache()
            spec = QuantSpec(bits=bits, group_size=GROUP, axis=axis, scale_dtype=torch.float16)
            g = torch.Generator().manual_seed(k * 31 + n)
            w = torch.randn(n, k, generator=g) * 0.02
            codes, s, z = ops.quantize(w, spec)
            q = ops.pack(codes, bits)
            w_ref = ops.dequantize(q, s, z, spec, torch.float32).cuda().double()  # CPU op: verified
            dev = (q.cuda(), s.cuda(), z.cuda())
            if args.layout == "cuda_mma":
                dev = ops.repack(*dev, spec, Layout.CUDA_MMA)
            nb = _nbytes(*dev)
            copies = [dev] + [tuple(t.clone() for t in dev) for _ in range(_copies_for(nb) - 1)]
            weights[key] = (spec, codes, s, z, copies, w_ref, w)
        return weights[key]

    for c in cases:
        k, n, m, dtype = c["K"], c["N"], c["M"], DTYPES[c["dtype"]]
        rec = {"kind": "result", "suite": "gemm", **{x: c[x] for x in ("M", "K", "N", "bits", "axis",
                                                                       "group", "dtype")}}
        try:
            spec, codes, s, z, copies, w_ref, w = get_weight(k, n, c["bits"], c["axis"])
            g = torch.Generator(device="cuda").manual_seed(m)
            x = torch.randn(m, k, generator=g, device="cuda").to(dtype)
            ref = x.double() @ w_ref.t()
            with torch.no_grad():
                y = ops.gemm(x, *copies[0], None, spec, n, layout)
            torch.cuda.synchronize()
            err = _rel_err(y, ref)
            tol = 2 * torch.finfo(dtype).eps
            ok = err <= tol
            calls = [lambda t=t: ops.gemm(x, *t, None, spec, n, layout) for t in copies]
            inner = len(calls) * math.ceil(48 / len(calls))
            with torch.no_grad():
                ms, timing = time_rotated(calls, inner, repeats, use_graph=not args.no_graphs)
            moved = _nbytes(*copies[0], x, y)
            gbps = moved / (ms * 1e-3) / 1e9
            rec.update({"impl": "layerpress", "layout": args.layout, "median_ms": ms, "us": ms * 1e3, "bytes": moved,
                        "gbps": gbps, "frac_copy": gbps / copy_gbps, "max_rel_err": err, "tol": tol,
                        "ok": ok, "timing": timing,
                        "l2": f"rotate {len(copies)} weight copies "
                              f"({len(copies) * _nbytes(*copies[0]) >> 20} MiB, L2 {l2_bytes() >> 20} MiB)"})
            if not ok:
                failures += 1
                reporter.log(f"gemm WRONG: {c} max_rel_err {err:.3e} > {tol:.3e}")
        except Exception as e:  # record and go on: the point is to learn which kernels fail
            failures += 1
            rec.update({"impl": "layerpress", "ok": False, "error": f"{type(e).__name__}: {e}"[:500]})
            reporter.log(f"gemm FAILED: {c}: {rec['error']}")
        reporter.emit(rec)
        torch.cuda.synchronize() if torch.cuda.is_available() else None

        # baselines, once per (M, K, N, dtype)
        bkey = (m, k, n, c["dtype"])
        if args.no_baselines or bkey in baseline_done:
            continue
        baseline_done.add(bkey)
        try:
            dkey = (k, n, c["dtype"])
            if dkey not in dense:
                dense.clear()
                torch.cuda.empty_cache()
                w0 = w.to(dtype).cuda()
                dense[dkey] = [w0] + [w0.clone() for _ in range(_copies_for(_nbytes(w0)) - 1)]
            ws = dense[dkey]
            x = torch.randn(m, k, generator=torch.Generator(device="cuda").manual_seed(m),
                            device="cuda").to(dtype)
            with torch.no_grad():
                y = F.linear(x, ws[0])
                ms, timing = time_rotated([lambda t=t: F.linear(x, t) for t in ws],
                                          len(ws) * math.ceil(48 / len(ws)), repeats,
                                          use_graph=not args.no_graphs)
            moved = _nbytes(ws[0], x, y)
            gbps = moved / (ms * 1e-3) / 1e9
            reporter.emit({"kind": "result", "suite": "gemm", "impl": f"{FLINEAR} {c['dtype']}",
                           "M": m, "K": k, "N": n, "dtype": c["dtype"], "median_ms": ms, "us": ms * 1e3,
                           "bytes": moved, "gbps": gbps, "frac_copy": gbps / copy_gbps,
                           "timing": timing, "l2": f"rotate {len(ws)} weight copies"})
        except Exception as e:
            reporter.emit({"kind": "result", "suite": "gemm", "impl": f"{FLINEAR} {c['dtype']}",
                           "M": m, "K": k, "N": n, "dtype": c["dtype"], "error": f"{type(e).__name__}: {e}"[:500]})
        if dtype != torch.bfloat16:
            continue
        try:
            ikey = (k, n)
            if ikey not in i4:
                i4.clear()
                spec4 = QuantSpec(bits=4, group_size=GROUP, axis="oc", scale_dtype=torch.bfloat16)
                g = torch.Generator().manual_seed(k * 31 + n)
                w = torch.randn(n, k, generator=g) * 0.02
                codes4, s4, z4 = ops.quantize(w, spec4)
                p0, sz0 = int4pack_cuda(codes4, s4, z4)
                ref_w = ops.dequantize(ops.pack(codes4, 4), s4, z4, spec4, torch.float32).cuda().double()
                cps = [(p0, sz0)] + [(p0.clone(), sz0.clone())
                                     for _ in range(_copies_for(_nbytes(p0, sz0)) - 1)]
                i4[ikey] = (cps, ref_w)
            cps, ref_w = i4[ikey]
            x = torch.randn(m, k, generator=torch.Generator(device="cuda").manual_seed(m),
                            device="cuda").to(torch.bfloat16)
            with torch.no_grad():
                y = torch.ops.aten._weight_int4pack_mm(x, cps[0][0], GROUP, cps[0][1])
                err = _rel_err(y, x.double() @ ref_w.t())
                ms, timing = time_rotated(
                    [lambda t=t: torch.ops.aten._weight_int4pack_mm(x, t[0], GROUP, t[1]) for t in cps],
                    len(cps) * math.ceil(48 / len(cps)), repeats, use_graph=not args.no_graphs)
            moved = _nbytes(*cps[0], x, y)
            gbps = moved / (ms * 1e-3) / 1e9
            reporter.emit({"kind": "result", "suite": "gemm", "impl": INT4PACK, "M": m, "K": k, "N": n,
                           "bits": 4, "axis": "oc", "group": GROUP, "dtype": "bfloat16", "median_ms": ms,
                           "us": ms * 1e3, "bytes": moved, "gbps": gbps, "frac_copy": gbps / copy_gbps,
                           "max_rel_err": err, "timing": timing,
                           "l2": f"rotate {len(cps)} weight copies"})
        except Exception as e:
            reporter.emit({"kind": "result", "suite": "gemm", "impl": INT4PACK, "M": m, "K": k, "N": n,
                           "dtype": "bfloat16", "error": f"{type(e).__name__}: {e}"[:500]})
    weights.clear(), dense.clear(), i4.clear()
    torch.cuda.empty_cache()
    return failures


def cublas_library() -> Optional[str]:
    """libcublas of the CUDA torch's wheels (nvidia.cublas), or None (the binary then tries the
    loader's search path)."""
    import glob
    try:
        import nvidia.cublas as nc  # type: ignore[import-not-found]
    except ImportError:
        return None
    for d in list(getattr(nc, "__path__", [])):
        libs = sorted(glob.glob(os.path.join(d, "lib", "libcublas.so*")))
        libs = [x for x in libs if "Lt" not in os.path.basename(x)]
        if libs:
            return libs[0]
    return None


def run_gemm_cpp(cases: List[dict], reporter: Reporter, args, copy_gbps: float) -> int:
    from .bench_gemm import find_cpp_binary
    binary = find_cpp_binary("bench_gemm_cuda", "LAYERPRESS_CUDA_BENCH_BIN")
    if binary is None:
        reporter.log("gemm_cpp FAILED: bench_gemm_cuda not found (built only when nvcc is present)")
        reporter.emit({"kind": "result", "suite": "gemm_cpp", "ok": False, "error": "bench_gemm_cuda not found"})
        return 1
    lib = cublas_library()
    failures = 0
    for c in cases:
        cmd = [binary, "--shapes", c["shapes"], "--M", c["M"], "--bits", c["bits"], "--axes", c["axes"],
               "--group", str(GROUP), "--repeats", "10" if args.quick else "30"] + (["--cublas", lib] if lib else [])
        reporter.log("gemm_cpp: " + " ".join(cmd))
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            failures += 1
            reporter.emit({"kind": "result", "suite": "gemm_cpp", "ok": False, "error": "timeout", "cmd": cmd})
            continue
        for line in proc.stdout.splitlines():
            try:
                d = json.loads(line)
            except ValueError:
                continue
            d.update({"kind": "result", "suite": "gemm_cpp", "impl": "layerpress",
                      "frac_copy": d["ours_gbps"] / copy_gbps if copy_gbps else None})
            reporter.emit(d)
        if proc.returncode != 0:
            failures += 1
            reporter.log(f"gemm_cpp FAILED (rc {proc.returncode}): {proc.stderr[-1000:]}")
            reporter.emit({"kind": "result", "suite": "gemm_cpp", "ok": False, "error": proc.stderr[-500:]})
    return failures


def print_gemm_cpp_table(results: List[dict], file) -> None:
    rows = [r for r in results if r.get("suite") == "gemm_cpp" and "ours_us" in r]
    if not rows:
        return
    head = ["M", "K", "N", "bits", "axis", "dtype", "ours us", "cuBLAS us", "vs cuBLAS", "GB/s", "of copy"]
    body = [[str(r["M"]), str(r["K"]), str(r["N"]), str(r["bits"]), r["axis"], r["dtype"], f"{r['ours_us']:.1f}",
             "-" if r["cublas_us"] is None else f"{r['cublas_us']:.1f}",
             "-" if r["speedup"] is None else f"{r['speedup']:.2f}x", f"{r['ours_gbps']:.0f}",
             "-" if r.get("frac_copy") is None else f"{100 * r['frac_copy']:.0f}%"] for r in rows]
    print_aligned_table("bench_gemm_cuda (C++): tensor-core GEMM vs cuBLAS fp16, median us, L2 flushed "
                        "(vs cuBLAS = cuBLAS time / ours)", head, body, file)


def print_gemm_table(results: List[dict], file) -> None:
    base = {}
    for r in results:
        if r.get("suite") == "gemm" and r.get("impl") != "layerpress" and "median_ms" in r:
            base[(r["M"], r["K"], r["N"], r["dtype"], r["impl"].split()[0])] = r["median_ms"]
    ours = [r for r in results if r.get("suite") == "gemm" and r.get("impl") == "layerpress"]
    if not ours:
        return
    head = ["M", "K", "N", "bits", "axis", "act", "layerpress us", "F.linear us", "int4pack us",
            "vs F.linear", "vs int4pack", "GB/s", "of copy", "rel err", "ok"]
    rows = []
    for r in ours:
        key = (r["M"], r["K"], r["N"], r["dtype"])
        ms = r.get("median_ms")
        fl = base.get(key + (FLINEAR,))
        i4 = base.get(key + (INT4PACK,)) if r["bits"] == 4 else None
        us = lambda v: "-" if v is None else f"{v * 1e3:.1f}"
        rows.append([str(r["M"]), str(r["K"]), str(r["N"]), str(r["bits"]), r["axis"],
                     "fp16" if r["dtype"] == "float16" else "bf16", us(ms), us(fl), us(i4),
                     fmt_ratio(fl, ms), fmt_ratio(i4, ms),
                     f"{r['gbps']:.0f}" if "gbps" in r else "-",
                     f"{100 * r['frac_copy']:.0f}%" if "frac_copy" in r else "-",
                     f"{r['max_rel_err']:.1e}" if "max_rel_err" in r else "-",
                     "yes" if r.get("ok") else ("ERROR" if "error" in r else "WRONG")])
    print_aligned_table("CUDA low-bit GEMM, median us per call (g128 asymmetric, layout of --layout; "
                        "'vs X' = X's time / layerpress's, >1 means layerpress is faster)",
                        head, rows, file)


# ---- norms -----------------------------------------------------------------------------------------

def _norm_bytes(op: str, mode: str, tokens: int, hidden: int, esize: int) -> int:
    """Minimal bytes: forward reads x (and r), writes y (and h); backward reads x (or h) and
    grad_y (and grad_h), writes grad_x (and grad_r)."""
    t = tokens * hidden * esize
    fwd = {"rms_norm": 2, "add_rms_norm": 4, "layer_norm": 2}[op] * t
    bwd = {"rms_norm": 3, "add_rms_norm": 5, "layer_norm": 3}[op] * t
    return fwd + (bwd if mode == "fwdbwd" else 0)


def run_norms(cases: List[dict], reporter: Reporter, args, copy_gbps: float) -> int:
    failures = 0
    repeats = 15 if args.quick else 30
    flush, l2_label = make_flush()
    compiled: Dict[tuple, Callable] = {}
    for c in cases:
        op, dtype, hidden, tokens, mode = c["op"], DTYPES[c["dtype"]], c["hidden"], c["tokens"], c["mode"]
        g = torch.Generator(device="cuda").manual_seed(hidden + tokens)
        mk = lambda *shape: torch.randn(*shape, generator=g, device="cuda").to(dtype)
        x = mk(tokens, hidden)
        r = mk(tokens, hidden) if op == "add_rms_norm" else None
        w = (1 + 0.1 * mk(hidden)).to(dtype)
        b = mk(hidden) if op == "layer_norm" else None
        gy = mk(tokens, hidden) if mode == "fwdbwd" else None
        if mode == "fwdbwd":
            for t in (x, r, w, b):
                if t is not None:
                    t.requires_grad_(True)
        nbytes = _norm_bytes(op, mode, tokens, hidden, x.element_size())
        key = {k: c[k] for k in ("op", "dtype", "hidden", "tokens", "mode")}
        # correctness: layerpress vs eager in float32 (forward output)
        ok, err = True, None
        try:
            with torch.no_grad():
                ours = layerpress_fn(op)(x, r, w, b)
                ref = eager_fn(op)(*(None if t is None else t.float() for t in (x, r, w, b)))
            o = ours[0] if isinstance(ours, tuple) else ours
            rf = ref[0] if isinstance(ref, tuple) else ref
            err = _rel_err(o.float(), rf.double())
            ok = err <= 4 * torch.finfo(dtype).eps
        except Exception as e:
            ok, err = False, f"{type(e).__name__}: {e}"[:500]
        for impl in c["impls"]:
            rec = {"kind": "result", "suite": "norms", "impl": impl, **key}
            try:
                if impl == "layerpress":
                    if isinstance(err, str):
                        raise RuntimeError(err)
                    fn = layerpress_fn(op)
                    rec.update({"max_rel_err": err, "ok": ok})
                elif impl == COMPILE:
                    ck = (op, mode)
                    if ck not in compiled:
                        compiled[ck] = torch.compile(eager_fn(op), dynamic=False)
                    fn = compiled[ck]
                else:
                    fn = eager_fn(op)
                run = make_runner(fn, mode, x, r, w, b, gy)
                t0 = time.perf_counter()
                run()
                run()
                torch.cuda.synchronize()
                warm = time.perf_counter() - t0
                ms, _ = _events_ms(run, repeats, before=flush)
                gbps = nbytes / (ms * 1e-3) / 1e9
                rec.update({"median_ms": ms, "bytes": nbytes, "gbps": gbps, "frac_copy": gbps / copy_gbps,
                            "repeats": repeats, "l2": l2_label, "warmup_s": round(warm, 2)})
                if impl == "layerpress" and not ok:
                    failures += 1
                    reporter.log(f"norms WRONG: {key} max_rel_err {err:.3e}")
            except Exception as e:
                rec.update({"ok": False, "error": f"{type(e).__name__}: {e}"[:500]})
                if impl == "layerpress":
                    failures += 1
                reporter.log(f"norms FAILED: {impl} {key}: {rec['error']}")
            reporter.emit(rec)
        del x, r, w, b, gy
    return failures


def print_norms_table(results: List[dict], file) -> None:
    rs = [r for r in results if r.get("suite") == "norms"]
    ours = [r for r in rs if r["impl"] == "layerpress"]
    if not ours:
        return
    key = lambda r: (r["op"], r["dtype"], r["hidden"], r["tokens"], r["mode"])
    eager = {key(r): r.get("median_ms") for r in rs if r["impl"].startswith("eager")}
    comp = {key(r): r.get("median_ms") for r in rs if r["impl"] == COMPILE}
    head = ["op", "act", "hidden", "tokens", "mode", "layerpress us", "eager us", "compile us",
            "vs eager", "vs compile", "GB/s", "of copy", "ok"]
    rows = []
    for r in ours:
        k = key(r)
        ms = r.get("median_ms")
        us = lambda v: "-" if v is None else f"{v * 1e3:.1f}"
        rows.append([r["op"], "fp16" if r["dtype"] == "float16" else "bf16", str(r["hidden"]),
                     str(r["tokens"]), r["mode"], us(ms), us(eager.get(k)), us(comp.get(k)),
                     fmt_ratio(eager.get(k), ms), fmt_ratio(comp.get(k), ms),
                     f"{r['gbps']:.0f}" if "gbps" in r else "-",
                     f"{100 * r['frac_copy']:.0f}%" if "frac_copy" in r else "-",
                     "yes" if r.get("ok") else ("ERROR" if "error" in r else "WRONG")])
    print_aligned_table("CUDA fused norms, median us per call (L2 flushed; 'vs X' = X's time / "
                        "layerpress's, >1 means layerpress is faster)", head, rows, file)


# ---- wtacrs ----------------------------------------------------------------------------------------

def run_wtacrs(cases: List[dict], reporter: Reporter, args) -> int:
    from layerpress.wtacrs import WTACRSLinear
    failures = 0
    repeats = 10 if args.quick else 30
    for c in cases:
        fin, fout, tokens = c["in"], c["out"], c["tokens"]
        dtype = DTYPES[c["dtype"]]
        torch.manual_seed(0)
        dense = torch.nn.Linear(fin, fout, device="cuda", dtype=dtype)
        wl = WTACRSLinear(fin, fout, device="cuda", dtype=dtype, ratio=c["ratio"])
        with torch.no_grad():
            wl.weight.copy_(dense.weight)
            wl.bias.copy_(dense.bias)
        g = torch.Generator(device="cuda").manual_seed(1)
        x0 = torch.randn(tokens, fin, generator=g, device="cuda").to(dtype).requires_grad_(True)
        gy = torch.randn(tokens, fout, generator=g, device="cuda").to(dtype)
        for name, layer in (("WTACRSLinear", wl), ("nn.Linear", dense)):
            rec = {"kind": "result", "suite": "wtacrs", "impl": name, "in": fin, "out": fout,
                   "tokens": tokens, "dtype": c["dtype"], "ratio": c["ratio"]}
            try:
                opt = torch.optim.SGD(layer.parameters(), lr=1e-4)

                def step():
                    h = x0 * 1.0  # an intermediate activation: freed unless the layer saves it
                    y = layer(h)
                    y.backward(gy)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    x0.grad = None
                    return y

                if name == "WTACRSLinear":  # forward is the exact F.linear
                    with torch.no_grad():
                        err = _rel_err(wl(x0), dense(x0).double())
                    rec.update({"max_rel_err": err, "ok": err <= 2 * torch.finfo(dtype).eps})
                step()
                step()
                torch.cuda.synchronize()
                before = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                h = x0 * 1.0
                y = layer(h)
                del h
                saved = torch.cuda.memory_allocated() - before
                y.backward(gy)
                opt.step()
                opt.zero_grad(set_to_none=True)
                x0.grad = None
                del y
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated() - before
                ms, _ = _events_ms(step, repeats)
                rec.update({"median_ms": ms, "repeats": repeats, "peak_step_mib": peak / 2**20,
                            "forward_kept_mib": saved / 2**20})
                if rec.get("ok") is False:
                    failures += 1
            except Exception as e:
                rec.update({"ok": False, "error": f"{type(e).__name__}: {e}"[:500]})
                failures += name == "WTACRSLinear"
                reporter.log(f"wtacrs FAILED: {name}: {rec['error']}")
            reporter.emit(rec)
        del dense, wl, x0, gy
        torch.cuda.empty_cache()
    return failures


def print_wtacrs_table(results: List[dict], file) -> None:
    rs = [r for r in results if r.get("suite") == "wtacrs"]
    if not rs:
        return
    dense = {(r["in"], r["out"], r["tokens"]): r for r in rs if r["impl"] == "nn.Linear"}
    head = ["impl", "in", "out", "tokens", "step ms", "vs nn.Linear", "peak MiB", "kept MiB"]
    rows = []
    for r in rs:
        d = dense.get((r["in"], r["out"], r["tokens"]), {})
        f = lambda v: "-" if v is None else f"{v:.2f}"
        rows.append([r["impl"], str(r["in"]), str(r["out"]), str(r["tokens"]), f(r.get("median_ms")),
                     fmt_ratio(d.get("median_ms"), r.get("median_ms")), f(r.get("peak_step_mib")),
                     f(r.get("forward_kept_mib"))])
    print_aligned_table("WTA-CRS linear training step (forward, backward, SGD), bf16; 'kept' = "
                        "memory the forward keeps for backward", head, rows, file)


# ---- main ------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.bench_cuda",
        description="GPU benchmarks: layerpress CUDA GEMM / norms / WTA-CRS against F.linear "
                    "(cuBLAS), aten._weight_int4pack_mm, F.rms_norm/F.layer_norm, torch.compile "
                    "and nn.Linear, in one run. JSON lines to stdout, tables to stderr.",
        epilog="example: --suite gemm --cases M=1,16 bits=4 axis=ic dtype=bf16")
    p.add_argument("--quick", action="store_true",
                   help="the small set scripts/gpu_check.sh runs (well under 3 minutes on an H200)")
    p.add_argument("--suite", default=",".join(DEFAULT_SUITES),
                   help="comma-separated suites: gemm, norms, wtacrs, gemm_cpp (default the first three)")
    p.add_argument("--cases", nargs="+", metavar="KEY=V1,V2",
                   help="filter cases; keys M, K, N, bits, axis, dtype (fp16/bf16), op, hidden, "
                        "tokens, mode (fwd/fwdbwd)")
    p.add_argument("--out", metavar="FILE", help="also write the JSON lines to FILE")
    p.add_argument("--dry-run", action="store_true",
                   help="print the planned cases as JSON lines (kind 'case') and exit; no CUDA")
    p.add_argument("--no-compile", action="store_true", help="no torch.compile baseline for norms")
    p.add_argument("--no-baselines", action="store_true", help="GEMM: time layerpress only")
    p.add_argument("--layout", choices=("cuda_mma", "canonical"), default="cuda_mma",
                   help="GEMM: the weight layout (cuda_mma: the tensor-core kernel; canonical: the simple one)")
    p.add_argument("--no-graphs", action="store_true",
                   help="GEMM: back-to-back launches instead of CUDA graphs")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    return p


def run(args) -> int:
    suites = [s.strip() for s in args.suite.split(",") if s.strip()]
    bad = [s for s in suites if s not in SUITES]
    if bad or not suites:
        raise UsageError(f"--suite: unknown {bad} (choose from {', '.join(SUITES)})")
    filt = parse_cases(args.cases)
    cases = plan(suites, args.quick, filt, compile_norms=not args.no_compile)
    if "gemm_cpp" in suites:  # one planned case per binary run
        cases += [{"suite": "gemm_cpp", "shapes": sh, "M": ms, "bits": b, "axes": ax, "impls": ["ours", "cuBLAS"]}
                  for sh, ms, b, ax in (CPP_RUNS_QUICK if args.quick else CPP_RUNS_FULL)]
    if args.dry_run:
        with _closing(Reporter(args.out, args.quiet)) as rep:
            rep.emit({"kind": "plan", "suites": suites, "quick": args.quick, "cases": len(cases),
                      "note": "dry run: nothing measured, CUDA not touched"})
            for c in cases:
                rep.emit({"kind": "case", **c})
        return 0
    if not torch.cuda.is_available():
        print("bench_cuda: no GPU: torch.cuda.is_available() is False (torch "
              f"{torch.__version__}, CUDA {torch.version.cuda}); nothing measured. "
              "Use --dry-run to list the cases.", file=sys.stderr)
        return 2
    import layerpress  # noqa: F401  (loads the CUDA library and registers the ops)
    rep = Reporter(args.out, args.quiet)
    t_start = time.perf_counter()
    failures = 0
    try:
        rep.emit(gpu_machine_info())
        copy_gbps = copy_bandwidth(rep, repeats=10)
        rep.log(f"copy bandwidth: {copy_gbps:.0f} GB/s; {len(cases)} cases")
        for suite in suites:
            sc = [c for c in cases if c["suite"] == suite]
            if not sc:
                continue
            t0 = time.perf_counter()
            rep.log(f"suite {suite}: {len(sc)} cases")
            if suite == "gemm":
                failures += run_gemm(sc, rep, args, copy_gbps)
            elif suite == "gemm_cpp":
                failures += run_gemm_cpp(sc, rep, args, copy_gbps)
            elif suite == "norms":
                failures += run_norms(sc, rep, args, copy_gbps)
            else:
                failures += run_wtacrs(sc, rep, args)
            rep.emit({"kind": "suite_done", "suite": suite, "wall_s": round(time.perf_counter() - t0, 1)})
        rep.emit({"kind": "done", "failures": failures, "wall_s": round(time.perf_counter() - t_start, 1)})
    finally:
        rep.close()
        print_gemm_table(rep.results, sys.stderr)
        print_gemm_cpp_table(rep.results, sys.stderr)
        print_norms_table(rep.results, sys.stderr)
        print_wtacrs_table(rep.results, sys.stderr)
        print(f"\nbench_cuda: {failures} failed or wrong layerpress case(s); "
              f"{time.perf_counter() - t_start:.0f} s", file=sys.stderr)
    return 1 if failures else 0


class _closing:
    def __init__(self, r):
        self.r = r

    def __enter__(self):
        return self.r

    def __exit__(self, *exc):
        self.r.close()


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run(args)
    except UsageError as e:
        parser.error(str(e))
        return 2


if __name__ == "__main__":
    sys.exit(main())
