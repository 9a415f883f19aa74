"""The CUDA ops (cuda/ops/cuda_ops.cpp) against the CPU ops and float64 references. GPU only:
every test is marked ``gpu`` (conftest skips them without CUDA).

Format ops (quantize, pack, unpack, dequantize) must equal the CPU ops bit for bit: codes,
scales, zeros, packed words and dequantised weights (compared as raw bits, so even the sign of a
zero counts).

The GEMM tolerance rule is in tests/cuda_testutils.py.
"""
from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

import layerpress
from layerpress import Layout, QuantLinear, QuantSpec, ops
from layerpress import reference as R

from cuda_testutils import (AXES, BITS, FLOAT_DTYPES, SPECS, SPEC_IDS, activation,
                             assert_same_bits, assert_within, dtype_id, folded_magnitude, gemm_tolerance,
                             mma_rounding_tolerance, quantized, shape_of, spec_id, sample_weight)

pytestmark = pytest.mark.gpu

DEVICE = torch.device("cuda")
CANONICAL = Layout.CANONICAL

MS = (1, 3, 16, 33)


def _module_weight(ql: QuantLinear, spec: QuantSpec):
    """(float64 W, |W|~) of a QuantLinear, from its canonical triple on the CPU."""
    q, sc, z = (None if t is None else t.cpu() for t in ql.canonical())
    codes = R.unpack(q, spec.bits)
    return R.dequantize(codes, sc, z, spec).double(), folded_magnitude(codes, sc, z, spec)


def _to_dev(*ts):
    return tuple(None if t is None else t.to(DEVICE) for t in ts)


# ---- format ops: bit-exact against the CPU ------------------------------------------------------

@pytest.mark.parametrize("wdtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_quantize_matches_cpu(spec, wdtype):
    n, k = shape_of(spec)
    w = sample_weight(n, k, wdtype, seed=3 * n + spec.bits)
    want = ops.quantize(w, spec)
    got = ops.quantize(w.to(DEVICE), spec)
    for name, g, c in zip(("codes", "scales", "zeros"), got, want):
        if c is None:
            assert g is None, name
        else:
            assert g.device.type == "cuda", name
            assert_same_bits(g, c, f"{spec_id(spec)} {name}")
    # given scales (and zeros): the codes are recomputed from them, the scales returned as given
    given = ops.quantize(w.to(DEVICE), spec, *_to_dev(want[1], want[2]))
    for name, g, c in zip(("codes", "scales", "zeros"), given, want):
        if c is not None:
            assert_same_bits(g, c, f"{spec_id(spec)} given-scales {name}")


@pytest.mark.parametrize("spec", [QuantSpec(bits=b, group_size=32, axis=a, symmetric=s)
                                  for b, a, s in itertools.product(BITS, AXES, (False, True))], ids=spec_id)
def test_quantize_ties_round_half_even(spec):
    """Given scale 0.5 and weights on multiples of 0.25: every w/s is an integer or a tie."""
    n, k = 64, 64
    w = torch.randint(-40, 41, (n, k), generator=torch.Generator().manual_seed(1)).float() / 4
    shape = spec.scale_shape(n, k)
    s = torch.full(shape, 0.5, dtype=spec.scale_dtype)
    z = None if spec.symmetric else torch.full(shape, 2 ** (spec.bits - 1) - 1, dtype=torch.uint8)
    want = ops.quantize(w, spec, s, z)
    got = ops.quantize(w.to(DEVICE), spec, *_to_dev(s, z))
    assert_same_bits(got[0], want[0], "codes")
    assert_same_bits(got[0], R.quantize(w, spec, s, z)[0], "codes vs reference")


def test_quantize_large_grid():
    """More groups than one wave of threads (grid-stride loops), both axes."""
    w = sample_weight(512, 4096, seed=5)
    for axis in AXES:
        spec = QuantSpec(bits=3, group_size=32, axis=axis, symmetric=False, scale_dtype=torch.bfloat16)
        want = ops.quantize(w, spec)
        got = ops.quantize(w.to(DEVICE), spec)
        for name, g, c in zip(("codes", "scales", "zeros"), got, want):
            assert_same_bits(g, c, f"{axis} {name}")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_quantize_rejects_nonfinite(bad):
    w = sample_weight(37, 256)
    w[5, 17] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        ops.quantize(w.to(DEVICE), QuantSpec())


@pytest.mark.parametrize("shape", [(37, 256), (1, 32), (300, 4096)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("bits", BITS)
def test_pack_unpack_match_cpu(bits, shape):
    n, k = shape
    codes = torch.randint(0, 2 ** bits, (n, k), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(bits * 1000 + n))
    want = ops.pack(codes, bits)
    got = ops.pack(codes.to(DEVICE), bits)
    assert_same_bits(got, want, "packed")
    assert_same_bits(got, R.pack(codes, bits), "packed vs reference")
    assert_same_bits(ops.unpack(got, bits), codes, "unpacked")


def test_pack_unpack_empty_rows():
    codes = torch.zeros(0, 64, dtype=torch.uint8, device=DEVICE)
    q = ops.pack(codes, 3)
    assert q.shape == (0, 6) and q.device.type == "cuda"
    assert ops.unpack(q, 3).shape == (0, 64)


@pytest.mark.parametrize("out_dtype", FLOAT_DTYPES + (torch.float64,), ids=dtype_id)
@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_dequantize_matches_cpu(spec, out_dtype):
    codes, s, z, q, _, _ = quantized(spec)
    want = ops.dequantize(q, s, z, spec, out_dtype)
    got = ops.dequantize(*_to_dev(q, s, z), spec, out_dtype)
    assert_same_bits(got, want, f"{spec_id(spec)} dequantize")


def test_dequantize_default_dtype_is_scale_dtype():
    spec = QuantSpec(scale_dtype=torch.bfloat16)
    _, s, z, q, _, _ = quantized(spec)
    assert ops.dequantize(*_to_dev(q, s, z), spec).dtype == torch.bfloat16


# ---- GEMM against float64 references -------------------------------------------------------------

def _gemm_case(spec, dtype, m, seed, with_bias):
    n, k = shape_of(spec)
    codes, s, z, q, w64, mag = quantized(spec)
    x = activation((m, k), dtype, seed)
    bias = activation((n,), dtype, seed + 1) if with_bias else None
    y = ops.gemm(*_to_dev(x, q, s, z, bias), spec, n, CANONICAL)
    assert y.device.type == "cuda" and y.dtype == dtype and y.shape == (m, n)
    y_ref = x.double() @ w64.t() + (0 if bias is None else bias.double())
    return y, y_ref, gemm_tolerance(x, mag, y_ref, dtype, bias)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_gemm_matches_reference(spec, dtype):
    for i, m in enumerate(MS):
        y, y_ref, tol = _gemm_case(spec, dtype, m, seed=10 * m + spec.bits, with_bias=i % 2 == 0)
        assert_within(y, y_ref, tol, f"{spec_id(spec)} gemm {dtype_id(dtype)} M={m}")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_gemm_t_matches_reference(spec, dtype):
    n, k = shape_of(spec)
    codes, s, z, q, w64, mag = quantized(spec)
    for m in MS:
        g = activation((m, n), dtype, seed=20 * m + spec.bits)
        y = ops.gemm_t(*_to_dev(g, q, s, z), spec, n, CANONICAL)
        assert y.device.type == "cuda" and y.dtype == dtype and y.shape == (m, k)
        y_ref = g.double() @ w64
        assert_within(y, y_ref, gemm_tolerance(g, mag.t(), y_ref, dtype),
                      f"{spec_id(spec)} gemm_t {dtype_id(dtype)} M={m}")


def test_gemm_cuda_matches_cpu_op():
    """The CUDA kernel (canonical layout) and the CPU op (bit-plane layout) agree within the bound."""
    spec = QuantSpec(bits=3, group_size=64, axis="oc", symmetric=False, scale_dtype=torch.float16)
    n, k = shape_of(spec)
    codes, s, z, q, w64, mag = quantized(spec)
    x = activation((5, k), torch.float32, 3)
    y_cpu = ops.gemm(x, *ops.repack(q, s, z, spec), None, spec, n)
    y_gpu = ops.gemm(*_to_dev(x, q, s, z), None, spec, n, CANONICAL)
    y_ref = x.double() @ w64.t()
    tol = gemm_tolerance(x, mag, y_ref, torch.float32)
    assert_within(y_cpu, y_ref, tol, "cpu")
    assert_within(y_gpu, y_ref, tol, "cuda")


def test_gemm_strided_and_batched_activations():
    """3-D input, rows with a stride (a column slice), and a large M (several row tiles per block)."""
    spec = QuantSpec(bits=4, group_size=128, axis="ic", symmetric=True, scale_dtype=torch.bfloat16)
    n, k = shape_of(spec)
    _, s, z, q, w64, mag = quantized(spec)
    big = activation((3, 70, n + k + 8), torch.float16, 4)
    x = big[..., 8:8 + k]
    assert not x.is_contiguous() and x.stride(-1) == 1
    y = ops.gemm(*_to_dev(x, q, s, z), None, spec, n, CANONICAL)
    assert y.shape == (3, 70, n)
    x2 = x.reshape(-1, k)
    y_ref = x2.double() @ w64.t()
    assert_within(y.reshape(-1, n), y_ref, gemm_tolerance(x2, mag, y_ref, torch.float16), "strided gemm")
    g = big[..., 3:3 + n]
    yt = ops.gemm_t(*_to_dev(g, q, s, z), spec, n, CANONICAL)
    g2 = g.reshape(-1, n)
    yt_ref = g2.double() @ w64
    assert_within(yt.reshape(-1, k), yt_ref, gemm_tolerance(g2, mag.t(), yt_ref, torch.float16),
                  "strided gemm_t")


def test_gemm_large_m_and_k():
    """A realistic size: K = 4096 (128 steps of each lane's k loop), M = 300 (38 row tiles, the
    last partial), N = 301 (the last 4-row block of the forward grid is partial)."""
    spec = QuantSpec(bits=3, group_size=128, axis="oc", symmetric=False, scale_dtype=torch.float16)
    n, k, m = 301, 4096, 300
    w = sample_weight(n, k, seed=9)
    codes, s, z = ops.quantize(w, spec)
    q = ops.pack(codes, 3)
    w64 = R.dequantize(codes, s, z, spec).double()
    mag = folded_magnitude(codes, s, z, spec)
    x = activation((m, k), torch.bfloat16, 8)
    y = ops.gemm(*_to_dev(x, q, s, z), None, spec, n, CANONICAL)
    y_ref = x.double() @ w64.t()
    assert_within(y, y_ref, gemm_tolerance(x, mag, y_ref, torch.bfloat16), "large gemm")
    g = activation((m, n), torch.bfloat16, 9)
    yt = ops.gemm_t(*_to_dev(g, q, s, z), spec, n, CANONICAL)
    yt_ref = g.double() @ w64
    assert_within(yt, yt_ref, gemm_tolerance(g, mag.t(), yt_ref, torch.bfloat16), "large gemm_t")


def test_gemm_empty_m():
    spec = QuantSpec()
    n, k = shape_of(spec)
    _, s, z, q, _, _ = quantized(spec)
    x = torch.zeros(0, k, device=DEVICE)
    assert ops.gemm(x, *_to_dev(q, s, z), None, spec, n, CANONICAL).shape == (0, n)
    assert ops.gemm_t(torch.zeros(0, n, device=DEVICE), *_to_dev(q, s, z), spec, n, CANONICAL).shape == (0, k)


def test_gemm_respects_current_stream():
    spec = QuantSpec()
    n, k = shape_of(spec)
    _, s, z, q, w64, mag = quantized(spec)
    x = activation((7, k), torch.float32, 2)
    qd, sd, zd, xd = _to_dev(q, s, z, x)
    eager = ops.gemm(xd, qd, sd, zd, None, spec, n, CANONICAL)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        y = ops.gemm(xd, qd, sd, zd, None, spec, n, CANONICAL)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    assert_same_bits(y, eager, "gemm on a side stream")  # same kernel, same inputs: same bits


# ---- errors ----------------------------------------------------------------------------------------

def test_gemm_rejects_cpu_layout():
    spec = QuantSpec()
    n, k = shape_of(spec)
    _, s, z, q, _, _ = quantized(spec)
    x = torch.zeros(2, k, device=DEVICE)
    with pytest.raises(ValueError, match="not a CUDA kernel layout"):
        ops.gemm(x, *_to_dev(q, s, z), None, spec, n, Layout.CPU_BITPLANE16)
    with pytest.raises(ValueError, match="not a CUDA kernel layout"):
        ops.gemm_t(torch.zeros(2, n, device=DEVICE), *_to_dev(q, s, z), spec, n, Layout.CPU_BITPLANE16)
    with pytest.raises(ValueError, match="not a CUDA kernel layout"):
        ops.repack(*_to_dev(q, s, z), spec, Layout.CPU_BITPLANE16)


def test_gemm_rejects_mixed_devices_and_bad_shapes():
    spec = QuantSpec()
    n, k = shape_of(spec)
    _, s, z, q, _, _ = quantized(spec)
    qd, sd, zd = _to_dev(q, s, z)
    with pytest.raises(ValueError, match="is on"):
        ops.gemm(torch.zeros(2, k, device=DEVICE), qd, s, zd, None, spec, n, CANONICAL)
    with pytest.raises(ValueError, match="last dimension"):
        ops.gemm(torch.zeros(2, k + 32, device=DEVICE), qd, sd, zd, None, spec, n, CANONICAL)
    with pytest.raises(ValueError, match="out_features"):
        ops.gemm(torch.zeros(2, k, device=DEVICE), qd, sd, zd, None, spec, n + 1, CANONICAL)
    with pytest.raises(ValueError, match="bias must have shape"):
        ops.gemm(torch.zeros(2, k, device=DEVICE), qd, sd, zd, torch.zeros(n + 1, device=DEVICE), spec, n,
                 CANONICAL)


def test_repack_unrepack_canonical_are_copies():
    spec = QuantSpec(bits=3, symmetric=True)
    n, _ = shape_of(spec)
    _, s, z, q, _, _ = quantized(spec)
    qd, sd, zd = _to_dev(q, s, z)
    q2, s2, z2 = ops.repack(qd, sd, zd, spec, CANONICAL)
    assert z2 is None
    assert q2.data_ptr() != qd.data_ptr()
    assert_same_bits(q2, q, "repack qweight")
    assert_same_bits(s2, s, "repack scales")
    q3, s3, z3 = ops.unrepack(q2, s2, z2, spec, n, CANONICAL)
    assert_same_bits(q3, q, "unrepack qweight")
    assert_same_bits(s3, s, "unrepack scales")


# ---- QuantLinear on CUDA -------------------------------------------------------------------------

LINEAR_SPECS = [
    QuantSpec(bits=4, group_size=128, axis="oc", symmetric=False, scale_dtype=torch.float16),
    QuantSpec(bits=3, group_size=32, axis="ic", symmetric=True, scale_dtype=torch.bfloat16),
    QuantSpec(bits=2, group_size=-1, axis="oc", symmetric=True, scale_dtype=torch.float32),
    QuantSpec(bits=8, group_size=64, axis="ic", symmetric=False, scale_dtype=torch.float16),
]


@pytest.mark.parametrize("spec", LINEAR_SPECS, ids=spec_id)
def test_quant_linear_on_cuda_matches_cpu(spec):
    torch.manual_seed(0)
    lin = nn.Linear(256, 64)
    ql = QuantLinear.from_linear(lin, spec)
    ql_gpu = copy.deepcopy(ql).to(DEVICE)
    assert ql_gpu.layout == Layout.CUDA_MMA and ql_gpu.qweight.device.type == "cuda"
    sd_cpu, sd_gpu = ql.state_dict(), ql_gpu.state_dict()
    assert sd_cpu.keys() == sd_gpu.keys()
    for key in sd_cpu:
        assert_same_bits(sd_gpu[key], sd_cpu[key], f"state_dict[{key}]")
    # quantising on the GPU gives the same checkpoint
    sd_direct = QuantLinear.from_linear(copy.deepcopy(lin).to(DEVICE), spec).state_dict()
    for key in sd_cpu:
        assert_same_bits(sd_direct[key], sd_cpu[key], f"from_linear on CUDA: state_dict[{key}]")
    assert_same_bits(ql_gpu.dequantized_weight(), ql.dequantized_weight(), "dequantized_weight")

    w64, mag = _module_weight(ql, spec)
    x = activation((2, 5, 256), torch.float32, 1)
    x_gpu = x.to(DEVICE).requires_grad_(True)
    y_gpu = ql_gpu(x_gpu)
    y_cpu = ql(x)
    x2 = x.reshape(-1, 256)
    y_ref = x2.double() @ w64.t() + ql.bias.detach().double()
    tol = gemm_tolerance(x2, mag, y_ref, torch.float32, ql.bias.detach())
    assert_within(y_gpu.reshape(-1, 64), y_ref, tol, "QuantLinear CUDA forward")
    assert_within(y_cpu.reshape(-1, 64), y_ref, tol, "QuantLinear CPU forward")
    # backward: grad_x = G · W through gemm_t on the canonical layout, grad_bias = column sums
    grad = activation((2, 5, 64), torch.float32, 2)
    y_gpu.backward(grad.to(DEVICE))
    g2 = grad.reshape(-1, 64)
    gx_ref = g2.double() @ w64
    assert_within(x_gpu.grad.reshape(-1, 256), gx_ref, gemm_tolerance(g2, mag.t(), gx_ref, torch.float32),
                  "QuantLinear CUDA grad_x")
    torch.testing.assert_close(ql_gpu.bias.grad.cpu(), g2.sum(0), rtol=1e-5, atol=1e-5)
    # and back to the CPU: same checkpoint again
    back = ql_gpu.to("cpu")
    for key, t in back.state_dict().items():
        assert_same_bits(t, sd_cpu[key], f"back on CPU: state_dict[{key}]")


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=dtype_id)
def test_quant_linear_half_precision_on_cuda(dtype):
    spec = QuantSpec(bits=4, group_size=64, axis="oc", symmetric=False, scale_dtype=torch.float16)
    torch.manual_seed(1)
    ql = QuantLinear.from_linear(nn.Linear(128, 48), spec).to(DEVICE).to(dtype)
    assert ql.scales.dtype == torch.float16 and ql.bias.dtype == dtype
    x = activation((3, 128), dtype, 4)
    y = ql(x.to(DEVICE))
    assert y.dtype == dtype
    w64, mag = _module_weight(ql, spec)
    bias = ql.bias.detach().cpu()
    y_ref = x.double() @ w64.t() + bias.double()
    # on CUDA QuantLinear runs the tensor-core kernel, which rounds each weight to the activation type
    tol = gemm_tolerance(x, mag, y_ref, dtype, bias) + mma_rounding_tolerance(x, w64, spec, dtype)
    assert_within(y, y_ref, tol, "half QuantLinear")


# ---- CUDA graphs -----------------------------------------------------------------------------------

def test_gemm_cuda_graph_capture():
    spec = QuantSpec(bits=4, group_size=128, axis="oc", symmetric=False, scale_dtype=torch.float16)
    n, k = shape_of(spec)
    _, s, z, q, w64, mag = quantized(spec)
    qd, sd, zd = _to_dev(q, s, z)
    x = activation((16, k), torch.float16, 5).to(DEVICE)
    bias = activation((n,), torch.float16, 6).to(DEVICE)
    g = activation((16, n), torch.float16, 7).to(DEVICE)
    side = torch.cuda.Stream()  # warm-up on a side stream, as torch.cuda.graphs recommends
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            ops.gemm(x, qd, sd, zd, bias, spec, n, CANONICAL)
            ops.gemm_t(g, qd, sd, zd, spec, n, CANONICAL)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = ops.gemm(x, qd, sd, zd, bias, spec, n, CANONICAL)
        yt = ops.gemm_t(g, qd, sd, zd, spec, n, CANONICAL)
    for seed in (11, 12):
        x.copy_(activation((16, k), torch.float16, seed).to(DEVICE))
        g.copy_(activation((16, n), torch.float16, seed + 100).to(DEVICE))
        graph.replay()
        torch.cuda.synchronize()
        assert_same_bits(y, ops.gemm(x, qd, sd, zd, bias, spec, n, CANONICAL), "graph replay gemm")
        assert_same_bits(yt, ops.gemm_t(g, qd, sd, zd, spec, n, CANONICAL), "graph replay gemm_t")
        x_cpu = x.cpu()
        y_ref = x_cpu.double() @ w64.t() + bias.cpu().double()
        assert_within(y, y_ref, gemm_tolerance(x_cpu, mag, y_ref, torch.float16, bias), "graph gemm")


# ---- opcheck ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", [
    QuantSpec(bits=3, group_size=32, axis="oc", symmetric=False, scale_dtype=torch.float16),
    QuantSpec(bits=4, group_size=-1, axis="ic", symmetric=True, scale_dtype=torch.bfloat16),
], ids=spec_id)
def test_opcheck_cuda(spec):
    lp = torch.ops.layerpress
    n, k = shape_of(spec)
    codes, s, z, q, _, _ = quantized(spec)
    w = sample_weight(n, k, seed=2).to(DEVICE)
    codes_d, qd, sd = _to_dev(codes, q, s)
    zd = None if z is None else z.to(DEVICE)
    b, g, ax = spec.bits, spec.group_size, spec.axis_id
    torch.library.opcheck(lp.quantize.default, (w, b, g, ax, spec.symmetric, spec.scale_dtype))
    torch.library.opcheck(lp.quantize.default, (w, b, g, ax, spec.symmetric, spec.scale_dtype, sd, zd))
    torch.library.opcheck(lp.pack.default, (codes_d, b))
    torch.library.opcheck(lp.unpack.default, (qd, b))
    torch.library.opcheck(lp.dequantize.default, (qd, sd, zd, b, g, ax))
    torch.library.opcheck(lp.dequantize.default, (qd, sd, zd, b, g, ax, torch.float32))
    torch.library.opcheck(lp.repack.default, (qd, sd, zd, b, g, ax, int(CANONICAL)))
    torch.library.opcheck(lp.unrepack.default, (qd, sd, zd, b, g, ax, int(CANONICAL), n))
    x = activation((3, k), torch.bfloat16, 1).to(DEVICE).requires_grad_(True)
    bias = activation((n,), torch.bfloat16, 2).to(DEVICE).requires_grad_(True)
    torch.library.opcheck(lp.gemm.default, (x, qd, sd, zd, bias, b, g, ax, int(CANONICAL), n))
    torch.library.opcheck(lp.gemm.default, (x.detach(), qd, sd, zd, None, b, g, ax, int(CANONICAL), n))
    grad = activation((3, n), torch.bfloat16, 3).to(DEVICE)
    torch.library.opcheck(lp.gemm_t.default, (grad, qd, sd, zd, b, g, ax, int(CANONICAL), n))


def test_build_info_reports_cuda():
    info = layerpress.build_info()
    assert info["cuda"] is True
    assert info["cuda_archs"]
