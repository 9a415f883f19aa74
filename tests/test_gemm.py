"""ops.gemm / ops.gemm_t on the CPU bit-plane layout against float64 references, for every CPU
GEMM variant this machine supports.

Tolerance rule (lp_testutils.gemm_tolerance), elementwise, with R the reduction length (K for
gemm, N for gemm_t), u32 = 2^-24 the unit roundoff of the fp32 accumulators and
|W|~ = |s| (q + z) the zero-point-folded weight magnitude:

    |y - y_ref| <= 8 * u32 * sqrt(R) * (|x| @ |W|~ᵀ + |bias|) + eps(out dtype) * |y_ref|

y_ref is computed in float64 from the same (already rounded) activations and the exactly
dequantised weight, so the only error sources are the kernels' fp32 accumulation (probabilistic
sqrt(R) bound, Higham & Mary) and the final rounding to the output dtype. For the avx512_bf16
variant's bf16 tile path the reference uses the operands that path multiplies (activations
rounded to bf16, per-IC weights rounded to bf16; lp_testutils.cpu_gemm_operands), so the same
bound holds and a wrong code, scale or zero point is caught as for the exact variants.
"""
from __future__ import annotations

import functools
import math

import pytest
import torch
from hypothesis import given, strategies as st

import layerpress
from layerpress import QuantSpec, ops
from layerpress import reference as R

from lp_testutils import (BITS, C_ACC, FLOAT_DTYPES, SCALE_DTYPES, U32, assert_within, bf16_operands,
                          cpu_gemm_operands, cpu_gemm_rounds_to_bf16, dtype_id, folded_magnitude,
                          gemm_tolerance, grid_cases, make_weight, spec_id, supported_variants)

pytestmark = pytest.mark.usefixtures("torch_single_thread")

GRID = grid_cases()
GRID_IDS = [f"{a}-g{'whole' if g == -1 else g}-{n}x{k}" for a, g, n, k in GRID]
# 1, odd sizes, both sides of the small-M/tile-path crossovers (4/5 and 48/bits = 6/12/16/24) and
# of the 6-row register blocks
MS = (1, 2, 3, 5, 6, 7, 8, 12, 13, 17, 24, 25, 33)



@functools.lru_cache(maxsize=None)
def _weight(bits, axis, group, sym, sd, n, k, seed=0):
    spec = QuantSpec(bits=bits, group_size=group, axis=axis, symmetric=sym, scale_dtype=sd)
    w = make_weight(n, k, torch.float32, seed=seed + 13 * bits + n)
    codes, s, z = ops.quantize(w, spec)
    native = ops.repack(ops.pack(codes, bits), s, z, spec)
    w64 = R.dequantize(codes, s, z, spec).double()
    mag = folded_magnitude(codes, s, z, spec)
    return spec, codes, s, z, native, w64, mag


@functools.lru_cache(maxsize=None)
def _weight_t(*key):
    """_weight plus contiguous transposes (float64 matmuls with a transposed operand are slow)."""
    spec, codes, s, z, native, w64, mag = _weight(*key)
    return spec, native, w64, w64.t().contiguous(), mag, mag.t().contiguous()


def _ms_for(salt, sd):
    """The M values of MS run with scale dtype sd (each M uses one of the three, rotating)."""
    i = SCALE_DTYPES.index(sd)
    return [m for m in MS if (salt + m) % 3 == i]


def _act(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) + 0.25).to(dtype)  # non-zero mean stresses zero folding


def check_gemm(spec, native, codes, s, z, mag, x, bias, what):
    n = mag.shape[0]
    q, sc, ze = native
    y = ops.gemm(x, q, sc, ze, bias, spec, n)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], n), what
    x2 = x.reshape(-1, x.shape[-1])
    xk, wk = cpu_gemm_operands(x2, R.dequantize(codes, s, z, spec), spec)
    y_ref = xk @ wk.t() + (0 if bias is None else bias.double())
    tol = gemm_tolerance(xk, mag, y_ref, x.dtype, bias)
    assert_within(y.reshape(-1, n), y_ref, tol, what)
    return y


def check_gemm_t(spec, native, w64, mag, g, what):
    n, k = w64.shape
    q, sc, ze = native
    y = ops.gemm_t(g, q, sc, ze, spec, n)
    assert y.dtype == g.dtype and y.shape == (*g.shape[:-1], k), what
    g2 = g.reshape(-1, n)
    y_ref = g2.double() @ w64
    tol = gemm_tolerance(g2, mag.t(), y_ref, g.dtype)
    assert_within(y.reshape(-1, k), y_ref, tol, what)
    return y


@pytest.mark.parametrize("adtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("axis,group,n,k", GRID, ids=GRID_IDS)
@pytest.mark.parametrize("bits", BITS)
def test_gemm_grid(cpu_variant, bits, axis, group, n, k, symmetric, adtype):
    """Every M in MS, with and without bias; the scale dtype rotates with (bits, M). The rows of
    x[:m] are a prefix of one activation block, so one float64 reference serves every M."""
    x_all = _act((max(MS), k), adtype, seed=k)
    bias = _act((n,), adtype, seed=n)
    for sd in SCALE_DTYPES:
        spec, native, w64, w64t, mag, magt = _weight_t(bits, axis, group, symmetric, sd, n, k)
        y_all = x_all.double() @ w64t     # reference.gemm with the cached dequantised weight
        acc_all = x_all.double().abs() @ magt
        bf16_all = None  # the same for the operands of the bf16 tile path, when a case needs it
        for m in _ms_for(bits, sd):
            x = x_all[:m]
            what = f"{cpu_variant} {spec_id(spec)} N={n} K={k} M={m} x={dtype_id(adtype)}"
            ys, accs = y_all, acc_all
            if cpu_gemm_rounds_to_bf16(m, adtype, bits):
                if bf16_all is None:
                    xk, wk = bf16_operands(x_all, w64t.t(), spec)
                    bf16_all = (xk @ wk.t(), xk.abs() @ magt)
                ys, accs = bf16_all
            for b in (bias, None):
                y = ops.gemm(x, *native, b, spec, n)
                assert y.dtype == adtype and y.shape == (m, n), what
                y_ref = ys[:m] if b is None else ys[:m] + b.double()
                acc = accs[:m] if b is None else accs[:m] + b.double().abs()
                tol = C_ACC * U32 * math.sqrt(k) * acc + torch.finfo(adtype).eps * y_ref.abs()
                assert_within(y, y_ref, tol, what + (" bias" if b is not None else " no bias"))


@pytest.mark.parametrize("adtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("axis,group,n,k", GRID, ids=GRID_IDS)
@pytest.mark.parametrize("bits", BITS)
def test_gemm_t_grid(cpu_variant, bits, axis, group, n, k, symmetric, adtype):
    g_all = _act((max(MS), n), adtype, seed=n + 1)
    for sd in SCALE_DTYPES:
        spec, native, w64, w64t, mag, magt = _weight_t(bits, axis, group, symmetric, sd, n, k)
        y_all = g_all.double() @ w64      # G · dequant(W)
        tol_all = gemm_tolerance(g_all, magt, y_all, adtype)
        for m in _ms_for(bits + 1, sd):
            y = ops.gemm_t(g_all[:m], *native, spec, n)
            assert y.dtype == adtype and y.shape == (m, k)
            assert_within(y, y_all[:m], tol_all[:m],
                          f"{cpu_variant} {spec_id(spec)} N={n} K={k} M={m} g={dtype_id(adtype)}")


@pytest.mark.parametrize("spec,k", [
    (QuantSpec(4, 128, "oc", False, torch.float16), 640), (QuantSpec(3, -1, "oc", True, torch.bfloat16), 544),
    (QuantSpec(2, 32, "ic", False, torch.float32), 544), (QuantSpec(8, -1, "ic", True, torch.float16), 544),
], ids=lambda v: spec_id(v) if isinstance(v, QuantSpec) else f"K{v}")
@pytest.mark.parametrize("m", [3, 8])
def test_gemm_multiple_panels(cpu_variant, spec, k, m):
    """K > 256 and N > 256: several reduction panels, a partial last panel, an odd K/32 and a
    partial last row tile."""
    n = 300 if spec.group_size == -1 or spec.axis == "oc" else 288
    spec, codes, s, z, native, w64, mag = _weight(spec.bits, spec.axis, spec.group_size, spec.symmetric,
                                                  spec.scale_dtype, n, k)
    x = _act((m, k), torch.float32, seed=1)
    check_gemm(spec, native, codes, s, z, mag, x, _act((n,), torch.float32, seed=2), f"{cpu_variant} big")
    check_gemm_t(spec, native, w64, mag, _act((m, n), torch.float32, seed=3), f"{cpu_variant} big t")


@pytest.mark.parametrize("adtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("m", [1, 3, 7])
def test_gemm_smallest_k_and_single_row_weight(cpu_variant, adtype, m):
    for bits, axis, n in ((4, "oc", 1), (2, "oc", 5), (8, "ic", 1), (3, "ic", 7)):
        spec, codes, s, z, native, w64, mag = _weight(bits, axis, -1, False, torch.float16, n, 32)
        x = _act((m, 32), adtype, seed=m)
        check_gemm(spec, native, codes, s, z, mag, x, _act((n,), adtype, seed=5), f"{cpu_variant} n={n}")
        check_gemm_t(spec, native, w64, mag, _act((m, n), adtype, seed=6), f"{cpu_variant} t n={n}")


@pytest.mark.parametrize("adtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("spec", [QuantSpec(4, 32, "oc", False, torch.float16),
                                  QuantSpec(3, 32, "ic", True, torch.bfloat16)], ids=spec_id)
def test_gemm_input_shapes_and_strides(cpu_variant, spec, adtype):
    n, k = 64, 96
    spec, codes, s, z, native, w64, mag = _weight(spec.bits, spec.axis, spec.group_size, spec.symmetric,
                                                  spec.scale_dtype, n, k)
    bias = _act((n,), adtype, seed=7)
    tag = f"{cpu_variant} {spec_id(spec)} {dtype_id(adtype)}"
    # 3-D [B, S, K]
    x3 = _act((2, 5, k), adtype, seed=8)
    y3 = check_gemm(spec, native, codes, s, z, mag, x3, bias, tag + " 3-D")
    # 1-D [K]
    x1 = _act((k,), adtype, seed=9)
    y1 = check_gemm(spec, native, codes, s, z, mag, x1, bias, tag + " 1-D")
    assert y1.shape == (n,)
    # row-strided 2-D input: a column slice of a wider tensor (no copy made by the caller)
    for m in (1, 3, 6):
        wide = _act((m, k + 40), adtype, seed=10 + m)
        xs = wide[:, 8:8 + k]
        assert not xs.is_contiguous() or m == 1
        ys = check_gemm(spec, native, codes, s, z, mag, xs, bias, tag + f" strided m={m}")
        assert torch.equal(ys, ops.gemm(xs.contiguous(), *native, bias, spec, n))
    # a broadcast row (row stride 0) and every other row of a wider batch
    for m in (2, 5, 30):
        check_gemm(spec, native, codes, s, z, mag, _act((1, k), adtype, seed=30).expand(m, k), bias,
                   tag + f" expanded m={m}")
    big = _act((3, 5, k + 20), adtype, seed=31)
    check_gemm(spec, native, codes, s, z, mag, big[:, ::2, 10:10 + k], bias, tag + " every other row")
    # row-strided 3-D input, and a 3-D input whose rows cannot be flattened into one stride
    wide3 = _act((2, 4, k + 32), adtype, seed=20)
    check_gemm(spec, native, codes, s, z, mag, wide3[:, :, :k], bias, tag + " strided 3-D")
    check_gemm(spec, native, codes, s, z, mag, wide3[:, 1:, 16:16 + k], bias, tag + " strided 3-D b")
    # rows are independent: the portable kernel accumulates each row in the same order whatever M
    # is, so splitting the batch gives bitwise the same rows
    if cpu_variant == "generic":
        rows = torch.stack([ops.gemm(x3[i], *native, bias, spec, n) for i in range(2)])
        assert torch.equal(rows, y3)
    # gemm_t with 3-D and row-strided gradients
    check_gemm_t(spec, native, w64, mag, _act((2, 3, n), adtype, seed=21), tag + " t 3-D")
    gw = _act((5, n + 16), adtype, seed=22)
    check_gemm_t(spec, native, w64, mag, gw[:, 16:], tag + " t strided")


@pytest.mark.parametrize("adtype", FLOAT_DTYPES, ids=dtype_id)
def test_empty_batch(cpu_variant, adtype):
    spec, codes, s, z, native, w64, mag = _weight(4, "oc", 32, False, torch.float16, 33, 64)
    bias = torch.zeros(33, dtype=adtype)
    for shape in ((0, 64), (2, 0, 64), (0, 3, 64)):
        x = torch.empty(shape, dtype=adtype)
        y = ops.gemm(x, *native, bias, spec, 33)
        assert y.shape == (*shape[:-1], 33) and y.dtype == adtype and y.numel() == 0
        y = ops.gemm(x, *native, None, spec, 33)
        assert y.shape == (*shape[:-1], 33)
        g = torch.empty((*shape[:-1], 33), dtype=adtype)
        t = ops.gemm_t(g, *native, spec, 33)
        assert t.shape == (*shape[:-1], 64) and t.dtype == adtype


@pytest.mark.parametrize("xshape,n", [
    ((0, 64), 33), ((2, 0, 64), 33), ((3, 64), 1),
    ((1, 64), 1), ((64,), 1),
], ids=["empty", "empty-3d", "three-rows-one-output", "one-row-one-output", "1d-one-output"])
def test_backward_degenerate_shapes(xshape, n):
    """Backward of y.sum() where the incoming gradient is an expanded scalar: an empty batch, and
    a single row through a single-output layer (e.g. a value head on one token)."""
    spec, codes, s, z, native, w64, mag = _weight(4, "oc", 32, False, torch.float16, n, 64)
    x = _act(xshape, torch.float32, seed=1).requires_grad_()
    b = torch.zeros(n, requires_grad=True)
    ops.gemm(x, *native, b, spec, n).sum().backward()
    want = torch.ones(*xshape[:-1], n, dtype=torch.float64) @ w64
    assert x.grad.shape == x.shape
    assert torch.allclose(x.grad.double(), want, rtol=1e-5, atol=1e-6)
    assert torch.equal(b.grad, torch.full((n,), float(x[..., 0].numel())))


def test_variants_agree():
    """All supported variants compute the same product (within the rounding tolerance of each);
    also a sanity check that forcing a variant really changes the code path for the LUT regime."""
    variants = supported_variants()
    spec, codes, s, z, native, w64, mag = _weight(4, "oc", 32, False, torch.float16, 64, 256)
    x = _act((3, 256), torch.float32, seed=4)
    outs = {}
    for v in variants:
        layerpress.set_cpu_gemm_variant(v)
        assert layerpress.build_info()["cpu_kernels"]["gemm"] == v
        xk, wk = cpu_gemm_operands(x, w64, spec)  # what this variant multiplies
        y_ref = xk @ wk.t()
        outs[v] = (ops.gemm(x, *native, None, spec, 64), y_ref, gemm_tolerance(xk, mag, y_ref, torch.float32))
    layerpress.set_cpu_gemm_variant("")
    for v, (y, y_ref, tol) in outs.items():
        assert_within(y, y_ref, tol, v)
    with pytest.raises(ValueError, match="variant"):
        layerpress.set_cpu_gemm_variant("no-such-variant")


@st.composite
def gemm_case(draw):
    bits = draw(st.sampled_from(BITS))
    axis = draw(st.sampled_from(["oc", "ic"]))
    k = 32 * draw(st.integers(1, 12))
    if axis == "oc":
        group = draw(st.sampled_from([g for g in (32, 64, 128, 256, -1) if g == -1 or k % g == 0]))
        n = draw(st.integers(1, 80))
    else:
        group = draw(st.sampled_from([32, 64, -1]))
        n = draw(st.integers(1, 80)) if group == -1 else group * draw(st.integers(1, 80 // group))
    spec = QuantSpec(bits=bits, group_size=group, axis=axis, symmetric=draw(st.booleans()),
                     scale_dtype=draw(st.sampled_from(FLOAT_DTYPES)))
    return spec, n, k, draw(st.integers(1, 12)), draw(st.sampled_from(FLOAT_DTYPES))


@given(case=gemm_case(), variant=st.sampled_from(supported_variants()), seed=st.integers(0, 999),
       use_bias=st.booleans())
def test_gemm_random(case, variant, seed, use_bias):
    spec, n, k, m, adtype = case
    spec, codes, s, z, native, w64, mag = _weight(spec.bits, spec.axis, spec.group_size, spec.symmetric,
                                                  spec.scale_dtype, n, k, seed)
    layerpress.set_cpu_gemm_variant(variant)
    try:
        x = _act((m, k), adtype, seed)
        bias = _act((n,), adtype, seed + 1) if use_bias else None
        what = f"{variant} {spec_id(spec)} N={n} K={k} M={m} {dtype_id(adtype)}"
        check_gemm(spec, native, codes, s, z, mag, x, bias, what)
        check_gemm_t(spec, native, w64, mag, _act((m, n), adtype, seed + 2), what + " t")
    finally:
        layerpress.set_cpu_gemm_variant("")


def test_gemm_bias_only_changes_by_bias(cpu_variant):
    spec, codes, s, z, native, w64, mag = _weight(3, "ic", 32, False, torch.float32, 64, 128)
    x = _act((5, 128), torch.float32, seed=2)
    b = torch.arange(64, dtype=torch.float32)
    y0 = ops.gemm(x, *native, None, spec, 64)
    y1 = ops.gemm(x, *native, b, spec, 64)
    assert torch.allclose(y1 - y0, b.expand_as(y0), atol=1e-4, rtol=0)


@pytest.mark.parametrize("spec,n,k", [
    (QuantSpec(4, 128, "oc", False, torch.float16), 300, 512),
    (QuantSpec(2, 32, "ic", False, torch.bfloat16), 288, 512),
    (QuantSpec(3, -1, "ic", True, torch.float32), 301, 256),
], ids=lambda v: spec_id(v) if isinstance(v, QuantSpec) else str(v))
def test_results_independent_of_thread_count(cpu_variant, spec, n, k):
    """The kernels split work over whole output panels/tiles, so the result is bitwise the same
    for any number of threads (the rest of this module runs single-threaded for speed)."""
    spec, codes, s, z, native, w64, mag = _weight(spec.bits, spec.axis, spec.group_size, spec.symmetric,
                                                  spec.scale_dtype, n, k)
    bias = _act((n,), torch.float32, seed=3)
    outs = {}
    old = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs[threads] = [ops.gemm(_act((m, k), torch.float32, seed=m), *native, bias, spec, n)
                             for m in (1, 2, 5, 40)]
            outs[threads] += [ops.gemm_t(_act((m, n), torch.float32, seed=m), *native, spec, n)
                              for m in (1, 40)]
    finally:
        torch.set_num_threads(old)
    for threads in (2, 3):
        for a, b in zip(outs[1], outs[threads]):
            assert torch.equal(a, b), f"{threads} threads differ from 1"
    x = _act((40, k), torch.float32, seed=40)
    xk, wk = cpu_gemm_operands(x, w64, spec)
    y_ref = xk @ wk.t() + bias.double()
    assert_within(outs[2][3], y_ref, gemm_tolerance(xk, mag, y_ref, torch.float32, bias), "2 threads")


def test_wrapper_skips_autograd_only_when_no_input_needs_grad():
    """ops.gemm / gemm_t and the norm wrappers call below the Autograd key when nothing needs a
    gradient (layerpress.ops.call_below_autograd_if_no_grad): same values, no graph; with an
    input that needs one, the graph is built as before."""
    import layerpress.ops as lops
    from layerpress import norm_ops
    assert lops._BELOW_AUTOGRAD is not None  # this torch has the guard: the fast path is tested
    spec = QuantSpec(4, 32, "oc", False, torch.float16)
    w = torch.randn(16, 64)
    codes, s, z = ops.quantize(w, spec)
    q, s, z = ops.repack(ops.pack(codes, 4), s, z, spec)
    x, bias = torch.randn(3, 64), torch.randn(16)
    ref = torch.ops.layerpress.gemm(x, q, s, z, bias, 4, 32, 0, 1, 16)
    with torch.no_grad():
        y = ops.gemm(x, q, s, z, bias.requires_grad_(), spec, 16)
    assert torch.equal(y, ref) and y.grad_fn is None and not y.requires_grad
    y = ops.gemm(x, q, s, z, bias, spec, 16)  # bias needs a gradient: graph
    assert y.grad_fn is not None
    y.sum().backward()
    assert torch.allclose(bias.grad, torch.full((16,), 3.0))
    y = ops.gemm(x, q, s, z, bias.detach(), spec, 16)  # nothing needs one: no graph
    assert torch.equal(y, ref) and y.grad_fn is None
    g = ops.gemm_t(torch.randn(3, 16), q, s, z, spec, 16)
    assert g.grad_fn is None and g.shape == (3, 64)
    xr = torch.randn(4, 64, requires_grad=True)
    assert norm_ops.rms_norm(xr).grad_fn is not None
    with torch.no_grad():
        assert norm_ops.rms_norm(xr).grad_fn is None
