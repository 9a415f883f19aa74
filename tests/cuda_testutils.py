"""Test data, bit-exact comparison and the GEMM tolerance shared by the CUDA tests: the GPU suite
(tests/test_cuda.py) and the emulated one (tests/test_cuda_emulated.py) check the same kernels
against the same CPU ops and references.

GEMM tolerance rule, elementwise, with R the reduction length (K for gemm, N for gemm_t),
u32 = 2^-24 the unit roundoff of fp32 and |W|~ = |s| (q + z) the zero-point-folded magnitude of
each weight (it dominates |W| = |s| |q - z|):

    |y - y_ref| <= 2 * (R + 1) * u32 * (|a| @ |W|~ᵀ + |bias|) + eps(out) * |y_ref| + eps(out) * tiny(out)

y_ref is the float64 product of the same (already rounded) activations ``a`` and the dequantised
weight (layerpress.reference.dequantize: exactly the fp32 values (q - z) * s the kernels decode),
so the only error sources are the kernels' fp32 arithmetic and the final rounding:
* the first term is the worst-case bound for forming R products and summing them (plus the bias)
  in fp32 in any order, gamma_(R+1) <= (R + 1.01) u32, doubled for slack -- it holds whatever the
  summation order or split, so it is not tied to one kernel's reduction tree; measuring it with
  |W|~ instead of |W| also covers kernels that fold the zero point, s (sum q a - z sum a) (the CPU
  kernels do; the CUDA kernel decodes (q - z) s per weight), whose partial sums are that large;
* the second and third are one rounding of the fp32 result to the output dtype: relative for
  normal results (eps = 2u leaves room for |y| vs |y_ref|), absolute (the subnormal spacing
  eps * tiny, e.g. 2^-24 for float16) for results in the subnormal range.
A wrong code, group index, scale or zero point gives errors of order |a| |W|, far above the bound
(for the grid shapes, R <= 256, the first term is below 3.1e-5 of sum |a||W|~; 4.9e-4 for K = 4096).
"""
from __future__ import annotations

import functools
import itertools

import torch

from layerpress import QuantSpec, ops
from layerpress import reference as R

U32 = 2.0 ** -24

BITS = (2, 3, 4, 8)
AXES = ("oc", "ic")
GROUPS = (32, 64, 128, 256, -1)
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# [N, K] per (axis, group_size): per-OC with odd N; per-IC needs N % g == 0, so odd N only for the
# whole-column group. K = 96 (three 32-code blocks) where the group allows it.
SHAPES = {
    ("oc", 32): (37, 256), ("oc", 64): (37, 256), ("oc", 128): (37, 256), ("oc", 256): (37, 256),
    ("oc", -1): (37, 96),
    ("ic", 32): (96, 64), ("ic", 64): (128, 96), ("ic", 128): (128, 32), ("ic", 256): (256, 32),
    ("ic", -1): (33, 96),
}


def dtype_id(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def spec_id(spec: QuantSpec) -> str:
    g = "whole" if spec.group_size == -1 else spec.group_size
    return f"b{spec.bits}-{spec.axis}-g{g}-{'sym' if spec.symmetric else 'asym'}-{dtype_id(spec.scale_dtype)}"


SPECS = [QuantSpec(bits=b, group_size=g, axis=a, symmetric=s, scale_dtype=sd)
         for b, a, g, s, sd in itertools.product(BITS, AXES, GROUPS, (False, True), FLOAT_DTYPES)]
SPEC_IDS = [spec_id(s) for s in SPECS]


def shape_of(spec: QuantSpec):
    return SHAPES[(spec.axis, spec.group_size)]


def sample_weight(n: int, k: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    """Per-row offsets and scales (distinct zero points and group scales), a few outliers, an
    all-zero row (zero scale -> stored as 1) and exact ties for the rounding (k/4 values)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * (0.02 + torch.rand(n, 1, generator=g) * 0.2)
    w = w + (torch.rand(n, 1, generator=g) - 0.5) * 0.1
    w.view(-1)[::97] *= 40.0
    w[0] = 0.0
    if n > 2:
        w[1] = torch.randint(-16, 17, (k,), generator=g).float() / 4
    return w.to(dtype)


def activation(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) + 0.25).to(dtype)


def assert_same_bits(got: torch.Tensor, want: torch.Tensor, what: str):
    """Equal dtype, shape and bits (floats compared as integers)."""
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    g, w = got.detach().cpu().contiguous(), want.detach().cpu().contiguous()
    if g.is_floating_point():
        as_int = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16,
                  torch.float64: torch.int64}
        g, w = g.view(as_int[g.dtype]), w.view(as_int[w.dtype])
    if not torch.equal(g, w):
        bad = (g != w).nonzero()
        idx = tuple(bad[0].tolist())
        raise AssertionError(f"{what}: {bad.shape[0]}/{g.numel()} elements differ; first at {list(idx)}: "
                             f"got {got.cpu()[idx].item()!r}, want {want.cpu()[idx].item()!r}")


def folded_magnitude(codes: torch.Tensor, scales, zeros, spec: QuantSpec) -> torch.Tensor:
    """|s| (q + z) per weight, float64 [N, K] (z = 2^(bits-1) when symmetric)."""
    n, k = codes.shape
    g = spec.group_for(n, k)
    s = scales.to(torch.float64).abs()
    z = (torch.full(s.shape, 2.0 ** (spec.bits - 1), dtype=torch.float64) if zeros is None
         else zeros.to(torch.float64))
    if spec.axis == "oc":   # scales [N, K/g]
        s_full, z_full = s.repeat_interleave(g, 1), z.repeat_interleave(g, 1)
    else:                   # scales [K, N/g]
        s_full, z_full = s.repeat_interleave(g, 1).t(), z.repeat_interleave(g, 1).t()
    return s_full * (codes.to(torch.float64) + z_full)


def gemm_tolerance(a: torch.Tensor, mag: torch.Tensor, y_ref: torch.Tensor, out_dtype: torch.dtype,
                   bias=None) -> torch.Tensor:
    """The module docstring's bound for y = a @ Wᵀ (+ bias): a [M, R], mag = |W|~ laid out
    [cols, R] float64."""
    r = a.shape[-1]
    acc = a.to(torch.float64).abs() @ mag.t()
    if bias is not None:
        acc = acc + bias.cpu().to(torch.float64).abs()
    fi = torch.finfo(out_dtype)
    return 2 * (r + 1) * U32 * acc + fi.eps * y_ref.abs() + fi.eps * fi.tiny


def assert_within(y: torch.Tensor, y_ref: torch.Tensor, tol: torch.Tensor, what: str):
    y = y.detach().cpu()
    assert y.shape == y_ref.shape, f"{what}: shape {tuple(y.shape)} != {tuple(y_ref.shape)}"
    assert torch.isfinite(y).all(), f"{what}: non-finite output"
    err = (y.to(torch.float64) - y_ref).abs()
    bad = err > tol
    if bad.any():
        idx = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{bad.numel()} elements out of tolerance; first at {list(idx)}: "
            f"got {y[idx].item()!r}, ref {y_ref[idx].item()!r}, err {err[idx].item():.3e} > "
            f"tol {tol[idx].item():.3e}; worst err/tol {(err / tol.clamp_min(1e-300)).max().item():.2f}")


@functools.lru_cache(maxsize=None)
def quantized(spec: QuantSpec):
    """CPU quantisation of the spec's test weight: (codes, scales, zeros, qweight, float64 W,
    |W|~ for the tolerance)."""
    n, k = shape_of(spec)
    w = sample_weight(n, k, seed=n + 7 * spec.bits)
    codes, s, z = ops.quantize(w, spec)
    q = ops.pack(codes, spec.bits)
    w64 = R.dequantize(codes, s, z, spec).double()
    return codes, s, z, q, w64, folded_magnitude(codes, s, z, spec)


# ---- the tensor-core GEMM (Layout.CUDA_MMA): what rounding to the activation type adds -------------
# Its mma.sync products take fp16/bf16 operands, so each weight (q - z) s (per-OC) or each x s
# (per-IC) is rounded once to the activation type before the product (a scale of another dtype
# once more when converted); accumulation stays fp32.
MMA_UNIT = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


def mma_rounding_tolerance(a, w64, spec, act_dtype):
    """What rounding weights (or activation x scale) to the activation type adds to the bound."""
    u = MMA_UNIT[act_dtype]
    roundings = 1 if spec.scale_dtype == act_dtype else 2
    rel = 2 * roundings * u * (a.to(torch.float64).abs() @ w64.abs().t())
    sub = 0.0
    if act_dtype == torch.float16:  # subnormal products: 2^-25 absolute per term
        qmax = 2 ** spec.bits - 1
        sub = 2.0 ** -25 * (a.to(torch.float64).abs().sum(-1, keepdim=True) + qmax * a.shape[-1]) * 2
    return rel + sub


def mma_rounded_reference(x, codes, s, z, spec, act_dtype):
    """float64 product with exactly the roundings the kernel makes when the scales have the
    activation dtype: per-OC each weight (q - z) s rounded once to it (the fp32 product is exact),
    per-IC each x s rounded once to it and B = q - z exact. Only fp32 summation error remains."""
    n, k = codes.shape
    g = spec.group_for(n, k)
    zf = (torch.full(s.shape, 2 ** (spec.bits - 1)) if z is None else z).float()
    if spec.axis == "oc":
        w = (codes.float() - zf.repeat_interleave(g, 1)) * s.float().repeat_interleave(g, 1)
        return x.double() @ w.to(act_dtype).double().t()
    y = torch.empty(x.shape[0], n, dtype=torch.float64)
    for gi in range(n // g):
        cols = slice(gi * g, (gi + 1) * g)
        a = (x.float() * s[:, gi].float()).to(act_dtype).double()           # [M, K]
        b = codes[cols].double() - zf[:, gi].double()[None, :]               # [g, K]
        y[:, cols] = a @ b.t()
    return y
