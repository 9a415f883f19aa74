"""The tensor-core GEMM on a GPU (Layout.CUDA_MMA; cuda/kernels/gemm_cuda_mma.cu): the same
comparisons as tests/test_cuda_mma_emulated.py, through the CUDA ops. GPU only: every test is marked
``gpu`` (conftest skips them without CUDA). These are what turn "emulated" into "verified".
"""
from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from layerpress import Layout, QuantLinear, QuantSpec, ops
from layerpress import reference as R

from cuda_testutils import (BITS, AXES, GROUPS, MMA_UNIT, activation, assert_same_bits, assert_within,
                            folded_magnitude, gemm_tolerance, mma_rounded_reference, mma_rounding_tolerance,
                            sample_weight, spec_id)

pytestmark = pytest.mark.gpu

DEVICE = torch.device("cuda")
MMA = Layout.CUDA_MMA
SPECS = [QuantSpec(bits=b, group_size=g, axis=a, symmetric=sym, scale_dtype=sd)
         for (b, a, g, sym), sd in zip(itertools.product(BITS, AXES, GROUPS, (False, True)),
                                       itertools.cycle((torch.float16, torch.bfloat16, torch.float32)))]
IDS = [spec_id(s) for s in SPECS]


def _shape(spec):
    return (100, 512) if spec.axis == "oc" or spec.group_size == -1 else (512, 384)


def _weight(spec, n, k, seed=0):
    w = sample_weight(n, k, seed=seed + n + spec.bits)
    codes, s, z = ops.quantize(w, spec)
    return codes, s, z, ops.pack(codes, spec.bits)


def _check(spec, n, k, m, dtype, seed, bias=False):
    codes, s, z, q = _weight(spec, n, k)
    qm, sm, zm = ops.repack(*(t if t is None else t.to(DEVICE) for t in (q, s, z)), spec, MMA)
    x = activation((m, k), dtype, seed)
    b = activation((n,), dtype, seed + 1) if bias else None
    y = ops.gemm(x.to(DEVICE), qm, sm, None if spec.symmetric else zm, None if b is None else b.to(DEVICE),
                 spec, n, MMA).cpu()
    w64 = R.dequantize(codes, s, z, spec).double()
    mag = folded_magnitude(codes, s, z, spec)
    y_ref = x.double() @ w64.t() + (0 if b is None else b.double())
    tol = gemm_tolerance(x, mag, y_ref, dtype, b) + mma_rounding_tolerance(x, w64, spec, dtype)
    what = f"{spec_id(spec)} {dtype} M={m}"
    assert_within(y, y_ref, tol, what)
    if spec.scale_dtype == dtype:
        y_exact = mma_rounded_reference(x, codes, s, None if spec.symmetric else z, spec, dtype)
        y_exact = y_exact + (0 if b is None else b.double())
        assert_within(y, y_exact, gemm_tolerance(x, mag, y_exact, dtype, b), what + " (rounded reference)")


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_repack_on_cuda_matches_cpu(spec):
    codes, s, z, q = _weight(spec, *_shape(spec))
    want = ops.repack(q, s, z, spec, MMA)
    got = ops.repack(*(t if t is None else t.to(DEVICE) for t in (q, s, z)), spec, MMA)
    for name, g, w in zip(("qweight", "scales", "zeros"), got, want):
        if w is not None:
            assert_same_bits(g, w, f"{spec_id(spec)} {name}")
    back = ops.unrepack(*got, spec, codes.shape[0], MMA)
    for name, g, w in zip(("qweight", "scales", "zeros"), back, (q, s, z)):
        if w is not None:
            assert_same_bits(g, w, f"{spec_id(spec)} unrepack {name}")


@pytest.mark.parametrize("dtype", tuple(MMA_UNIT), ids=str)
@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_mma_gemm_every_format(spec, dtype):
    n, k = _shape(spec)
    for m in (1, 7, 16, 33, 128):
        _check(spec, n, k, m, dtype, seed=m, bias=m == 7)


@pytest.mark.parametrize("shape", [(4096, 4096), (11008, 4096), (4096, 11008)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("m", (1, 16, 128, 600))
def test_mma_gemm_large_shapes_split_k(shape, m):
    n, k = shape
    spec = QuantSpec(bits=4, group_size=128, axis="oc", scale_dtype=torch.float16)
    _check(spec, n, k, m, torch.float16, seed=3)


def test_gemm_t_and_quant_linear_on_the_layout():
    spec = QuantSpec(bits=4, group_size=64, axis="ic", scale_dtype=torch.bfloat16)
    torch.manual_seed(0)
    ql = QuantLinear.from_linear(nn.Linear(256, 192), spec).to(DEVICE).to(torch.bfloat16)
    assert ql.layout == MMA
    x = activation((4, 256), torch.bfloat16, 1).to(DEVICE).requires_grad_(True)
    y = ql(x)
    y.float().sum().backward()
    q, s, z = (None if t is None else t.cpu() for t in ql.canonical())
    codes = R.unpack(q, spec.bits)
    w64 = R.dequantize(codes, s, z, spec).double()
    g = torch.ones(4, 192, dtype=torch.bfloat16)
    gx_ref = g.double() @ w64
    assert_within(x.grad.cpu(), gx_ref, gemm_tolerance(g, folded_magnitude(codes, s, z, spec).t(), gx_ref,
                                                     torch.bfloat16), "grad_x through gemm_t on layout 2")
    compiled = torch.compile(ql, fullgraph=True)
    with torch.no_grad():
        assert_same_bits(compiled(x.detach()), ql(x.detach()), "torch.compile fullgraph")


def test_opcheck_gemm_on_the_layout():
    spec = QuantSpec(bits=4, group_size=128, axis="oc", scale_dtype=torch.float16)
    codes, s, z, q = _weight(spec, 128, 256)
    qm, sm, zm = ops.repack(q.to(DEVICE), s.to(DEVICE), z.to(DEVICE), spec, MMA)
    x = activation((5, 256), torch.float16, 2).to(DEVICE)
    torch.library.opcheck(torch.ops.layerpress.gemm.default,
                          (x, qm, sm, zm, None, spec.bits, spec.group_size, spec.axis_id, int(MMA), 128))
    torch.library.opcheck(torch.ops.layerpress.repack.default,
                          (q.to(DEVICE), s.to(DEVICE), z.to(DEVICE), spec.bits, spec.group_size, spec.axis_id,
                           int(MMA)))
