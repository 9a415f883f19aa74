"""Format ops (quantize, pack, unpack, dequantize, repack, unrepack) against the plain-PyTorch
reference ``layerpress.reference`` -- exact equality everywhere -- plus independent tiny
re-derivations that check the reference itself."""
from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, strategies as st

from layerpress import Layout, QuantSpec, ops
from layerpress import reference as R

from lp_testutils import (AXES, BITS, FLOAT_DTYPES, GROUPS, SCALE_DTYPES, dequant64, dtype_id,
                          expand_params, grid_cases, make_weight, spec_id)

pytestmark = pytest.mark.usefixtures("torch_single_thread")

GRID = grid_cases()
GRID_IDS = [f"{a}-g{'whole' if g == -1 else g}-{n}x{k}" for a, g, n, k in GRID]


def assert_same_triple(got, want, what=""):
    c, s, z = got
    rc, rs, rz = want
    assert c.dtype == torch.uint8 and rc.dtype == torch.uint8
    assert torch.equal(c, rc), f"{what}: codes differ at {(c != rc).nonzero()[:5].tolist()}"
    assert s.dtype == rs.dtype, f"{what}: scales dtype {s.dtype} != {rs.dtype}"
    assert torch.equal(s, rs), f"{what}: scales differ"
    if rz is None:
        assert z is None, f"{what}: symmetric quantisation returned zeros"
    else:
        assert z is not None and z.dtype == torch.uint8 and torch.equal(z, rz), f"{what}: zeros differ"


# ---- independent re-derivations (check the reference itself) ------------------------------------

def pack_python(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """LSB-first bit stream per row with Python integers: word j holds bits [32j, 32j+32)."""
    rows = []
    for row in codes.tolist():
        stream = 0
        for i, c in enumerate(row):
            stream |= int(c) << (bits * i)
        words = [(stream >> (32 * j)) & 0xFFFFFFFF for j in range(len(row) * bits // 32)]
        rows.append([w - (1 << 32) if w >= (1 << 31) else w for w in words])
    return torch.tensor(rows, dtype=torch.int32).reshape(codes.shape[0], codes.shape[1] * bits // 32)


def bitplane_python(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[T, K/32, bits, 16]: word [t][kb][p][l] bit i = bit p of code (16t + l, 32kb + i)."""
    n, k = codes.shape
    t_count = (n + 15) // 16
    c = torch.zeros(t_count * 16, k, dtype=torch.int64)
    c[:n] = codes.to(torch.int64)
    c = c.reshape(t_count, 16, k // 32, 32)                      # [t, lane, kb, i]
    weights = torch.ones(32, dtype=torch.int64) << torch.arange(32)
    planes = [(((c >> p) & 1) * weights).sum(-1) for p in range(bits)]  # [t, lane, kb] each
    out = torch.stack(planes, dim=-1).permute(0, 2, 3, 1)        # [t, kb, p, lane]
    return torch.where(out >= 2 ** 31, out - 2 ** 32, out).to(torch.int32).contiguous()


def bitplane_scales_python(t: torch.Tensor, spec: QuantSpec, n: int, k: int) -> torch.Tensor:
    """Per-OC [T, K/g, 16] (rows past N zero); per-IC the transpose [N/g, K]."""
    if spec.axis == "ic":
        return t.t().contiguous()
    tiles = (n + 15) // 16
    padded = torch.zeros(tiles * 16, t.shape[1], dtype=t.dtype)
    padded[:n] = t
    return padded.reshape(tiles, 16, t.shape[1]).permute(0, 2, 1).contiguous()


def test_hand_computed_asymmetric_2bit_row():
    # lo = -1, hi = 2 -> s = 3/3 = 1, z = round(1/1) = 1; codes = clamp(round_half_even(v) + 1)
    vals = [-1.0, 2.0, 0.5, 0.0, 1.5, -0.5, 1.0] + [0.25] * 25
    want = [0, 3, 1, 1, 3, 1, 2] + [1] * 25
    w = torch.tensor([vals])
    spec = QuantSpec(bits=2, group_size=32, axis="oc", symmetric=False, scale_dtype=torch.float32)
    for impl in (ops.quantize, R.quantize):
        codes, s, z = impl(w, spec)
        assert codes.tolist() == [want]
        assert s.tolist() == [[1.0]] and z.tolist() == [[1]]
    q = ops.pack(torch.tensor([want], dtype=torch.uint8), 2)
    assert q.shape == (1, 2)
    assert torch.equal(q, pack_python(torch.tensor([want]), 2))
    deq = ops.dequantize(q, torch.tensor([[1.0]]), torch.tensor([[1]], dtype=torch.uint8), spec)
    assert deq.tolist() == [[c - 1.0 for c in want]]


def test_hand_computed_symmetric_4bit_row():
    # amax = 7 -> s = 7 / (2^3 - 1) = 1, implicit zero 8
    vals = [-7.0, 7.0, 3.5, -3.5, 2.5, 0.0, -0.4, 6.6] + [1.0] * 24
    want = [1, 15, 12, 4, 10, 8, 8, 15] + [9] * 24
    w = torch.tensor([vals])
    spec = QuantSpec(bits=4, group_size=-1, axis="oc", symmetric=True, scale_dtype=torch.float16)
    for impl in (ops.quantize, R.quantize):
        codes, s, z = impl(w, spec)
        assert codes.tolist() == [want] and s.tolist() == [[1.0]] and z is None
        assert s.dtype == torch.float16


def test_hand_computed_codes_use_the_rounded_scale():
    # lo = 0, hi = 1 -> s = 1/255 = 2^-8 * (1 + 1/255); bf16 keeps 7 fraction bits and 1/255 is
    # above half an ulp (2^-8), so s_bf16 = 2^-8 * (1 + 2^-7) = 129/32768 and 1/s_bf16 = 254.0155.
    # Codes must use that stored scale: 1.0 -> 254, 0.6 -> round(152.41) = 152, 0.5 -> 127,
    # whereas the fp32 scale fl(1/255) gives 1.0 -> 255, 0.6 -> round(152.99999) = 153,
    # 0.5 -> round(127.49999) = 127.
    w = torch.zeros(1, 32)
    w[0, 0], w[0, 1], w[0, 2] = 1.0, 0.6, 0.5
    spec = QuantSpec(bits=8, group_size=32, axis="oc", symmetric=False, scale_dtype=torch.bfloat16)
    for impl in (ops.quantize, R.quantize):
        codes, s, z = impl(w, spec)
        assert s.item() == 129 / 32768 and z.item() == 0
        assert codes[0, :4].tolist() == [254, 152, 127, 0]
    spec32 = QuantSpec(bits=8, group_size=32, axis="oc", symmetric=False, scale_dtype=torch.float32)
    for impl in (ops.quantize, R.quantize):
        codes, s, z = impl(w, spec32)
        assert s.item() == torch.tensor(1 / 255, dtype=torch.float32).item()
        assert codes[0, :4].tolist() == [255, 153, 127, 0]


def test_hand_computed_pack_words():
    # 2-bit: code 3 at k=0 and 2 at k=15 fill word 0's lowest and highest bits; k=16 starts word 1.
    codes = torch.zeros(1, 32, dtype=torch.uint8)
    codes[0, 0], codes[0, 15], codes[0, 16] = 3, 2, 1
    assert ops.pack(codes, 2).tolist() == [[3 | (2 << 30) - (1 << 32), 1]]
    # 3-bit: k=10 occupies bits 30..32, straddling words 0 and 1.
    codes = torch.zeros(1, 32, dtype=torch.uint8)
    codes[0, 10] = 7
    assert ops.pack(codes, 3).tolist() == [[(3 << 30) - (1 << 32), 1, 0]]
    # 8-bit: byte i of word j is code 4j + i.
    codes = torch.arange(32, dtype=torch.uint8).reshape(1, 32) * 7
    q = ops.pack(codes, 8)
    for j in range(8):
        b = [int(c) for c in codes[0, 4 * j:4 * j + 4]]
        want = b[0] | b[1] << 8 | b[2] << 16 | b[3] << 24
        assert q[0, j].item() & 0xFFFFFFFF == want


def test_hand_computed_bitplane_position():
    # Code 5 (0b101) at row 16 (tile 1, lane 0), column 33 (block 1, bit 1): planes 0 and 2 of
    # word [1][1][p][0] have bit 1 set, everything else (incl. padded rows 17..31) is zero.
    spec = QuantSpec(bits=3, group_size=32, axis="oc", symmetric=False, scale_dtype=torch.float32)
    codes = torch.zeros(17, 64, dtype=torch.uint8)
    codes[16, 33] = 5
    scales = torch.arange(1, 17 * 2 + 1, dtype=torch.float32).reshape(17, 2)
    zeros = torch.full((17, 2), 3, dtype=torch.uint8)
    q, s, z = ops.repack(ops.pack(codes, 3), scales, zeros, spec)
    assert q.shape == (2, 2, 3, 16) and q.dtype == torch.int32
    want = torch.zeros_like(q)
    want[1, 1, 0, 0] = 2
    want[1, 1, 2, 0] = 2
    assert torch.equal(q, want)
    assert s.shape == (2, 2, 16)
    assert s[1, 0, 0].item() == scales[16, 0].item() and s[1, 1, 0].item() == scales[16, 1].item()
    assert s[0, 1, 5].item() == scales[5, 1].item()
    assert (s[1, :, 1:] == 0).all() and (z[1, :, 1:] == 0).all()


@pytest.mark.parametrize("spec", [
    QuantSpec(bits=4, group_size=32, axis="oc", symmetric=False, scale_dtype=torch.float32),
    QuantSpec(bits=3, group_size=-1, axis="ic", symmetric=True, scale_dtype=torch.bfloat16),
    QuantSpec(bits=8, group_size=32, axis="ic", symmetric=False, scale_dtype=torch.float16),
], ids=spec_id)
def test_reference_quantize_matches_definition(spec):
    """Re-derives RTN quantisation group by group with explicit loops over the groups
    (independent of reference._groups_view) and checks reference.quantize against it."""
    n, k = (33, 64) if spec.group_size == -1 or spec.axis == "oc" else (64, 64)
    w = make_weight(n, k, torch.float32, seed=3)
    codes, s, z = R.quantize(w, spec)
    g = spec.group_for(n, k)
    qmax = 2 ** spec.bits - 1
    want = torch.empty(n, k, dtype=torch.uint8)
    lines = range(n) if spec.axis == "oc" else range(k)
    for line in lines:
        for gi in range((k if spec.axis == "oc" else n) // g):
            sl = slice(gi * g, (gi + 1) * g)
            v = w[line, sl] if spec.axis == "oc" else w[sl, line]
            if spec.symmetric:
                sc = (v.abs().max() / (2 ** (spec.bits - 1) - 1)).to(spec.scale_dtype)
            else:
                lo, hi = min(v.min(), torch.tensor(0.0)), max(v.max(), torch.tensor(0.0))
                sc = ((hi - lo) / qmax).to(spec.scale_dtype)
            if sc == 0:
                sc = torch.ones((), dtype=spec.scale_dtype)
            assert s[line, gi] == sc
            scf = sc.float()
            zp = 2 ** (spec.bits - 1) if spec.symmetric else int(torch.round(-lo / scf).clamp(0, qmax))
            if not spec.symmetric:
                assert z[line, gi] == zp
            q = (torch.round(v / scf) + zp).clamp(0, qmax).to(torch.uint8)
            if spec.axis == "oc":
                want[line, sl] = q
            else:
                want[sl, line] = q
    assert torch.equal(codes, want)


@pytest.mark.parametrize("bits", BITS)
def test_reference_pack_unpack_match_python_bitstream(bits):
    codes = torch.randint(0, 2 ** bits, (5, 96), generator=torch.Generator().manual_seed(bits),
                          dtype=torch.uint8)
    want = pack_python(codes, bits)
    assert torch.equal(R.pack(codes, bits), want)
    assert torch.equal(R.unpack(want, bits), codes)


def test_reference_dequantize_matches_definition():
    for spec in (QuantSpec(4, 32, "oc", False, torch.float32), QuantSpec(3, 32, "ic", True, torch.float16)):
        codes, s, z = R.quantize(make_weight(64, 96, seed=5), spec)
        want = dequant64(codes, s, z, spec).to(torch.float32)
        assert torch.equal(R.dequantize(codes, s, z, spec), want)


# ---- full combination grid ----------------------------------------------------------------------

@pytest.mark.parametrize("wdtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("axis,group,n,k", GRID, ids=GRID_IDS)
@pytest.mark.parametrize("bits", BITS)
def test_quantize_grid(bits, axis, group, n, k, symmetric, scale_dtype, wdtype):
    spec = QuantSpec(bits=bits, group_size=group, axis=axis, symmetric=symmetric, scale_dtype=scale_dtype)
    w = make_weight(n, k, wdtype, seed=bits * 7 + n)
    got = ops.quantize(w, spec)
    assert_same_triple(got, R.quantize(w, spec), spec_id(spec))
    codes, s, z = got
    assert codes.shape == (n, k) and s.shape == spec.scale_shape(n, k)
    assert int(codes.max()) <= 2 ** bits - 1
    if not symmetric:
        assert z.shape == s.shape


@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("axis,group,n,k", GRID, ids=GRID_IDS)
@pytest.mark.parametrize("bits", BITS)
def test_pack_dequantize_repack_grid(bits, axis, group, n, k, symmetric, scale_dtype):
    spec = QuantSpec(bits=bits, group_size=group, axis=axis, symmetric=symmetric, scale_dtype=scale_dtype)
    codes, s, z = ops.quantize(make_weight(n, k, seed=n + k + bits), spec)
    q = ops.pack(codes, bits)
    assert q.dtype == torch.int32 and q.shape == (n, k * bits // 32)
    assert torch.equal(q, R.pack(codes, bits))
    assert torch.equal(ops.unpack(q, bits), codes)
    assert torch.equal(R.unpack(q, bits), codes)
    # default out dtype is the scale dtype; every out dtype is the fp32 value rounded once
    d = ops.dequantize(q, s, z, spec)
    assert d.dtype == scale_dtype
    for out in FLOAT_DTYPES:
        d = ops.dequantize(q, s, z, spec, out)
        assert d.dtype == out and d.shape == (n, k)
        assert torch.equal(d, R.dequantize(codes, s, z, spec, out))
    assert torch.equal(ops.dequantize(q, s, z, spec, torch.float32),
                       dequant64(codes, s, z, spec).to(torch.float32))
    # float64 out: the fp32 value widened (the kernels compute in fp32)
    d64 = ops.dequantize(q, s, z, spec, torch.float64)
    assert d64.dtype == torch.float64 and torch.equal(d64, dequant64(codes, s, z, spec).to(torch.float32).double())
    # repack to the CPU kernel layout: independent layout derivation, then exact round trip
    nq, ns, nz = ops.repack(q, s, z, spec)
    assert torch.equal(nq, bitplane_python(codes, bits))
    assert ns.dtype == scale_dtype and torch.equal(ns, bitplane_scales_python(s, spec, n, k))
    if symmetric:
        assert nz is None
    else:
        assert torch.equal(nz, bitplane_scales_python(z, spec, n, k))
    bq, bs, bz = ops.unrepack(nq, ns, nz, spec, n)
    assert torch.equal(bq, q) and torch.equal(bs, s)
    assert (bz is None) if symmetric else torch.equal(bz, z)


@pytest.mark.parametrize("spec", [
    QuantSpec(4, 32, "oc", False, torch.float32), QuantSpec(2, -1, "oc", True, torch.bfloat16),
    QuantSpec(8, 64, "ic", False, torch.float16), QuantSpec(3, -1, "ic", True, torch.float32),
], ids=spec_id)
def test_quantize_with_given_scales_and_zeros(spec):
    n, k = (64, 128)
    w = make_weight(n, k, seed=11)
    # 1. the scales/zeros it computed itself reproduce the same codes
    codes, s, z = ops.quantize(w, spec)
    c2, s2, z2 = ops.quantize(w, spec, s, z)
    assert torch.equal(c2, codes) and torch.equal(s2, s)
    assert (z2 is None) if spec.symmetric else torch.equal(z2, z)
    # 2. arbitrary (smaller -> clamping, negative, varied) scales and zeros
    gen = torch.Generator().manual_seed(12)
    shape = spec.scale_shape(n, k)
    sc = ((torch.rand(shape, generator=gen) * 0.02 + 0.001)
          * torch.where(torch.rand(shape, generator=gen) < 0.2, -1.0, 1.0)).to(spec.scale_dtype)
    zc = None if spec.symmetric else torch.randint(0, 2 ** spec.bits, shape, generator=gen, dtype=torch.uint8)
    got = ops.quantize(w, spec, sc, zc)
    assert_same_triple(got, R.quantize(w, spec, sc, zc), spec_id(spec))
    # the given scales/zeros are returned unchanged, as copies
    assert torch.equal(got[1], sc) and got[1].data_ptr() != sc.data_ptr()
    if zc is not None:
        assert torch.equal(got[2], zc) and got[2].data_ptr() != zc.data_ptr()


# ---- random shapes ------------------------------------------------------------------------------

@st.composite
def spec_and_shape(draw, max_k=512, max_n=80):
    bits = draw(st.sampled_from(BITS))
    axis = draw(st.sampled_from(AXES))
    sym = draw(st.booleans())
    sd = draw(st.sampled_from(SCALE_DTYPES))
    k = 32 * draw(st.integers(1, max_k // 32))
    if axis == "oc":
        group = draw(st.sampled_from([g for g in GROUPS if g == -1 or k % g == 0]))
        n = draw(st.integers(1, max_n))
    else:
        group = draw(st.sampled_from([g for g in GROUPS if g == -1 or g <= max_n] + [-1]))
        n = draw(st.integers(1, max_n)) if group == -1 else group * draw(st.integers(1, max(1, max_n // group)))
    return QuantSpec(bits=bits, group_size=group, axis=axis, symmetric=sym, scale_dtype=sd), n, k


@given(case=spec_and_shape(), wdtype=st.sampled_from(FLOAT_DTYPES), seed=st.integers(0, 2 ** 16),
       spread=st.sampled_from([1e-3, 0.1, 3.0, 1000.0]))
def test_format_random_shapes(case, wdtype, seed, spread):
    spec, n, k = case
    w = (make_weight(n, k, torch.float32, seed) * spread).to(wdtype)
    got = ops.quantize(w, spec)
    assert_same_triple(got, R.quantize(w, spec), f"{spec_id(spec)} {n}x{k}")
    codes, s, z = got
    q = ops.pack(codes, spec.bits)
    assert torch.equal(q, R.pack(codes, spec.bits))
    assert torch.equal(ops.unpack(q, spec.bits), codes)
    out = wdtype
    assert torch.equal(ops.dequantize(q, s, z, spec, out), R.dequantize(codes, s, z, spec, out))
    nq, ns, nz = ops.repack(q, s, z, spec)
    assert nq.shape == ((n + 15) // 16, k // 32, spec.bits, 16)
    bq, bs, bz = ops.unrepack(nq, ns, nz, spec, n)
    assert torch.equal(bq, q) and torch.equal(bs, s)
    assert (bz is None) if spec.symmetric else torch.equal(bz, z)


@given(bits=st.sampled_from(BITS), n=st.integers(1, 40), kb=st.integers(1, 12), seed=st.integers(0, 2 ** 16))
def test_pack_unpack_round_trip_random_codes(bits, n, kb, seed):
    codes = torch.randint(0, 2 ** bits, (n, 32 * kb), generator=torch.Generator().manual_seed(seed),
                          dtype=torch.uint8)
    q = ops.pack(codes, bits)
    assert torch.equal(q, R.pack(codes, bits))
    assert torch.equal(ops.unpack(q, bits), codes)


@given(case=spec_and_shape(max_k=256, max_n=64), seed=st.integers(0, 2 ** 16))
def test_quantisation_error_is_bounded(case, seed):
    """|w - dequant(quant(w))| <= s (half a step from rounding, half a step from rounding the zero
    point) plus the drift of the range ends from storing s in its dtype (qmax * eps * s)."""
    spec, n, k = case
    w = make_weight(n, k, torch.float32, seed)
    codes, s, z = ops.quantize(w, spec)
    deq = ops.dequantize(ops.pack(codes, spec.bits), s, z, spec, torch.float32).double()
    step = expand_params(s.double().abs(), spec, n, k)
    eps_s = torch.finfo(spec.scale_dtype).eps
    bound = step * (1.0 + (2 ** spec.bits) * eps_s) + 1e-6 * w.double().abs()
    assert ((w.double() - deq).abs() <= bound).all()


# ---- edge cases ---------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", [QuantSpec(b, 32, a, sym, sd) for b, a, sym, sd in itertools.product(
    (2, 4, 8), AXES, (True, False), (torch.float32, torch.float16))], ids=spec_id)
def test_edge_case_groups(spec):
    n, k = 64, 128
    w = make_weight(n, k, seed=21) * 0.01
    if spec.axis == "oc":
        w[0, :32] = 0.0                     # all-zero group
        w[1, 32:64] = 0.75                  # constant positive group
        w[2, 64:96] = -1.5                  # constant negative group
        w[3, 96:128] = make_weight(1, 32, seed=22) * 0.01
        w[3, 100] = 1e4                     # one huge outlier
        groups = [(0, slice(0, 32)), (1, slice(32, 64)), (2, slice(64, 96)), (3, slice(96, 128))]
        get = lambda t, i: t[groups[i][0], groups[i][1]]  # noqa: E731
        sidx = [(0, 0), (1, 1), (2, 2), (3, 3)]
    else:
        w[:32, 0] = 0.0
        w[32:64, 1] = 0.75
        w[:32, 2] = -1.5
        w[32:64, 3] = 1e-2 * make_weight(32, 1, seed=22)[:, 0]
        w[40, 3] = 1e4
        groups = [(slice(0, 32), 0), (slice(32, 64), 1), (slice(0, 32), 2), (slice(32, 64), 3)]
        get = lambda t, i: t[groups[i][0], groups[i][1]]  # noqa: E731
        sidx = [(0, 0), (1, 1), (2, 0), (3, 1)]
    got = ops.quantize(w, spec)
    assert_same_triple(got, R.quantize(w, spec), spec_id(spec))
    codes, s, z = got
    deq = ops.dequantize(ops.pack(codes, spec.bits), s, z, spec, torch.float32)
    assert torch.isfinite(deq).all() and torch.isfinite(s.float()).all()
    zero = 2 ** (spec.bits - 1)
    # all-zero group: scale 1 (never 0), codes at the zero point, exact zeros back
    assert s[sidx[0]].item() == 1.0
    assert (get(deq, 0) == 0).all()
    assert (get(codes, 0) == (zero if spec.symmetric else z[sidx[0]].item())).all()
    # constant groups come back (nearly) exactly: they sit on the end of the code range
    for i, c in ((1, 0.75), (2, -1.5)):
        assert (get(codes, i) == get(codes, i)[0]).all()
        assert torch.allclose(get(deq, i), torch.full_like(get(deq, i), c), rtol=2 ** -7, atol=0)
    # the outlier is represented within a step and the group's other weights collapse to ~0
    out = get(deq, 3)
    assert abs(out.max().item() - 1e4) <= abs(s[sidx[3]].float().item())
    assert (out[out < 1e3].abs() <= abs(s[sidx[3]].float().item())).all()
    # the outlier does not leak into other groups: their step stays tiny
    other = s.float().abs().clone()
    other[sidx[3]] = 0
    other[sidx[0]] = 0
    other[sidx[1]] = 0
    other[sidx[2]] = 0
    assert other.max().item() < 0.1


@pytest.mark.parametrize("spec", [QuantSpec(4, 32, "ic", False, torch.bfloat16),
                                  QuantSpec(3, 64, "oc", True, torch.float16)], ids=spec_id)
def test_format_ops_independent_of_thread_count(spec):
    """Work is split over rows/columns/tiles, so every format op gives bitwise the same result
    for any number of threads (the rest of this module runs single-threaded for speed)."""
    w = make_weight(96, 256, seed=9)
    old = torch.get_num_threads()
    results = {}
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            c, s, z = ops.quantize(w, spec)
            q = ops.pack(c, spec.bits)
            nat = ops.repack(q, s, z, spec)
            results[threads] = [c, s, z, q, ops.unpack(q, spec.bits), ops.dequantize(q, s, z, spec),
                                *nat, *ops.unrepack(*nat, spec, 96)]
    finally:
        torch.set_num_threads(old)
    for threads in (2, 3):
        for a, b in zip(results[1], results[threads]):
            assert (a is None and b is None) or torch.equal(a, b), f"{threads} threads differ"


@pytest.mark.parametrize("wdtype", FLOAT_DTYPES, ids=dtype_id)
def test_quantize_accepts_each_weight_dtype_without_upcast(wdtype):
    """A bf16/fp16 weight is quantised from its own values (identical to quantising the same
    values given as fp32)."""
    spec = QuantSpec(3, 64, "oc", False, torch.float32)
    w = make_weight(17, 128, wdtype, seed=4)
    assert_same_triple(ops.quantize(w, spec), ops.quantize(w.float(), spec))


def test_repack_layout_argument_and_padded_rows():
    spec = QuantSpec(2, -1, "oc", False, torch.float16)
    codes, s, z = ops.quantize(make_weight(1, 32, seed=1), spec)  # N=1: a single, mostly padded tile
    q = ops.pack(codes, 2)
    nq, ns, nz = ops.repack(q, s, z, spec, Layout.CPU_BITPLANE16)
    assert nq.shape == (1, 1, 2, 16) and (nq[..., 1:] == 0).all()
    assert ns.shape == (1, 1, 16) and (ns[..., 1:] == 0).all() and (nz[..., 1:] == 0).all()
    bq, bs, bz = ops.unrepack(nq, ns, nz, spec, 1, Layout.CPU_BITPLANE16)
    assert torch.equal(bq, q) and torch.equal(bs, s) and torch.equal(bz, z)
