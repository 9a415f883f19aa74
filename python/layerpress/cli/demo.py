"""``layerpress demo``: quantise a seeded random Linear at W4/W3/W2 (per-OC and per-IC), check
every GEMM against the float64 reference, benchmark it."""
from __future__ import annotations

import time

from .common import UsageError, int4pack, median_ms, set_threads, table


DEMO_CONFIGS = [(4, "oc"), (4, "ic"), (3, "oc"), (3, "ic"), (2, "oc"), (2, "ic")]
DEMO_GROUP = 128


def add_parser(sub) -> None:
    d = sub.add_parser(
        "demo", help="quantise a random Linear at W4/W3/W2, check and benchmark the GEMM (default)",
        description="Quantises a seeded random nn.Linear(SIZE, SIZE) with QuantLinear.from_linear "
                    f"at W4, W3 and W2 (group {DEMO_GROUP}, per-OC and per-IC), checks every GEMM "
                    "against the float64 reference, the quantiser against the plain-PyTorch "
                    "reference and a state_dict round trip, then benchmarks M = 1 and M = 16 "
                    "against F.linear fp32 and torch's _weight_int4pack_mm_for_cpu. Exit status 1 "
                    "if any check fails.")
    d.add_argument("--size", type=int, default=4096,
                   help=f"in = out features (multiple of {DEMO_GROUP}; default 4096)")
    d.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    d.add_argument("--no-bench", action="store_true", help="checks only, no timing")
    d.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's default)")


def demo(args) -> int:
    import torch
    from torch import nn

    import layerpress
    from .. import ops, reference
    from ..nn import QuantLinear
    from ..spec import QuantSpec

    size, seed = args.size, args.seed
    if size < DEMO_GROUP or size % DEMO_GROUP:
        raise UsageError(f"--size must be a positive multiple of {DEMO_GROUP}, got {size}")
    set_threads(args.threads)
    started = time.perf_counter()
    info = layerpress.build_info()
    print(f"layerpress {layerpress.__version__} | torch {torch.__version__} | CPU GEMM kernel "
          f"'{info['cpu_kernels']['gemm']}' | {torch.get_num_threads()} threads")
    print()
    torch.manual_seed(seed)
    lin = nn.Linear(size, size)  # kaiming-uniform weights, uniform bias, seeded
    w = lin.weight.detach()
    gen = torch.Generator().manual_seed(seed + 1)
    xs = {m: torch.randn(m, size, generator=gen) for m in (1, 16)}
    print(f"Quantising nn.Linear({size}, {size}) (seed {seed}) with QuantLinear.from_linear "
          f"(round-to-nearest, min-max, group {DEMO_GROUP}, asymmetric, fp16 scales); each GEMM "
          f"is checked against the float64 reference layerpress.reference.gemm on the same codes.")
    print()

    failures = 0
    rows = []
    modules = {}
    with torch.inference_mode():
        y_float = {m: lin(x).double() for m, x in xs.items()}
        for bits, axis in DEMO_CONFIGS:
            spec = QuantSpec(bits=bits, group_size=DEMO_GROUP, axis=axis)
            ql = QuantLinear.from_linear(lin, spec)
            modules[(bits, axis)] = ql
            q, s, z = ql.canonical()
            codes = ops.unpack(q, bits)
            # The format: the C++ quantiser must match the plain-PyTorch definition bit for bit.
            rc, rs, rz = reference.quantize(w, spec)
            same_codes = (torch.equal(codes, rc) and torch.equal(s, rs)
                          and (z is None or torch.equal(z, rz)))
            # The checkpoint: a state_dict round trip gives a layer with identical outputs.
            fresh = QuantLinear(size, size, spec)
            fresh.load_state_dict(ql.state_dict())
            same_reload = torch.equal(fresh(xs[1]), ql(xs[1]))
            bits_per_w = bits + (16 + 8) / DEMO_GROUP
            checks = [(torch.float32, 1), (torch.float32, 16)]
            if bits == 4:
                checks.append((torch.bfloat16, 16))
            for dtype, m in checks:
                x = xs[m].to(dtype)
                y = ql(x)
                y_ref = reference.gemm(x.float(), codes, s, z, spec, bias=lin.bias.detach())
                err = (y.double() - y_ref).abs().max().item()
                rel_tol = 1e-4 if dtype == torch.float32 else 1e-2
                tol = rel_tol * max(1.0, y_ref.abs().max().item())
                quant_err = ((y_ref - y_float[m]).norm() / y_float[m].norm()).item()
                ok = err <= tol and same_codes and same_reload
                failures += not ok
                rows.append([f"W{bits} g{DEMO_GROUP} {'per-OC' if axis == 'oc' else 'per-IC'}",
                             f"{bits_per_w:.3f}", "fp32" if dtype == torch.float32 else "bf16",
                             str(m), f"{err:.2e}", f"{tol:.1e}",
                             "yes" if same_codes else "NO", "yes" if same_reload else "NO",
                             f"{100 * quant_err:.1f}%", "PASS" if ok else "FAIL"])
    print(table(["weight", "bits/w", "act", "M", "max |err|", "tolerance", "codes = ref",
                  "reload = same", "quant. error", "result"], rows))
    print("  max |err|: GEMM output vs the float64 reference on the same codes (tolerance 1e-4 "
          "x max|y| for fp32, 1e-2 x max|y| for bf16 activations)")
    print("  codes = ref: quantiser bit-identical to layerpress.reference.quantize; reload = same: "
          "state_dict round trip; quant. error: ||y_q - y_float|| / ||y_float||")
    print()

    if not args.no_bench:
        _demo_bench(lin, modules, xs)

    elapsed = time.perf_counter() - started
    if failures:
        print(f"FAIL: {failures} of {len(rows)} checks failed ({elapsed:.0f} s)")
        return 1
    print(f"PASS: all {len(rows)} checks within tolerance ({elapsed:.0f} s)")
    return 0


def _demo_bench(lin, modules, xs) -> None:
    import torch
    import torch.nn.functional as F

    size = lin.in_features
    w, b = lin.weight.detach(), lin.bias.detach()
    print(f"Benchmark (CPU, median of repeats, {torch.get_num_threads()} threads; "
          f"'vs X' = X's time / layerpress's time, >1 means layerpress is faster)")
    rows = []
    with torch.inference_mode():
        i4, i4sz = int4pack(w, DEMO_GROUP)
        for m, x in xs.items():
            xb = x.to(torch.bfloat16)
            t_fp32 = median_ms(lambda: F.linear(x, w, b))
            t_i4 = median_ms(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, i4, DEMO_GROUP, i4sz))
            for (bits, axis), ql in modules.items():
                t = median_ms(lambda: ql(x))
                rows.append([f"W{bits} g{DEMO_GROUP} {axis}", str(m), f"{t:.3f}", f"{t_fp32:.3f}",
                             f"{t_fp32 / t:.2f}x", f"{t_i4:.3f}", f"{t_i4 / t:.2f}x"])
    print(table(["layerpress (fp32 act)", "M", "ms", "F.linear fp32 ms", "vs fp32",
                  "int4pack bf16 ms", "vs int4pack"], rows))
    print(f"  shape K = N = {size}; int4pack = torch.ops.aten._weight_int4pack_mm_for_cpu "
          f"(W4 g{DEMO_GROUP}, bf16 activations). Full suite: layerpress bench (or python -m "
          f"bench.bench_gemm)")
    print()
