"""The tensor-core GEMM (cuda/kernels/gemm_cuda_mma.cu) and its weight layout Layout.CUDA_MMA
(cpp/include/layerpress/cuda_mma_layout.h, docs/format.md §4a), run in the CUDA emulator and
compared with float64 references and the CPU ops. CPU-only: never skipped. Emulated, not verified:
only scripts/gpu_check.sh on a GPU verifies the kernel.

* the layout: the CPU repack against an independent plain-PyTorch decoder of docs/format.md §4a
  (codes, scales, zeros bit-exact), the repack -> unrepack round trip, and the CUDA repack kernels
  (emulated) bit-exact against the CPU repack;
* the GEMM: every bits x axis x group x sym/asym format at M = 1 and 7 (fp16 and bf16, scale
  dtypes rotating), M = 16, 33, 128 on a subset, odd N (padded strips) and K % 64 = 32 (a short
  last stage), split-K, fp32 activations and unaligned rows (the fallback kernel on the same
  layout), gemm_t on the layout, and the reverse/random thread orders.

Tolerance: the fp32-summation bound of tests/cuda_testutils.py plus what tensor cores add: each
weight (per-OC) or activation x scale product (per-IC) is rounded once to the activation type
before the product (u = 2^-11 fp16, 2^-8 bf16), a scale of another dtype once more, and fp16
subnormals lose up to 2^-25 absolute.
"""
from __future__ import annotations

import ctypes
import itertools

import pytest
import torch

from layerpress import Layout, QuantSpec, ops

from cuda_emu import AXIS, FLOAT_TYPE, EmulatedLaunchError, _ptr
from cuda_testutils import (BITS, AXES, GROUPS, MMA_UNIT, activation, assert_same_bits, assert_within, dtype_id,
                            folded_magnitude, gemm_tolerance, mma_rounded_reference, mma_rounding_tolerance,
                            quantized, sample_weight, spec_id)
from layerpress import reference as R
from test_cuda_emulated import emu, emu_build  # noqa: F401  (the session's emulator fixtures)

MMA = Layout.CUDA_MMA
ACT_DTYPES = (torch.float16, torch.bfloat16)


class MmaEmulator:
    """ctypes wrappers of lp_emu_repack_cuda_mma / lp_emu_gemm_cuda_mma (cuda/emu/emu_capi.cpp)."""

    def __init__(self, emu):
        self.emu = emu
        lib = emu.lib
        i64, i32, p = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
        lib.lp_emu_repack_cuda_mma.argtypes = [i32, p, p, p, i64, i64, i32, i32, i32, i32, i32, p, p, p]
        lib.lp_emu_gemm_cuda_mma.argtypes = [i32, p, p, p, i64, i64, i32, i32, i32, i32, i32, i64, i32, p, i64,
                                             p, p, p]

    def repack(self, q, s, z, spec, n, k, like_q, like_s, like_z, to_layout):
        qo, so = torch.empty_like(like_q), torch.empty_like(like_s)
        zo = None if z is None else torch.empty_like(like_z)
        rc = self.emu.lib.lp_emu_repack_cuda_mma(int(to_layout), _ptr(q), _ptr(s), _ptr(z), n, k, spec.bits,
                                                 spec.group_size, AXIS[spec.axis], int(spec.symmetric),
                                                 FLOAT_TYPE[s.dtype], _ptr(qo), _ptr(so), _ptr(zo))
        self.emu._check(rc, "repack_cuda_mma")
        return qo, so, zo

    def gemm(self, x, q, s, z, bias, spec, n, k, transposed=False):
        """Returns (y, whether the tensor-core kernel ran)."""
        assert x.stride(1) == 1
        m = x.shape[0]
        y = torch.empty(m, k if transposed else n, dtype=x.dtype)
        tc = ctypes.c_int(-1)
        rc = self.emu.lib.lp_emu_gemm_cuda_mma(int(transposed), _ptr(q), _ptr(s), _ptr(z), n, k, spec.bits,
                                               spec.group_size, AXIS[spec.axis], int(spec.symmetric),
                                               FLOAT_TYPE[s.dtype], m, FLOAT_TYPE[x.dtype], _ptr(x), x.stride(0),
                                               _ptr(bias), _ptr(y), ctypes.byref(tc))
        self.emu._check(rc, "gemm_cuda_mma")
        return y, tc.value == 1


@pytest.fixture(scope="module")
def mma(emu):  # noqa: F811
    return MmaEmulator(emu)


# ---- an independent decoder of the layout (docs/format.md §4a), plain PyTorch -----------------------

def decode_mma_codes(qm: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """qweight [ceil(N/64), K/16, 32*bits] -> codes uint8 [N, K], straight from the spec's words."""
    strips, kts, _ = qm.shape
    words = qm.to(torch.int64) & 0xFFFFFFFF
    chunk = min(bits, 4)
    codes = torch.zeros(strips * 64, kts * 16, dtype=torch.int64)
    lane = torch.arange(32)
    g, t = lane // 4, lane % 4
    for e in range(32):
        kk = 2 * t + (e & 1) + 8 * ((e >> 1) & 1)
        nn = 8 * (e >> 2) + g
        p, h = e >> 1, e & 1
        val = torch.zeros(strips, kts, 32, dtype=torch.int64)
        for j in range(bits):
            if bits == 3 and p == 15:
                w, bit = j, 15 + 16 * h
            else:
                per = 5 if bits == 3 else 16 // bits
                w, bit = p // per, 16 * h + bits * (p % per) + j
            off = ((w // chunk) * 32 + lane) * chunk + w % chunk
            val |= ((words[:, :, off] >> bit) & 1) << j
        # codes[64 nt + nn[l], 16 kt + kk[l]] = val[nt, kt, l]
        rows = (torch.arange(strips)[:, None, None] * 64 + nn[None, None, :]).expand(strips, kts, 32)
        cols = (torch.arange(kts)[None, :, None] * 16 + kk[None, None, :]).expand(strips, kts, 32)
        codes[rows.reshape(-1), cols.reshape(-1)] = val.reshape(-1)
    return codes[:n].to(torch.uint8), codes[n:]


def decode_mma_scales(sm: torch.Tensor, spec: QuantSpec, n: int, k: int) -> torch.Tensor:
    """Layout scales (or zeros) -> the canonical [N, K/g] / [K, N/g] tensor."""
    g = spec.group_for(n, k)
    if spec.axis == "oc":  # [strips, K/g, 64], slot 8 (n % 8) + (n % 64) / 8
        cols = torch.arange(n)
        slot = 8 * (cols % 8) + (cols % 64) // 8
        return sm[cols // 64, :, slot]
    # [strips, K, 2 if g == 32 else 1]: entry (nt, k, i) is canonical [k, (64 nt + 32 i) / g]
    groups = n // g
    c = torch.arange(groups)
    nt, i = (c * g) // 64, ((c * g) % 64) // 32 if g == 32 else torch.zeros_like(c)
    return sm[nt, :, i].t().contiguous()


SPECS = [QuantSpec(bits=b, group_size=g, axis=a, symmetric=sym, scale_dtype=sd)
         for (b, a, g, sym), sd in zip(itertools.product(BITS, AXES, GROUPS, (False, True)),
                                       itertools.cycle((torch.float16, torch.bfloat16, torch.float32)))]
IDS = [spec_id(s) for s in SPECS]


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_cpu_repack_matches_the_spec_and_round_trips(spec):
    codes, s, z, q, _, _ = quantized(spec)
    n, k = codes.shape
    qm, sm, zm = ops.repack(q, s, z, spec, MMA)
    strips = (n + 63) // 64
    assert qm.shape == (strips, k // 16, 32 * spec.bits) and qm.dtype == torch.int32
    got_codes, padding = decode_mma_codes(qm, spec.bits, n)
    assert_same_bits(got_codes, codes, f"{spec_id(spec)} codes")
    assert int(padding.abs().sum()) == 0, "padded columns must hold code 0"
    assert_same_bits(decode_mma_scales(sm, spec, n, k), s, f"{spec_id(spec)} scales")
    if not spec.symmetric:
        assert_same_bits(decode_mma_scales(zm, spec, n, k), z, f"{spec_id(spec)} zeros")
    q2, s2, z2 = ops.unrepack(qm, sm, zm, spec, n, MMA)
    assert_same_bits(q2, q, "unrepack qweight")
    assert_same_bits(s2, s, "unrepack scales")
    if not spec.symmetric:
        assert_same_bits(z2, z, "unrepack zeros")


def test_layout_errors_name_the_constraint():
    spec = QuantSpec(bits=4, group_size=128, axis="oc")
    codes, s, z, q, _, _ = quantized(spec)
    n = codes.shape[0]
    qm, sm, zm = ops.repack(q, s, z, spec, MMA)
    x = torch.zeros(2, codes.shape[1])
    with pytest.raises(ValueError, match="not a CPU kernel layout"):
        ops.gemm(x, qm, sm, zm, None, spec, n, MMA)
    with pytest.raises(ValueError, match=r"cuda_mma shape \[ceil\(N/64\), K/16, 32\*bits\]"):
        ops.unrepack(qm[:, :, :64], sm, zm, spec, n, MMA)
    with pytest.raises(ValueError, match="64-column strips"):
        ops.unrepack(qm, sm, zm, spec, n + 64, MMA)
    with pytest.raises(ValueError, match="multiple of 32"):  # the format's K rule holds for the layout too
        ops.unrepack(qm[:, :1], sm[:, :1], zm[:, :1], spec, n, MMA)


@pytest.mark.parametrize("spec", SPECS[::7], ids=IDS[::7])
def test_fake_shapes_match_the_real_ops(spec):
    """The meta/fake implementations (what torch.compile traces, for CUDA tensors too) give the
    shapes and dtypes the real repack/unrepack produce, and gemm/gemm_t the right output shapes."""
    codes, s, z, q, _, _ = quantized(spec)
    n, k = codes.shape
    lp = torch.ops.layerpress
    args = (spec.bits, spec.group_size, spec.axis_id)
    meta = lambda t: None if t is None else t.to("meta")  # noqa: E731
    real = lp.repack(q, s, z, *args, int(MMA))
    fake = lp.repack(meta(q), meta(s), meta(z), *args, int(MMA))
    for r, f in zip(real, fake):
        assert (f.shape, f.dtype, f.device.type) == (r.shape, r.dtype, "meta")
    zr = None if spec.symmetric else real[2]  # symmetric: an empty placeholder comes back; pass None
    zz = meta(zr)
    back = lp.unrepack(real[0], real[1], zr, *args, int(MMA), n)
    fake_back = lp.unrepack(meta(real[0]), meta(real[1]), zz, *args, int(MMA), n)
    for r, f in zip(back, fake_back):
        assert (f.shape, f.dtype) == (r.shape, r.dtype)
    y = lp.gemm(torch.empty(2, 3, k, device="meta", dtype=torch.float16), meta(real[0]), meta(real[1]), zz, None,
                *args, int(MMA), n)
    assert y.shape == (2, 3, n) and y.dtype == torch.float16
    yt = lp.gemm_t(torch.empty(5, n, device="meta"), meta(real[0]), meta(real[1]), zz, *args, int(MMA), n)
    assert yt.shape == (5, k)


@pytest.mark.parametrize("spec", SPECS[::3], ids=IDS[::3])
def test_emulated_repack_kernels_match_cpu(mma, spec):
    codes, s, z, q, _, _ = quantized(spec)
    n, k = codes.shape
    qm, sm, zm = ops.repack(q, s, z, spec, MMA)
    zc = None if spec.symmetric else z
    zl = None if spec.symmetric else zm
    got = mma.repack(q, s, zc, spec, n, k, qm, sm, zm, True)
    assert_same_bits(got[0], qm, "repack qweight")
    assert_same_bits(got[1], sm, "repack scales")
    if not spec.symmetric:
        assert_same_bits(got[2], zm, "repack zeros")
    back = mma.repack(qm, sm, zl, spec, n, k, q, s, z, False)
    assert_same_bits(back[0], q, "unrepack qweight")
    assert_same_bits(back[1], s, "unrepack scales")
    if not spec.symmetric:
        assert_same_bits(back[2], z, "unrepack zeros")


# ---- the GEMM -------------------------------------------------------------------------------------

def check_mma_gemm(mma, spec, n, k, m, act_dtype, seed, bias=False, ldx_pad=0, expect_tensor_cores=True):
    w = sample_weight(n, k, seed=n + 7 * spec.bits + k)
    codes, s, z = ops.quantize(w, spec)
    q = ops.pack(codes, spec.bits)
    w64 = R.dequantize(codes, s, z, spec).double()
    qm, sm, zm = ops.repack(q, s, z, spec, MMA)
    x = activation((m, k + ldx_pad), act_dtype, seed)[:, :k]
    b = activation((n,), act_dtype, seed + 1) if bias else None
    y, tc = mma.gemm(x, qm, sm, None if spec.symmetric else zm, b, spec, n, k)
    assert tc == expect_tensor_cores, f"tensor-core path {'not ' if expect_tensor_cores else ''}taken"
    y_ref = x.double() @ w64.t() + (0 if b is None else b.double())
    mag = folded_magnitude(codes, s, z, spec)
    tol = gemm_tolerance(x, mag, y_ref, act_dtype, b)
    if act_dtype in MMA_UNIT and expect_tensor_cores:
        tol = tol + mma_rounding_tolerance(x, w64, spec, act_dtype)
    what = f"{spec_id(spec)} mma {dtype_id(act_dtype)} M={m} N={n} K={k}"
    assert_within(y, y_ref, tol, what)
    if expect_tensor_cores and spec.scale_dtype == act_dtype:
        # the tight check: the same roundings in the reference, fp32 summation error only
        y_exact = mma_rounded_reference(x, codes, s, None if spec.symmetric else z, spec, act_dtype)
        y_exact = y_exact + (0 if b is None else b.double())
        assert_within(y, y_exact, gemm_tolerance(x, mag, y_exact, act_dtype, b), what + " (rounded reference)")
    return y, y_ref


# [N, K] per (axis, group): odd N where the format allows it (per-OC, whole-column per-IC), K with a
# short last stage (K % 64 == 32) where the group allows it.
MMA_SHAPES = {
    ("oc", 32): (37, 224), ("oc", 64): (70, 192), ("oc", 128): (37, 256), ("oc", 256): (64, 256),
    ("oc", -1): (37, 96),
    ("ic", 32): (96, 64), ("ic", 64): (128, 96), ("ic", 128): (128, 32), ("ic", 256): (256, 32),
    ("ic", -1): (33, 96),
}


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_mma_gemm_every_format_small_m(mma, spec):
    n, k = MMA_SHAPES[(spec.axis, spec.group_size)]
    for i, m in enumerate((1, 7)):
        # M = 1 in the scales' dtype (the tight check applies), M = 7 in the other one
        same = spec.scale_dtype if spec.scale_dtype in ACT_DTYPES else ACT_DTYPES[spec.bits % 2]
        dt = same if i == 0 else ACT_DTYPES[1 - ACT_DTYPES.index(same)]
        check_mma_gemm(mma, spec, n, k, m, dt, seed=m + spec.bits, bias=i == 0)


LARGER = [QuantSpec(bits=4, group_size=128, axis="oc", scale_dtype=torch.float16),
          QuantSpec(bits=4, group_size=128, axis="ic", scale_dtype=torch.float16),
          QuantSpec(bits=3, group_size=32, axis="oc", symmetric=True, scale_dtype=torch.bfloat16),
          QuantSpec(bits=2, group_size=32, axis="ic", scale_dtype=torch.float16),
          QuantSpec(bits=8, group_size=-1, axis="oc", scale_dtype=torch.float32)]


@pytest.mark.parametrize("m", (16, 33, 128))
@pytest.mark.parametrize("dtype", ACT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("spec", LARGER, ids=[spec_id(s) for s in LARGER])
def test_mma_gemm_larger_m(mma, spec, dtype, m):
    n, k = (128, 128) if spec.axis == "ic" else (72, 128)
    check_mma_gemm(mma, spec, n, k, m, dtype, seed=m, bias=True, ldx_pad=8)


@pytest.mark.parametrize("spec", LARGER[:2] + LARGER[3:4], ids=[spec_id(s) for s in LARGER[:2] + LARGER[3:4]])
def test_mma_gemm_split_k(mma, spec):
    """K = 1024 over one or two strips: 132 emulated SMs make the planner split K 4 ways (workspace
    and the finishing kernel)."""
    n = 128 if spec.axis == "ic" else 64
    check_mma_gemm(mma, spec, n, 1024, 1, torch.float16, seed=5, bias=True)
    check_mma_gemm(mma, spec, n, 1024, 3, torch.bfloat16, seed=6)


def test_mma_gemm_fallbacks(mma):
    """fp32 activations and rows that are not 16-byte aligned run the simple kernel on the layout."""
    spec = QuantSpec(bits=4, group_size=64, axis="ic", scale_dtype=torch.bfloat16)
    check_mma_gemm(mma, spec, 64, 96, 5, torch.float32, seed=1, bias=True, expect_tensor_cores=False)
    check_mma_gemm(mma, spec, 64, 96, 5, torch.float16, seed=2, ldx_pad=4, expect_tensor_cores=False)


@pytest.mark.parametrize("spec", LARGER, ids=[spec_id(s) for s in LARGER])
def test_gemm_t_on_the_layout(mma, spec):
    n, k = (128, 128) if spec.axis == "ic" else (72, 128)
    w = sample_weight(n, k, seed=3)
    codes, s, z = ops.quantize(w, spec)
    q = ops.pack(codes, spec.bits)
    w64 = R.dequantize(codes, s, z, spec).double()
    qm, sm, zm = ops.repack(q, s, z, spec, MMA)
    for dt in (torch.float32, torch.bfloat16):
        g = activation((5, n), dt, 9)
        y, _ = mma.gemm(g, qm, sm, None if spec.symmetric else zm, None, spec, n, k, transposed=True)
        y_ref = g.double() @ w64
        assert_within(y, y_ref, gemm_tolerance(g, folded_magnitude(codes, s, z, spec).t(), y_ref, dt),
                      f"{spec_id(spec)} gemm_t {dtype_id(dt)}")


@pytest.mark.parametrize("schedule", ("reverse", "random"))
def test_mma_gemm_under_other_thread_orders(mma, emu, schedule):  # noqa: F811
    emu.configure(schedule=schedule, seed=99)
    try:
        for spec in LARGER[:2]:
            check_mma_gemm(mma, spec, 72 if spec.axis == "oc" else 128, 384, 33, torch.float16, seed=4, bias=True)
    finally:
        emu.configure()


# ---- the tests catch broken tensor-core kernels ------------------------------------------------------

# Four bugs in one copy of gemm_cuda_mma.cuh, each confined to configurations the others leave alone,
# so one emulator build shows that each is caught (and that an unaffected configuration still passes).
MMA_MUTATIONS = {
    # per-IC only: rows 2t+8, 2t+9 of the A fragment scaled with the scales of rows 2t, 2t+1
    "ic-a-scale-rows": ("scale_at(s_st, r8, a.scale_type), scale_at(s_st, r8 + ic_gs, a.scale_type)",
                        "scale_at(s_st, r0, a.scale_type), scale_at(s_st, r0 + ic_gs, a.scale_type)"),
    # 3-bit only: the spare-bit pair reads the wrong bit of the second word
    "3bit-spare-pair": ("ptx::lop3<kLut>(q[1] >> 14, 0x00020002u, b0)", "ptx::lop3<kLut>(q[1] >> 15, 0x00020002u, b0)"),
    # split-K only: the finishing kernel drops the last split
    "split-k-finish": ("for (int s = 1; s < split; ++s)", "for (int s = 1; s + 1 < split; ++s)"),
    # 17 <= M <= 32 only (two m16 tiles per block): no barrier between a stage's cp.async and its use
    "stage-barrier": ("    ptx::cp_async_wait<kStages - 2>();\n    __syncthreads();",
                      "    ptx::cp_async_wait<kStages - 2>();\n    if (kMB != 2) __syncthreads();"),
}


def test_broken_mma_kernels_fail(tmp_path_factory):
    import shutil

    from cuda_emu import ROOT, Emulator, build
    kernels = tmp_path_factory.mktemp("broken_mma") / "kernels"
    shutil.copytree(ROOT / "cuda" / "kernels", kernels)
    text = (kernels / "gemm_cuda_mma.cuh").read_text()
    for name, (old, new) in MMA_MUTATIONS.items():
        assert text.count(old) == 1, f"mutation {name}: the kernel source changed; update MMA_MUTATIONS"
        text = text.replace(old, new)
    (kernels / "gemm_cuda_mma.cuh").write_text(text)
    broken = MmaEmulator(Emulator(build(kernels.parent / "build", kernel_dir=kernels)))
    oc4 = QuantSpec(bits=4, group_size=64, axis="oc", scale_dtype=torch.float16)
    check_mma_gemm(broken, oc4, 72, 128, 7, torch.float16, seed=1)  # untouched by every mutation

    def fails(*args, **kw):
        with pytest.raises(AssertionError, match="out of tolerance"):
            check_mma_gemm(broken, *args, **kw)

    fails(QuantSpec(bits=4, group_size=64, axis="ic", scale_dtype=torch.float16), 128, 128, 7, torch.float16, seed=1)
    fails(QuantSpec(bits=3, group_size=64, axis="oc", scale_dtype=torch.float16), 72, 128, 7, torch.float16, seed=1)
    fails(oc4, 64, 1024, 1, torch.float16, seed=1)
    caught = []
    for schedule in ("forward", "reverse", "random"):
        broken.emu.configure(schedule=schedule, seed=5)
        try:
            check_mma_gemm(broken, oc4, 72, 128, 20, torch.float16, seed=2)
        except AssertionError:
            caught.append(schedule)
    broken.emu.configure()
    assert caught, "the missing barrier went unnoticed under every thread order"
