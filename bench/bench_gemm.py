"""CPU GEMM benchmark suite: the layerpress low-bit GEMM against PyTorch's own baselines, side by
side in one run.

    python -m bench.bench_gemm                 # full suite (M x shapes x bits x axis, fp32 + bf16 W4)
    python -m bench.bench_gemm --quick         # K = N = 4096 only
    python -m bench.bench_gemm --cases M=1,16 bits=4 axis=ic --out results.jsonl

For every case the weight is quantised (RTN, asymmetric, group 128) and repacked once, then
``torch.ops.layerpress.gemm`` is timed. Baselines, timed once per (M, K, N, dtype): ``F.linear``
in fp32 and bf16, and ``torch.ops.aten._weight_int4pack_mm_for_cpu`` (4-bit, bf16 activations).
Each implementation of a shape is timed in ``--rounds`` interleaved rounds (a warm-up, then
repeated calls for ``--target-s``/rounds seconds each round) and reported as the median over all
samples, so drifts of a shared machine hit ours and the baselines alike. Output: one JSON line per (case, implementation)
on stdout (the first line, kind "machine", describes the machine), then a readable table on
stderr. The C++ benchmark binary ``bench_gemm_cpu`` is run too when it is found, and its lines
are included.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional

import torch
import torch.nn.functional as F

import layerpress
from layerpress import QuantSpec, ops
from layerpress.cli.common import (UsageError, int4pack, measure, table,  # noqa: F401  (re-exported)
                                   timed_calls)

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]  # (K = in features, N = out features)
MS = [1, 16, 128, 1024]
BITS = [2, 3, 4, 8]
AXES = ["oc", "ic"]
GROUP = 128
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DTYPE_ALIASES = {"float32": "float32", "fp32": "float32", "f32": "float32",
                 "bfloat16": "bfloat16", "bf16": "bfloat16"}
INT4PACK = "aten._weight_int4pack_mm_for_cpu"
REPO_ROOT = Path(__file__).resolve().parents[1]


# ---- machine ---------------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    return {
        "kind": "machine",
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": usable,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "layerpress": layerpress.build_info(),
        "env": {k: os.environ[k] for k in ("LAYERPRESS_CPU_KERNEL", "OMP_NUM_THREADS")
                if k in os.environ},
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# ---- timing ----------------------------------------------------------------------------------------

class Reporter:
    """JSON lines to stdout (and to ``out`` if given), progress lines to stderr; keeps every
    emitted record for the summary table. Close it (or use ``with``) to close the file."""

    def __init__(self, out: Optional[str], quiet: bool):
        self.quiet = quiet
        self.file = open(out, "w") if out else None
        self.results: List[dict] = []

    def log(self, msg: str) -> None:
        if not self.quiet:
            print(msg, file=sys.stderr, flush=True)

    def emit(self, d: dict) -> None:
        line = json.dumps(d)
        print(line, flush=True)
        if self.file:
            self.file.write(line + "\n")
            self.file.flush()
        self.results.append(d)

    def close(self) -> None:
        if self.file:
            self.file.close()


# ---- weights ---------------------------------------------------------------------------------------

def random_weight(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * 0.02


def layerpress_weight(w: torch.Tensor, spec: QuantSpec):
    """RTN-quantise, pack and repack once for the CPU kernel: (qweight, scales, zeros) native."""
    codes, s, z = ops.quantize(w, spec)
    return ops.repack(ops.pack(codes, spec.bits), s, z, spec)


# The W4 g128 asymmetric RTN weight in the layout of _weight_int4pack_mm_for_cpu: one conversion,
# shared with `layerpress demo`.
int4pack_weight = int4pack


# ---- the C++ binary --------------------------------------------------------------------------------

def find_cpp_binary(name: str = "bench_gemm_cpu", env: str = "LAYERPRESS_BENCH_BIN") -> Optional[str]:
    cands = []
    if os.environ.get(env):
        cands.append(os.environ[env])
    try:
        from layerpress import _C
        cands.append(os.path.join(os.path.dirname(_C.__file__), "bin", name))
    except ImportError:
        pass
    cands.append(os.path.join(os.path.dirname(layerpress.__file__), "bin", name))
    cands += sorted(glob.glob(str(REPO_ROOT / "build" / "*" / name)),
                    key=os.path.getmtime, reverse=True)
    for c in cands:
        if os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def run_cpp(binary: str, K: int, N: int, Ms: List[int], bits: List[int], axes: List[str],
            repeats: int, threads: int, timeout_s: float, log) -> List[dict]:
    cmd = [binary, "--K", str(K), "--N", str(N), "--M", ",".join(map(str, Ms)),
           "--bits", ",".join(map(str, bits)), "--axis", ",".join(str(AXES.index(a)) for a in axes),
           "--group", str(GROUP), "--repeats", str(repeats), "--threads", str(threads)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        log(f"# C++ benchmark timed out after {timeout_s:.0f} s: {' '.join(cmd)}")
        return []
    except OSError as e:
        log(f"# C++ benchmark could not run: {e}")
        return []
    if proc.returncode != 0:
        log(f"# C++ benchmark failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
        return []
    out = []
    for line in proc.stdout.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError:
            continue
        d = {"kind": "result", **d, "source": "cpp", "scale_dtype": "float32", "symmetric": False,
             "repeats": repeats}
        out.append(d)
    return out


# ---- case selection --------------------------------------------------------------------------------

def parse_cases(items: Optional[Iterable[str]]) -> Dict[str, set]:
    """``KEY=V1,V2`` filters; keys M, K, N, bits, axis, dtype, shape (KxN)."""
    filt: Dict[str, set] = {}
    if not items:
        return filt
    tokens = []
    for item in items:
        tokens += item.replace(";", " ").split()
    for tok in tokens:
        if "=" not in tok:
            raise UsageError(f"--cases: expected KEY=V1,V2,... (keys M, K, N, bits, axis, dtype, "
                             f"shape), got {tok!r}")
        key, vals = tok.split("=", 1)
        key = {"m": "M", "k": "K", "n": "N"}.get(key.strip().lower(), key.strip().lower())
        values = [v.strip() for v in vals.split(",") if v.strip()]
        if not values:
            raise UsageError(f"--cases: no values for {key}")
        try:
            if key in ("M", "K", "N", "bits"):
                parsed = {int(v) for v in values}
            elif key == "axis":
                parsed = {v.lower() for v in values}
                if not parsed <= set(AXES):
                    raise ValueError
            elif key == "dtype":
                parsed = {DTYPE_ALIASES[v.lower()] for v in values}
            elif key == "shape":
                parsed = set()
                for v in values:
                    k, n = v.lower().split("x")
                    parsed.add((int(k), int(n)))
            else:
                raise UsageError(f"--cases: unknown key {key!r} (keys: M, K, N, bits, axis, dtype, "
                                 f"shape=KxN)")
        except (ValueError, KeyError):
            raise UsageError(f"--cases: bad value in {tok!r}") from None
        filt[key] = filt.get(key, set()) | parsed
    return filt


def plan_cases(quick: bool, filt: Dict[str, set]) -> List[dict]:
    shapes = SHAPES[:1] if quick else SHAPES
    cases = []
    for K, N in shapes:
        for bits in BITS:
            for axis in AXES:
                for dtype in ["float32"] + (["bfloat16"] if bits == 4 else []):
                    for M in MS:
                        c = {"M": M, "K": K, "N": N, "bits": bits, "axis": axis, "dtype": dtype}
                        if all(c[k] in v for k, v in filt.items() if k != "shape") and \
                                ("shape" not in filt or (K, N) in filt["shape"]):
                            cases.append(c)
    return cases


# ---- the run ---------------------------------------------------------------------------------------

def fmt_ms(v: Optional[float]) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if v < 10 else (f"{v:.2f}" if v < 100 else f"{v:.1f}")


def fmt_ratio(base: Optional[float], ours: Optional[float]) -> str:
    if base is None or ours is None or ours <= 0:
        return "-"
    return f"{base / ours:.2f}x"


def print_table(results: List[dict], file) -> None:
    base = {}
    cpp = {}
    for r in results:
        if r.get("kind") != "result":
            continue
        key = (r["M"], r["K"], r["N"])
        if r["impl"] == "F.linear":
            base[key + ("F.linear " + r["dtype"],)] = r["median_ms"]
        elif r["impl"] == INT4PACK:
            base[key + ("int4pack",)] = r["median_ms"]
        elif r.get("source") == "cpp":
            cpp[key + (r["bits"], r["axis"])] = r["median_ms"]
    ours = [r for r in results if r.get("kind") == "result" and r["impl"] == "layerpress"]
    if not ours:
        return
    head = ["M", "K", "N", "bits", "axis", "act", "layerpress", "C++ bin", "F.lin fp32",
            "F.lin bf16", "int4pack", "vs fp32", "vs bf16", "vs int4pack"]
    rows = []
    for r in ours:
        key = (r["M"], r["K"], r["N"])
        fp32 = base.get(key + ("F.linear float32",))
        bf16 = base.get(key + ("F.linear bfloat16",))
        i4 = base.get(key + ("int4pack",))
        c = cpp.get(key + (r["bits"], r["axis"])) if r["dtype"] == "float32" else None
        rows.append([str(r["M"]), str(r["K"]), str(r["N"]), str(r["bits"]), r["axis"],
                     "fp32" if r["dtype"] == "float32" else "bf16", fmt_ms(r["median_ms"]),
                     fmt_ms(c), fmt_ms(fp32), fmt_ms(bf16), fmt_ms(i4),
                     fmt_ratio(fp32, r["median_ms"]), fmt_ratio(bf16, r["median_ms"]),
                     fmt_ratio(i4, r["median_ms"])])
    print_aligned_table("CPU low-bit GEMM, median ms per call (group 128, asymmetric; "
                        "'vs X' = X's time / layerpress's time, >1 means layerpress is faster)",
                        head, rows, file)


def print_aligned_table(title: str, head: List[str], rows: List[List[str]], file) -> None:
    """A title line, then right-aligned columns under a header and a rule."""
    print("", file=file)
    print(title, file=file)
    print(table(head, rows, left=0), file=file)
    file.flush()


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog or "python -m bench.bench_gemm",
        description="CPU low-bit GEMM benchmark: layerpress vs F.linear (fp32, bf16) and "
                    "torch's _weight_int4pack_mm_for_cpu, in one run. JSON lines go to stdout, "
                    "a readable table to stderr.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="cases: M in {1,16,128,1024} x (K,N) in {(4096,4096),(4096,11008),(11008,4096)} x "
               "bits {2,3,4,8} x axis {oc,ic}, group 128, asymmetric, fp32 activations; plus bf16 "
               "activations at W4.\nexample: --cases M=1,16 bits=4 axis=ic dtype=bf16 shape=4096x11008")
    p.add_argument("--quick", action="store_true", help="only K = N = 4096")
    p.add_argument("--out", metavar="FILE", help="also write the JSON lines to FILE")
    p.add_argument("--cases", nargs="+", metavar="KEY=V1,V2",
                   help="filter cases; keys M, K, N, bits, axis (oc/ic), dtype (fp32/bf16), "
                        "shape (KxN)")
    p.add_argument("--target-s", type=float, default=0.5, metavar="S",
                   help="seconds of timed calls per measurement, over all rounds (default 0.5)")
    p.add_argument("--rounds", type=int, default=5, metavar="R",
                   help="interleaved rounds per shape: each implementation is timed once per "
                        "round, for target-s/R seconds (default 5)")
    p.add_argument("--threads", type=int, metavar="T",
                   help="torch.set_num_threads(T) (default: torch's default)")
    p.add_argument("--variant", metavar="NAME",
                   help="force a CPU GEMM variant (generic, avx2, avx512, avx512_bf16; default: "
                        "the best one)")
    p.add_argument("--scale-dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                   help="dtype of the layerpress scales (default float16)")
    p.add_argument("--no-baselines", action="store_true", help="time layerpress only")
    p.add_argument("--no-cpp", action="store_true", help="do not run the C++ binary even if found")
    p.add_argument("--cpp-repeats", type=int, default=5, metavar="R",
                   help="timed repeats per case for the C++ binary (default 5)")
    p.add_argument("--list", action="store_true", help="list the selected cases and exit")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    return p


def run(args) -> int:
    filt = parse_cases(args.cases)
    cases = plan_cases(args.quick, filt)
    if not cases:
        raise UsageError("no case matches --cases " + " ".join(args.cases or []))
    if args.list:
        for c in cases:
            print(json.dumps(c))
        return 0
    if args.target_s <= 0:
        raise UsageError("--target-s must be positive")
    if args.rounds < 1:
        raise UsageError("--rounds must be >= 1")
    if args.threads is not None:
        if args.threads < 1:
            raise UsageError("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    if args.variant:
        try:
            layerpress.set_cpu_gemm_variant(args.variant)
        except ValueError as e:
            raise UsageError(str(e)) from None

    reporter = Reporter(args.out, args.quiet)
    log, emit, results = reporter.log, reporter.emit, reporter.results

    started = time.perf_counter()
    try:
        emit(machine_info())
        threads = torch.get_num_threads()
        variant = layerpress.build_info()["cpu_kernels"]["gemm"]
        scale_dtype = getattr(torch, args.scale_dtype)
        cpp_bin = None if args.no_cpp else find_cpp_binary()
        if cpp_bin:
            log(f"# C++ benchmark binary: {cpp_bin}")
        elif not args.no_cpp:
            log("# C++ benchmark binary bench_gemm_cpu not found (install the package or build it); "
                "skipping it")
        common = {"op": "gemm", "device": "cpu", "threads": threads}
        shapes = []
        for c in cases:
            if (c["K"], c["N"]) not in shapes:
                shapes.append((c["K"], c["N"]))
        for si, (K, N) in enumerate(shapes):
            sc = [c for c in cases if (c["K"], c["N"]) == (K, N)]
            Ms = sorted({c["M"] for c in sc})
            w = random_weight(N, K, seed=si)
            xs = {M: torch.randn(M, K, generator=torch.Generator().manual_seed(1000 + M)) for M in Ms}
            # Every implementation of this shape is timed in each of `--rounds` rounds, in turn,
            # and its median is taken over the samples of all rounds: a slow spell of a shared
            # machine then hits ours and the baselines alike instead of biasing their ratio.
            items = []  # (JSON fields, callable)
            keep = []   # weights the callables close over
            if not args.no_baselines:
                wb = w.to(torch.bfloat16)
                i4, i4sz = int4pack_weight(w, GROUP)
                keep += [wb, i4, i4sz]
                for M in Ms:
                    x32, xb = xs[M], xs[M].to(torch.bfloat16)
                    base = {"kind": "result", **common, "M": M, "K": K, "N": N}
                    items.append(({**base, "bits": None, "group_size": None, "axis": None,
                                   "dtype": "float32", "impl": "F.linear"},
                                  lambda x=x32: F.linear(x, w)))
                    items.append(({**base, "bits": None, "group_size": None, "axis": None,
                                   "dtype": "bfloat16", "impl": "F.linear"},
                                  lambda x=xb: F.linear(x, wb)))
                    items.append(({**base, "bits": 4, "group_size": GROUP, "axis": "oc",
                                   "dtype": "bfloat16", "impl": INT4PACK, "symmetric": False,
                                   "scale_dtype": "bfloat16"},
                                  lambda x=xb: torch.ops.aten._weight_int4pack_mm_for_cpu(
                                      x, i4, GROUP, i4sz)))
            for bits in BITS:
                for axis in AXES:
                    bc = [c for c in sc if c["bits"] == bits and c["axis"] == axis]
                    if not bc:
                        continue
                    spec = QuantSpec(bits=bits, group_size=GROUP, axis=axis, symmetric=False,
                                     scale_dtype=scale_dtype)
                    q, s, z = layerpress_weight(w, spec)
                    keep.append((q, s, z))
                    for c in bc:
                        M, dt = c["M"], c["dtype"]
                        x = xs[M] if dt == "float32" else xs[M].to(DTYPES[dt])
                        items.append(({"kind": "result", **common, "M": M, "K": K, "N": N,
                                       "bits": bits, "group_size": GROUP, "axis": axis,
                                       "dtype": dt, "impl": "layerpress", "variant": variant,
                                       "symmetric": False, "scale_dtype": args.scale_dtype},
                                      lambda x=x, q=q, s=s, z=z, bits=bits, ax=spec.axis_id:
                                      torch.ops.layerpress.gemm(x, q, s, z, None, bits, GROUP,
                                                                ax, 1, N)))
            samples = [[] for _ in items]
            with torch.inference_mode():
                for r in range(args.rounds):
                    log(f"# K={K} N={N}: round {r + 1}/{args.rounds}, {len(items)} timings")
                    for i, (_, fn) in enumerate(items):
                        samples[i] += timed_calls(fn, args.target_s / args.rounds)
            for (fields, _), t in zip(items, samples):
                emit({**fields, "median_ms": round(statistics.median(t) * 1e3, 5),
                      "repeats": len(t), "rounds": args.rounds})
            del items, keep, samples
            del w, xs
            if cpp_bin:
                fp32 = [c for c in sc if c["dtype"] == "float32"]
                if fp32:
                    log(f"# K={K} N={N}: C++ binary")
                    for d in run_cpp(cpp_bin, K, N, sorted({c["M"] for c in fp32}),
                                     sorted({c["bits"] for c in fp32}),
                                     [a for a in AXES if any(c["axis"] == a for c in fp32)],
                                     args.cpp_repeats, threads, 300, log):
                        if any(c["M"] == d.get("M") and c["bits"] == d.get("bits")
                               and c["axis"] == d.get("axis") for c in fp32):
                            emit(d)
    finally:
        reporter.close()
    print_table(results, sys.stderr)
    log(f"# {len(results) - 1} measurements in {time.perf_counter() - started:.0f} s")
    return 0


def main(argv: Optional[List[str]] = None, prog: Optional[str] = None) -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except UsageError as e:
        parser.error(str(e))  # exits with status 2 and the usage line, no traceback
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1


if __name__ == "__main__":
    sys.exit(main())
