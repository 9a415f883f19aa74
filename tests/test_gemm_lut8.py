"""The opt-in avx2_lut8 CPU GEMM variant (int8 activation tables, cpp/kernels/gemm_cpu_avx2_lut8.cpp).

Two independent checks per case:
* against a plain-PyTorch model of what the kernel computes: the int8 tables rebuilt in fp32
  exactly as the kernel builds them (x·(bit − ½) sums in column order, block maximum, 127/max,
  round to nearest even), the looked-up integer sums exact in int64, combined with the block and
  group scales in float64; the only difference left is the kernel's fp32 accumulation;
* against the exact float64 product with a rigorous bound on the table rounding: each looked-up
  entry is off by at most s_kb/2, a row of a block looks up 8 entries per bit plane weighted 2^b,
  so |y − x·Wᵀ| ≤ Σ_g |s_gn| Σ_{kb∈g} 4·qmax·s_kb (plus fp32 slack), and the relative error on
  random data stays near llama.cpp's int8 activations (well under 1.5 %).
Everything the path does not take (per-IC groups, 8 bits, M above its limit, the transposed
product) must be the exact avx2 variant bit for bit.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings, strategies as st

import layerpress
from layerpress import QuantSpec, ops
from layerpress import reference as R

from lp_testutils import FLOAT_DTYPES, U32, assert_within, dtype_id, make_weight, spec_id

VARIANT = "avx2_lut8"
pytestmark = [
    pytest.mark.skipif(VARIANT not in layerpress.build_info()["cpu_gemm_opt_in_variants"],
                       reason="the CPU has no AVX2+FMA"),
    pytest.mark.usefixtures("torch_single_thread"),
]


def _max_m(bits: int) -> int:
    layerpress.set_cpu_gemm_variant(VARIANT)
    try:
        return layerpress.build_info()["cpu_gemm_int8_table_max_m"][str(bits)]
    finally:
        layerpress.set_cpu_gemm_variant("")


def int8_tables(x32: torch.Tensor):
    """(q [M, K/32, 8, 16] int64, s [M, K/32] float64) as the kernel builds them from fp32 x."""
    m, k = x32.shape
    xg = x32.reshape(m, k // 32, 8, 4)
    i = torch.arange(16)
    e = torch.zeros(m, k // 32, 8, 16, dtype=torch.float32)
    for j in range(4):  # fp32 sums in column order; x·±½ is exact, so FMA and mul+add agree
        h = torch.where((i >> j) & 1 == 1, 0.5, -0.5).to(torch.float32)
        e = e + xg[..., j:j + 1] * h
    amax = e.abs().amax(dim=(2, 3))
    # true fp32 divisions (a Python scalar divided by a tensor is reciprocal-then-multiply in torch)
    scale = amax / torch.full_like(amax, 127.0)
    safe = torch.where(amax > 0, amax, torch.ones_like(amax))
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / safe, torch.zeros_like(amax))
    q = torch.round(e * inv[..., None, None]).to(torch.int64)
    return q, scale.to(torch.float64)


def lut8_model(x: torch.Tensor, codes: torch.Tensor, s, z, spec: QuantSpec):
    """float64 [M, N]: the kernel's arithmetic with exact accumulation."""
    x32 = x.to(torch.float32)
    m, k = x32.shape
    n = codes.shape[0]
    q, ts = int8_tables(x32)
    g = spec.group_for(n, k)
    cg = codes.to(torch.int64).reshape(n, k // 32, 8, 4)
    d = torch.zeros(m, n, k // 32, dtype=torch.int64)
    for b in range(spec.bits):
        nib = sum((((cg[..., j] >> b) & 1) << j) for j in range(4))  # [N, KB, 8] table index
        looked = torch.gather(q[:, None].expand(m, n, k // 32, 8, 16), 4,
                              nib[None, ..., None].expand(m, n, k // 32, 8, 1))[..., 0]
        d += looked.sum(dim=3) << b
    per_block = ts[:, None, :] * d.to(torch.float64)                       # [M, N, KB]
    per_group = per_block.reshape(m, n, k // g, g // 32).sum(dim=3)        # [M, N, G]
    xsum = x32.to(torch.float64).reshape(m, k // g, g).sum(dim=2)          # [M, G]
    zf = (torch.full((n, k // g), float(2 ** (spec.bits - 1)), dtype=torch.float64) if z is None
          else z.to(torch.float64))
    c = (0.5 * (2 ** spec.bits - 1) - zf)[None] * xsum[:, None, :]
    y = (s.to(torch.float64)[None] * (per_group + c)).sum(dim=2)
    # fp32 accumulation: each block term, each group term
    # magnitude of the terms the kernel rounds in fp32 (block terms, the fp32 group sums of x)
    xabs = x32.to(torch.float64).abs().reshape(m, k // g, g).sum(dim=2)
    cabs = (0.5 * (2 ** spec.bits - 1) - zf).abs()[None] * xabs[:, None, :]
    mag = (s.to(torch.float64).abs()[None] * (per_block.abs().reshape(m, n, k // g, g // 32).sum(3) + cabs)).sum(2)
    return y, mag, ts


def rounding_bound(ts: torch.Tensor, s, spec: QuantSpec, n: int, k: int):
    """[M, N]: Σ_g |s_gn| Σ_{kb∈g} 4·qmax·s_kb (each of the 8·bits looked-up entries of a row and
    block is off by at most s_kb/2, weighted by 2^b)."""
    g = spec.group_for(n, k)
    per_group = ts.reshape(ts.shape[0], k // g, g // 32).sum(dim=2) * 4 * (2 ** spec.bits - 1)  # [M, G]
    return per_group @ s.to(torch.float64).abs().t()


def _case(bits, group, sym, sd, n, k, seed):
    spec = QuantSpec(bits=bits, group_size=group, axis="oc", symmetric=sym, scale_dtype=sd)
    w = make_weight(n, k, torch.float32, seed=seed)
    codes, s, z = ops.quantize(w, spec)
    native = ops.repack(ops.pack(codes, bits), s, z, spec)
    return spec, codes, s, z, native


def _run(variant, x, native, bias, spec, n):
    layerpress.set_cpu_gemm_variant(variant)
    try:
        return ops.gemm(x, *native, bias, spec, n)
    finally:
        layerpress.set_cpu_gemm_variant("")


def check_lut8(spec, codes, s, z, native, x, bias, what):
    n, k = codes.shape
    y = _run(VARIANT, x, native, bias, spec, n)
    assert y.dtype == x.dtype and y.shape == (x.shape[0], n), what
    y_model, mag, ts = lut8_model(x, codes, s, z, spec)
    b64 = 0.0 if bias is None else bias.to(torch.float64)
    tol = 8 * U32 * math.sqrt(k) * (mag + (0.0 if bias is None else bias.abs().double())) \
        + torch.finfo(x.dtype).eps * (y_model + b64).abs()
    assert_within(y, y_model + b64, tol, what + " vs the int8-table model")
    y_exact = x.to(torch.float32).double() @ R.dequantize(codes, s, z, spec).double().t() + b64
    bound = rounding_bound(ts, s, spec, n, k) + tol
    assert_within(y, y_exact, bound, what + " vs the exact product (table-rounding bound)")
    return y, y_exact


@pytest.mark.parametrize("adtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("group", [32, 64, 128, 256, -1], ids=lambda g: f"g{'whole' if g == -1 else g}")
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_lut8_grid(bits, group, sym, adtype):
    """Every group size, both zero-point kinds, each activation dtype, N not a multiple of the
    16-row tile, M = 1, 2 and the path's largest M, with and without bias."""
    n, k = 37, 512
    sd = FLOAT_DTYPES[(bits + (group % 7)) % len(FLOAT_DTYPES)]  # rotate the scale dtype
    spec, codes, s, z, native = _case(bits, group, sym, sd, n, k, seed=bits * 7 + group)
    g = torch.Generator().manual_seed(bits + group)
    x_all = (torch.randn(_max_m(bits), k, generator=g) + 0.25).to(adtype)
    bias = torch.randn(n, generator=g).to(adtype)
    for m in sorted({1, 2, _max_m(bits)}):
        for b in (None, bias):
            check_lut8(spec, codes, s, z, native, x_all[:m], b,
                       f"{spec_id(spec)} M={m} x={dtype_id(adtype)} bias={b is not None}")


@settings(max_examples=25, deadline=None)
@given(bits=st.sampled_from([2, 3, 4]), kb=st.integers(1, 12), n=st.integers(1, 70),
       group=st.sampled_from([32, 64, 128, -1]), sym=st.booleans(), m=st.integers(1, 16),
       seed=st.integers(0, 999), spread=st.sampled_from([0.0, 1.0, 100.0]))
def test_lut8_random(bits, kb, n, group, sym, m, seed, spread):
    """Random shapes, including activations whose blocks differ in scale by orders of magnitude
    (each block has its own table scale) and all-zero blocks."""
    k = 32 * kb
    if group != -1 and k % group:
        group = 32
    m = min(m, _max_m(bits))
    spec, codes, s, z, native = _case(bits, group, sym, torch.float32, n, k, seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.exp(spread * torch.rand(1, kb, generator=g) / 20).repeat_interleave(32, 1)
    if kb > 1:
        x[:, :32] = 0.0  # a block with no signal: scale 0, tables 0
    check_lut8(spec, codes, s, z, native, x, None, f"{spec_id(spec)} N={n} K={k} M={m}")


def test_lut8_precision_on_random_data():
    """What a user gets: relative error of the product like int8 activations (llama.cpp's Q8_0
    activations give ≈ 0.5-0.7 % on Gaussian data), far above fp32 rounding, far below a wrong code."""
    n, k = 256, 1024
    for bits in (2, 3, 4):
        spec, codes, s, z, native = _case(bits, 128, False, torch.float16, n, k, seed=bits)
        x = torch.randn(1, k, generator=torch.Generator().manual_seed(bits)) + 0.25
        y, y_exact = check_lut8(spec, codes, s, z, native, x, None, f"W{bits}")
        rel = ((y.double() - y_exact).norm() / y_exact.norm()).item()
        assert 1e-4 < rel < 1.5e-2, (bits, rel)


@pytest.mark.parametrize("what", ["per-IC groups", "8 bits", "M above the limit", "transposed"])
def test_lut8_falls_back_to_exact_avx2(what):
    n, k = 64, 256
    bits, axis, m = 4, "oc", 1
    if what == "per-IC groups":
        axis = "ic"
    elif what == "8 bits":
        bits = 8
    elif what == "M above the limit":
        m = _max_m(4) + 1
    spec = QuantSpec(bits=bits, group_size=32, axis=axis, symmetric=False)
    w = make_weight(n, k, torch.float32, seed=3)
    codes, s, z = ops.quantize(w, spec)
    native = ops.repack(ops.pack(codes, bits), s, z, spec)
    g = torch.Generator().manual_seed(5)
    if what == "transposed":
        gy = torch.randn(3, n, generator=g)
        outs = []
        for v in ("avx2", VARIANT):
            layerpress.set_cpu_gemm_variant(v)
            try:
                outs.append(ops.gemm_t(gy, *native, spec, n))
            finally:
                layerpress.set_cpu_gemm_variant("")
    else:
        x = torch.randn(m, k, generator=g)
        outs = [_run(v, x, native, None, spec, n) for v in ("avx2", VARIANT)]
    assert torch.equal(outs[0], outs[1]), what


def test_lut8_thread_count_independent():
    spec, codes, s, z, native = _case(4, 64, False, torch.bfloat16, 200, 1024, seed=9)
    x = torch.randn(1, 1024, generator=torch.Generator().manual_seed(1))
    old = torch.get_num_threads()
    try:
        ys = []
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            ys.append(_run(VARIANT, x, native, None, spec, 200))
    finally:
        torch.set_num_threads(old)
    assert torch.equal(ys[0], ys[1]) and torch.equal(ys[0], ys[2])


def test_lut8_is_opt_in():
    """Never the automatic choice; named by set_cpu_gemm_variant or LAYERPRESS_CPU_KERNEL; build_info
    says which M it rounds (only while it is active)."""
    info = layerpress.build_info()
    assert VARIANT not in info["cpu_gemm_variants"] and info["cpu_kernels"]["gemm"] != VARIANT
    assert info["cpu_gemm_int8_table_max_m"] == {}
    layerpress.set_cpu_gemm_variant(VARIANT)
    try:
        on = layerpress.build_info()
    finally:
        layerpress.set_cpu_gemm_variant("")
    assert on["cpu_kernels"]["gemm"] == VARIANT
    assert set(on["cpu_gemm_int8_table_max_m"]) == {"2", "3", "4"}
    env = {**os.environ, "LAYERPRESS_CPU_KERNEL": VARIANT}
    out = subprocess.run([sys.executable, "-c", "import layerpress; i = layerpress.build_info(); "
                          "print(i['cpu_kernels']['gemm'], i['cpu_gemm_int8_table_max_m']['4'])"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [VARIANT, "16"]
