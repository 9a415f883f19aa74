"""Shared helpers for the layerpress tests (imported by the test modules, not a test file).

Everything here is plain PyTorch and independent of the extension's kernels, except
``make_weight`` which only produces inputs.
"""
from __future__ import annotations

import contextlib
import itertools
import math

import torch

import layerpress
from layerpress import QuantSpec, ops

BITS = (2, 3, 4, 8)
AXES = ("oc", "ic")
GROUPS = (32, 64, 128, 256, -1)
SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Small [N, K] shapes per (axis, group_size) that satisfy the divisibility rules while keeping the
# full grids cheap. Per-OC: odd N (3 row tiles, the last one partial) and K=256 so that every
# group size fits. Per-IC: N a multiple of g; the whole-column case gets an odd N and N=48 (three
# 16-row tiles in one group: regression case for the AVX-512 LUT path once choosing R=3 tiles per
# unit, for which it had no kernel).
GRID_SHAPES = {
    ("oc", 32): [(37, 256)],
    ("oc", 64): [(37, 256)],
    ("oc", 128): [(37, 256)],
    ("oc", 256): [(37, 256)],
    ("oc", -1): [(37, 96)],
    ("ic", 32): [(96, 64)],
    ("ic", 64): [(128, 96)],
    ("ic", 128): [(128, 32)],
    ("ic", 256): [(256, 32)],
    ("ic", -1): [(33, 96), (48, 64)],
}


def grid_cases():
    """(axis, group_size, N, K) for every axis x group_size combination."""
    return [(a, g, n, k) for (a, g), shapes in GRID_SHAPES.items() for (n, k) in shapes]


def dtype_id(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def spec_id(spec: QuantSpec) -> str:
    g = "whole" if spec.group_size == -1 else spec.group_size
    return (f"b{spec.bits}-{spec.axis}-g{g}-{'sym' if spec.symmetric else 'asym'}-"
            f"{dtype_id(spec.scale_dtype)}")


def all_specs(scale_dtypes=SCALE_DTYPES):
    for bits, axis, g, sym, sd in itertools.product(BITS, AXES, GROUPS, (True, False), scale_dtypes):
        yield QuantSpec(bits=bits, group_size=g, axis=axis, symmetric=sym, scale_dtype=sd)


def make_weight(n: int, k: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    """A weight with a per-row offset and varied per-row scale (so asymmetric zero points and
    group scales differ), in ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * (0.02 + torch.rand(n, 1, generator=g) * 0.2)
    w = w + (torch.rand(n, 1, generator=g) - 0.5) * 0.1
    return w.to(dtype)


def expand_params(t: torch.Tensor, spec: QuantSpec, n: int, k: int) -> torch.Tensor:
    """Group parameters (canonical scales or zeros) expanded to one value per weight element,
    [N, K]. Independent of layerpress.reference."""
    g = spec.group_for(n, k)
    if spec.axis == "oc":
        assert tuple(t.shape) == (n, k // g)
        return t.repeat_interleave(g, dim=1)
    assert tuple(t.shape) == (k, n // g)
    return t.repeat_interleave(g, dim=1).t()


def zero_points(spec: QuantSpec, scales: torch.Tensor, zeros) -> torch.Tensor:
    """The zero points as a float tensor of the scales' shape (implicit 2^(bits-1) if symmetric)."""
    if zeros is None:
        return torch.full(scales.shape, float(2 ** (spec.bits - 1)), dtype=torch.float64)
    return zeros.to(torch.float64)


def dequant64(codes: torch.Tensor, scales, zeros, spec: QuantSpec) -> torch.Tensor:
    """(q - z) * s in float64 from unpacked codes [N, K]; an independent re-derivation.
    The product is exact in float64, so ``.to(torch.float32)`` is exactly the correctly rounded
    fp32 product (q - z) * s that the format defines (and exact for 16-bit scales)."""
    n, k = codes.shape
    s = expand_params(scales.to(torch.float64), spec, n, k)
    z = expand_params(zero_points(spec, scales, zeros), spec, n, k)
    return (codes.to(torch.float64) - z) * s


def folded_magnitude(codes: torch.Tensor, scales, zeros, spec: QuantSpec) -> torch.Tensor:
    """|s| * (q + z) per element, float64 [N, K] -- the magnitude of the terms a kernel that
    folds the zero point (s * (sum q*x - z * sum x)) may form; it dominates |W| = |s| |q - z|."""
    n, k = codes.shape
    s = expand_params(scales.to(torch.float64).abs(), spec, n, k)
    z = expand_params(zero_points(spec, scales, zeros), spec, n, k)
    return (codes.to(torch.float64) + z) * s


# ---- GEMM tolerance ---------------------------------------------------------------------------
C_ACC = 8.0
U32 = torch.finfo(torch.float32).eps / 2  # unit roundoff of the fp32 accumulators


def gemm_tolerance(a: torch.Tensor, mag: torch.Tensor, y_ref: torch.Tensor, out_dtype: torch.dtype,
                   bias=None) -> torch.Tensor:
    """Elementwise error bound for ``y = a @ magᵀ``-shaped products computed by the kernels.

    ``a``: the activations actually fed to the kernel (already rounded to their dtype), [M, R];
    ``mag``: a per-element magnitude of the weight operand laid out [cols, R] (see
    ``folded_magnitude``); ``y_ref``: the float64 reference [M, cols].

        |y - y_ref| <= C_ACC * u32 * sqrt(R) * (|a| @ magᵀ + |bias|) + eps(out) * |y_ref|

    * The reference is exact up to float64 rounding: same rounded activations, the dequantised
      weight (exact in fp32 for 16-bit scales; the fp32 product for fp32 scales, which the
      kernels form identically) -- so the only error sources are the kernels' fp32 accumulation
      and the final rounding to the output dtype.
    * First term: probabilistic rounding-error bound for a length-R inner product accumulated in
      fp32 (Higham & Mary 2019: |err| <= lambda * sqrt(R) * u * sum |a_r w_r| with overwhelming
      probability for lambda ~ a few); lambda = C_ACC = 8. The sum uses |s|(q + z) rather than
      |s||q - z| because the AVX-512 small-M path folds the zero point, s(sum q x - z sum x),
      whose intermediate terms are that large. Bias is added once in fp32.
    * Second term: one rounding of the fp32 result to the output dtype, u_out |y| <= eps_out |y_ref|
      (eps = 2u leaves room for |y| vs |y_ref|).
    A wrong group index, scale, zero point or bit plane produces errors of order |a| |W|, far
    above this bound (~1e-6 relative for fp32 outputs).
    """
    r = a.shape[-1]
    acc = a.to(torch.float64).abs() @ mag.t()
    if bias is not None:
        acc = acc + bias.to(torch.float64).abs()
    return C_ACC * U32 * math.sqrt(max(r, 1)) * acc + torch.finfo(out_dtype).eps * y_ref.abs()


# The avx512_bf16 CPU variant's forward tile path multiplies bf16-rounded operands (fp32
# accumulation); smaller M stays on the exact table-lookup path. build_info() says from which M
# ("cpu_gemm_bf16_min_m", per bit width, for the active variant). Tests reproduce that rounding
# exactly and keep the fp32-accumulation tolerance above.
BF16_VARIANT = "avx512_bf16"


def cpu_gemm_rounds_to_bf16(m: int, adtype: torch.dtype, bits: int) -> bool:
    """Whether the active CPU GEMM variant computes this forward product (M rows of adtype
    activations, bits-bit weight) from bf16-rounded operands."""
    if adtype not in (torch.float32, torch.bfloat16):
        return False
    min_m = layerpress.build_info()["cpu_gemm_bf16_min_m"].get(str(bits))
    return min_m is not None and m >= min_m


@contextlib.contextmanager
def exact_cpu_gemm():
    """Runs the block on the best CPU GEMM variant that multiplies unrounded operands (for
    comparisons with other devices' kernels), then restores the automatic choice."""
    exact = [v for v in supported_variants() if v != BF16_VARIANT]
    layerpress.set_cpu_gemm_variant(exact[-1])
    try:
        yield exact[-1]
    finally:
        layerpress.set_cpu_gemm_variant("")


def bf16_operands(x: torch.Tensor, w: torch.Tensor, spec: QuantSpec):
    """(x, W) as the bf16 tile path uses them, in float64: activations rounded to bf16 (RNE);
    per-IC weights rounded to bf16 from their fp32 value (q - z)·s, per-OC weights exact (the
    scales are applied to the fp32 group sums)."""
    xk = x.to(torch.bfloat16).to(torch.float64)
    wk = w.to(torch.float32).to(torch.bfloat16).to(torch.float64) if spec.axis == "ic" else w.to(torch.float64)
    return xk, wk


def cpu_gemm_operands(x2: torch.Tensor, w: torch.Tensor, spec: QuantSpec):
    """(x, W) in float64 as the active CPU variant multiplies them for x2 [M, K] (see above)."""
    if cpu_gemm_rounds_to_bf16(x2.shape[0], x2.dtype, spec.bits):
        return bf16_operands(x2, w, spec)
    return x2.to(torch.float64), w.to(torch.float64)


def assert_within(y: torch.Tensor, y_ref: torch.Tensor, tol: torch.Tensor, what: str = ""):
    assert y.shape == y_ref.shape, f"{what}: shape {tuple(y.shape)} != {tuple(y_ref.shape)}"
    assert torch.isfinite(y).all(), f"{what}: non-finite output"
    err = (y.to(torch.float64) - y_ref).abs()
    bad = err > tol
    if bad.any():
        idx = bad.nonzero()[0].tolist()
        ratio = (err / tol.clamp_min(1e-300)).max().item()
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{bad.numel()} elements out of tolerance; first at {idx}: "
            f"got {y[tuple(idx)].item()!r}, ref {y_ref[tuple(idx)].item()!r}, "
            f"err {err[tuple(idx)].item():.3e} > tol {tol[tuple(idx)].item():.3e}; worst err/tol {ratio:.2f}")


def quantized(spec: QuantSpec, n: int, k: int, seed: int = 0, wdtype=torch.float32):
    """(codes, scales, zeros, canonical qweight, native triple) for a random weight."""
    w = make_weight(n, k, wdtype, seed)
    codes, s, z = ops.quantize(w, spec)
    q = ops.pack(codes, spec.bits)
    native = ops.repack(q, s, z, spec)
    return codes, s, z, q, native


def supported_variants():
    return list(layerpress.build_info()["cpu_gemm_variants"])


class TypedOps:
    """``torch.ops.layerpress`` with the Python API's error types: each op call re-raises a
    tagged argument error as the ValueError/TypeError it stands for (layerpress/_errors.py)."""

    def __getattr__(self, name):
        from layerpress._errors import typed_errors
        return typed_errors(getattr(torch.ops.layerpress, name))


def raw_error_contract(fn, exc, match):
    """A raw torch.ops.layerpress call with bad input raises ValueError or RuntimeError (as torch
    delivers the C++ std::invalid_argument) whose message carries the ``[<exc>] `` tag."""
    import re
    import pytest
    with pytest.raises((ValueError, RuntimeError)) as info:
        fn()
    msg = str(info.value)
    assert re.search(rf"\[{exc.__name__}\] ", msg), msg
    assert re.search(match, msg), msg
