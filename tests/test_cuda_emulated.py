"""Every CUDA kernel of cuda/kernels, run in the CUDA emulator (cuda/emu: the kernels' own sources
compiled by the host compiler, CUDA threads as fibres with real barrier and warp-collective
semantics) and compared with the CPU ops and float64 references. CPU-only: never skipped.

Bit-exact where the CPU op is exact (quantize, pack, unpack, dequantize, the WTA-CRS draw and
gather); the GEMMs within the fp32-summation bound of tests/cuda_testutils.py; norms and the
sampled weight gradient within a normwise bound of a few units of fp32 (or of the output type).
Each group also runs under the reverse and a random thread order, which exposes missing barriers
that the forward order can hide. ``test_broken_kernels_fail`` builds deliberately broken copies
of the kernels and checks that these comparisons catch them.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from layerpress import Layout, QuantSpec, ops

from cuda_emu import DEFAULT_BUILD, ROOT, Emulator, build
from cuda_testutils import (AXES, BITS, FLOAT_DTYPES, SPECS, SPEC_IDS, activation, assert_same_bits,
                            assert_within, dtype_id, gemm_tolerance, quantized, sample_weight, shape_of, spec_id)
from lp_testutils import exact_cpu_gemm

SCHEDULES = ("forward", "reverse", "random")


@pytest.fixture(scope="session")
def emu_build():
    # LAYERPRESS_CUDA_EMU_KERNELS=DIR runs the suite on another copy of cuda/kernels (a kernel
    # under development, or a broken one to see what the tests catch).
    # LAYERPRESS_CUDA_EMU_SANITIZE=address,undefined builds it with sanitizers (run python with the
    # sanitizer runtime preloaded: LD_PRELOAD=$(gcc -print-file-name=libasan.so), ASAN_OPTIONS=detect_leaks=0).
    other = os.environ.get("LAYERPRESS_CUDA_EMU_KERNELS")
    sanitize = os.environ.get("LAYERPRESS_CUDA_EMU_SANITIZE", "")
    where = DEFAULT_BUILD if not sanitize else DEFAULT_BUILD.with_name("cuda-emu-" + sanitize.replace(",", "-"))
    if other:
        return build(Path(other).resolve().parent / "cuda-emu-build", kernel_dir=Path(other).resolve(),
                     sanitize=sanitize)
    return build(where, sanitize=sanitize)


@pytest.fixture(scope="session")
def emu(emu_build):
    return Emulator(emu_build)


@pytest.fixture(params=SCHEDULES)
def emu_any_order(request, emu):
    """The emulator under each thread order (reset to forward afterwards)."""
    emu.configure(schedule=request.param, seed=1234)
    yield emu
    emu.configure()


# ---- the primitives: mma/ldmatrix layouts, cp.async, shuffles, votes, barriers, atomics, lop3/prmt ----

@pytest.mark.parametrize("schedule", SCHEDULES)
def test_ptx_selftest(emu_build, schedule):
    """cuda/emu/tests/ptx_selftest.cu: the mma.m16n8k16 (f16, bf16) and ldmatrix (x1/x2/x4, .trans)
    fragment layouts against plain matrix products, and the emulator's own diagnostics."""
    env = {**os.environ, "LP_EMU_SCHEDULE": schedule if schedule != "random" else "random:77"}
    r = subprocess.run([str(emu_build / "ptx_selftest")], capture_output=True, text=True, env=env, timeout=120)
    lines = r.stdout.strip().splitlines()
    assert r.returncode == 0 and lines and lines[-1].endswith(" 0 failed"), r.stdout + r.stderr
    names = " ".join(lines)
    for needed in ("mma.m16n8k16.f16 exact", "mma.m16n8k16.bf16 exact", "ldmatrix.x4.trans", "ldmatrix+mma tile bf16",
                   "cp.async 3-stage pipeline", "emulator: divergent __syncthreads"):
        assert "PASS " + needed in names, needed


# ---- format ops: bit-exact against the CPU ops ---------------------------------------------------

def _raw_quantize(w, spec, scales=None, zeros=None):
    return torch.ops.layerpress.quantize(w, spec.bits, spec.group_size, spec.axis_id, spec.symmetric,
                                         spec.scale_dtype, scales, zeros)


@pytest.mark.parametrize("wdtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_quantize_matches_cpu(emu, spec, wdtype):
    n, k = shape_of(spec)
    w = sample_weight(n, k, wdtype, seed=3 * n + spec.bits)
    want_codes, want_s, want_z = _raw_quantize(w, spec)
    codes, s, z, nonfinite = emu.quantize(w, spec.bits, spec.group_size, spec.axis, spec.symmetric,
                                          spec.scale_dtype)
    assert not nonfinite
    assert_same_bits(codes, want_codes, f"{spec_id(spec)} codes")
    assert_same_bits(s, want_s, f"{spec_id(spec)} scales")
    if not spec.symmetric:
        assert_same_bits(z, want_z, f"{spec_id(spec)} zeros")
    # given scales (and zeros): the codes are recomputed from them
    given = emu.quantize(w, spec.bits, spec.group_size, spec.axis, spec.symmetric, spec.scale_dtype,
                         want_s, None if spec.symmetric else want_z)
    assert_same_bits(given[0], want_codes, f"{spec_id(spec)} given-scales codes")


@pytest.mark.parametrize("axis", AXES)
def test_quantize_flags_nonfinite_and_covers_large_grids(emu, axis):
    w = sample_weight(512, 2048, seed=5)  # 32768 groups per-OC: more than one wave of the grid
    spec = QuantSpec(bits=3, group_size=32, axis=axis, symmetric=False, scale_dtype=torch.bfloat16)
    want = _raw_quantize(w, spec)
    got = emu.quantize(w, 3, 32, axis, False, torch.bfloat16)
    for name, g, c in zip(("codes", "scales", "zeros"), got[:3], want):
        assert_same_bits(g, c, f"{axis} {name}")
    w[7, 99] = float("nan")
    assert emu.quantize(w, 3, 32, axis, False, torch.bfloat16)[3]


@pytest.mark.parametrize("shape", [(37, 256), (1, 32), (300, 4096)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("bits", BITS)
def test_pack_unpack_match_cpu(emu, bits, shape):
    n, k = shape
    codes = torch.randint(0, 2 ** bits, (n, k), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(bits * 1000 + n))
    packed = emu.pack(codes, bits)
    assert_same_bits(packed, ops.pack(codes, bits), "packed")
    assert_same_bits(emu.unpack(packed, bits), codes, "unpacked")


@pytest.mark.parametrize("out_dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_dequantize_matches_cpu(emu, spec, out_dtype):
    codes, s, z, q, _, _ = quantized(spec)
    got = emu.dequantize(q, s, z, spec.bits, spec.group_size, spec.axis, spec.symmetric, out_dtype)
    assert_same_bits(got, ops.dequantize(q, s, z, spec, out_dtype), f"{spec_id(spec)} dequantize")


# ---- GEMM and transposed GEMM --------------------------------------------------------------------

def _cpu_gemm(spec, x, q, s, z, bias, n, transposed):
    """The CPU op on an exact variant (the avx512_bf16 tile path rounds its operands to bf16,
    the CUDA kernels do not, so the two would not share one bound)."""
    q1, s1, z1 = ops.repack(q, s, z, spec)
    with exact_cpu_gemm():
        if transposed:
            return ops.gemm_t(x, q1, s1, z1, spec, n, Layout.CPU_BITPLANE16)
        return ops.gemm(x, q1, s1, z1, bias, spec, n, Layout.CPU_BITPLANE16)


def _check_gemm(emu, spec, dtype, m, seed, transposed, with_bias=False, strided=False):
    n, k = shape_of(spec)
    codes, s, z, q, w64, mag = quantized(spec)
    r_in = n if transposed else k
    x = activation((m, r_in + (8 if strided else 0)), dtype, seed)[:, :r_in]  # row stride > width
    bias = activation((n,), dtype, seed + 1) if with_bias and not transposed else None
    y = emu.gemm(x, q, s, z, bias, spec.bits, spec.group_size, spec.axis, spec.symmetric, transposed)
    if transposed:
        y_ref = x.double() @ w64
        tol = gemm_tolerance(x, mag.t(), y_ref, dtype)
    else:
        y_ref = x.double() @ w64.t() + (0 if bias is None else bias.double())
        tol = gemm_tolerance(x, mag, y_ref, dtype, bias)
    what = f"{spec_id(spec)} {'gemm_t' if transposed else 'gemm'} {dtype_id(dtype)} M={m}"
    assert_within(y, y_ref, tol, what)
    # and against the CPU op, which meets the same bound: both lie within 2·tol of each other
    y_cpu = _cpu_gemm(spec, x.contiguous(), q, s, z, bias, n, transposed)
    assert_within(y, y_cpu.double(), 2 * tol, what + " vs CPU op")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_gemm_small_m_every_format(emu, spec, dtype):
    for i, m in enumerate((1, 7)):
        _check_gemm(emu, spec, dtype, m, seed=10 * m + spec.bits, transposed=False, with_bias=i == 0)
        _check_gemm(emu, spec, dtype, m, seed=20 * m + spec.bits, transposed=True)


LARGE_M_SPECS = [QuantSpec(bits=b, group_size=g, axis=a, symmetric=sym, scale_dtype=torch.float16)
                 for b, a, g, sym in [(4, "oc", 128, False), (4, "ic", 128, False), (3, "oc", 32, True),
                                      (2, "ic", 64, False), (8, "oc", -1, False)]]


@pytest.mark.parametrize("m", (16, 128, 300))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("spec", LARGE_M_SPECS, ids=[spec_id(s) for s in LARGE_M_SPECS])
def test_gemm_larger_m(emu, spec, dtype, m):
    """M = 16, 128, 300: several row tiles (and a partial one), strided activations."""
    _check_gemm(emu, spec, dtype, m, seed=m + spec.bits, transposed=False, with_bias=True, strided=True)
    _check_gemm(emu, spec, dtype, m, seed=m + 3 * spec.bits, transposed=True, strided=True)


def test_gemm_under_every_thread_order(emu_any_order):
    for spec in LARGE_M_SPECS[:2]:
        for transposed in (False, True):
            _check_gemm(emu_any_order, spec, torch.float32, 33, seed=4, transposed=transposed, with_bias=True)


def test_gemm_empty_m_enqueues_nothing(emu):
    spec = LARGE_M_SPECS[0]
    _, s, z, q, _, _ = quantized(spec)
    x = torch.empty(0, shape_of(spec)[1])
    assert emu.gemm(x, q, s, z, None, 4, 128, "oc", False).shape == (0, shape_of(spec)[0])


# ---- fused norms ---------------------------------------------------------------------------------

NORM_TOL = {torch.float32: 4e-6, torch.float64: 1e-13, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}


def assert_normwise_close(got, want, dtype, what, scale=1.0):
    """max |got - want| <= tol(dtype) · scale · max |want|: a few units of fp32 summation (or one
    rounding of the output type), relative to the tensor's size; any wrong index or lane is O(1)."""
    got, want = got.double(), want.double()
    assert got.shape == want.shape, what
    assert torch.isfinite(got).all(), f"{what}: non-finite"
    err = (got - want).abs().max().item()
    bound = NORM_TOL[dtype] * scale * max(want.abs().max().item(), 1e-30)
    assert err <= bound, f"{what}: max error {err:.3e} > {bound:.3e}"


NORM_SHAPES = [(1, 64), (7, 100), (33, 1000), (5, 1030), (3, 4096)]  # warp and block modes, odd widths
NORM_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _norm_inputs(rows, cols, dtype, seed, strided):
    g = torch.Generator().manual_seed(seed)
    width = cols + (16 if strided else 0)
    x = (torch.randn(rows, width, generator=g) * 2 + 0.5).to(dtype)[:, :cols]
    r = torch.randn(rows, cols, generator=g).to(dtype)
    w = (torch.rand(cols, generator=g) + 0.5).to(dtype)
    b = torch.randn(cols, generator=g).to(dtype)
    return x, r, w, b


@pytest.mark.parametrize("center", (False, True), ids=("rms", "layer"))
@pytest.mark.parametrize("dtype", NORM_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", NORM_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_norm_forward_backward_match_cpu(emu, shape, dtype, center):
    rows, cols = shape
    lp = torch.ops.layerpress
    eps = 1e-5
    for residual, strided, affine in ((False, False, True), (True, True, True), (False, True, False)):
        x, r, w, b = _norm_inputs(rows, cols, dtype, seed=rows * cols, strided=strided)
        w = w if affine else None
        b = b if affine and center else None
        what = f"{'layer' if center else 'rms'} {dtype_id(dtype)} {rows}x{cols} residual={residual} affine={affine}"
        y, h, mean, rstd = emu.norm_forward(x, w, b, eps, center, r if residual else None)
        xc = x.contiguous()
        if center:
            want = lp.add_layer_norm(xc, r, w, b, eps) if residual else lp.layer_norm(xc, w, b, eps)
            want_y, want_h, want_mean, want_rstd = want if residual else (want[0], None, want[1], want[2])
            assert_normwise_close(mean, want_mean, torch.float64 if dtype == torch.float64 else torch.float32,
                                  what + " mean", scale=4)
        else:
            want = lp.add_rms_norm(xc, r, w, eps) if residual else lp.rms_norm(xc, w, eps)
            want_y, want_h, want_rstd = want if residual else (want[0], None, want[1])
        if residual:
            assert_same_bits(h, want_h, what + " h")  # one rounded add: exact
        assert_normwise_close(y, want_y, dtype, what + " y", scale=2)
        assert_normwise_close(rstd, want_rstd, torch.float64 if dtype == torch.float64 else torch.float32,
                              what + " rstd", scale=4)
        # backward from the forward's own statistics (h is the normalised input of the fused form)
        src = h if residual else x
        gy = activation((rows, cols), dtype, seed=rows + cols)
        gh = activation((rows, cols), dtype, seed=rows + 2 * cols) if residual else None
        dx, dw, db = emu.norm_backward(gy, src, w, mean, rstd, gh, center, w is not None, b is not None)
        srcc = src.contiguous()
        if center:
            want_dx, want_dw, want_db = lp.layer_norm_backward(gy, srcc, w, want_mean, want_rstd, gh,
                                                               w is not None, b is not None)
        else:
            want_dx, want_dw = lp.rms_norm_backward(gy, srcc, w, want_rstd, gh, w is not None)
            want_db = None
        assert_normwise_close(dx, want_dx, dtype, what + " grad_x", scale=8)
        if w is not None:
            assert_normwise_close(dw, want_dw, dtype, what + " grad_weight", scale=rows ** 0.5 * 8)
        if b is not None:
            assert_normwise_close(db, want_db, dtype, what + " grad_bias", scale=rows ** 0.5 * 8)


def test_norms_against_float64_and_every_thread_order(emu_any_order):
    """Independent of the CPU op: float64 F.rms_norm / F.layer_norm and their autograd."""
    for rows, cols in ((9, 96), (4, 2048)):
        x, _, w, b = _norm_inputs(rows, cols, torch.float32, seed=cols, strided=False)
        for center in (False, True):
            y, _, mean, rstd = emu_any_order.norm_forward(x, w, b if center else None, 1e-6, center)
            xd = x.double().requires_grad_()
            wd = w.double().requires_grad_()
            bd = b.double().requires_grad_()
            ref = (F.layer_norm(xd, (cols,), wd, bd, 1e-6) if center else F.rms_norm(xd, (cols,), wd, 1e-6))
            assert_normwise_close(y, ref.detach(), torch.float32, f"forward center={center}", scale=2)
            gy = activation((rows, cols), torch.float32, seed=3)
            ref.backward(gy.double())
            dx, dw, db = emu_any_order.norm_backward(gy, x, w, mean, rstd, None, center, True, center)
            assert_normwise_close(dx, xd.grad, torch.float32, f"grad_x center={center}", scale=8)
            assert_normwise_close(dw, wd.grad, torch.float32, f"grad_weight center={center}", scale=8 * rows ** 0.5)
            if center:
                assert_normwise_close(db, bd.grad, torch.float32, "grad_bias", scale=8 * rows ** 0.5)


# ---- WTA-CRS -------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", [(1, 5), (37, 100), (300, 64)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_wtacrs_row_norms_match_cpu(emu, shape, dtype):
    m, d = shape
    x = activation((m, d + 3), dtype, seed=m)[:, :d]
    got = emu.row_norms(x)
    assert_normwise_close(got, torch.ops.layerpress.wtacrs_row_norms(x.contiguous()), torch.float32, "norms", 4)
    assert_normwise_close(got, x.double().norm(dim=1), torch.float32, "norms vs float64", 4)


def _selection_inputs(norms: torch.Tensor, k: int):
    """What the launchers hand the draw (cpp/ops/wtacrs_launch.h sort_for_selection): the weights in
    descending order, their prefix sums, the order, and the winner count c minimising
    (total - cum_before[c]) / (k - c)."""
    w = norms.double()
    sorted_w, order = torch.sort(w, stable=True, descending=True)
    cum = torch.cumsum(sorted_w, 0)
    before = torch.cat([torch.zeros(1, dtype=torch.float64), cum[: k - 1]])
    count = torch.arange(k, 0, -1, dtype=torch.float64)
    c = int(torch.argmin((cum[-1] - before).clamp_min(0) / count))
    return sorted_w.contiguous(), cum.contiguous(), order.contiguous(), c


@pytest.mark.parametrize("case", [(50, 10, "randn"), (300, 90, "randn"), (64, 63, "spiky"), (40, 12, "zeros")])
def test_wtacrs_select_is_the_cpu_draw(emu, case):
    m, k, kind = case
    g = torch.Generator().manual_seed(m + k)
    norms = torch.rand(m, generator=g) + 0.1
    if kind == "spiky":
        norms[::7] *= 100
    if kind == "zeros":
        norms[m // 2:] = 0
    for seed in (0, 12345):
        want_idx, want_scale = torch.ops.layerpress.wtacrs_select(norms, k, seed)
        sorted_w, cum, order, c = _selection_inputs(norms, k)
        idx, scale = emu.select(sorted_w, cum, order, k, c, seed)
        assert torch.equal(idx, want_idx), f"{case} seed {seed}: idx"
        assert_same_bits(scale, want_scale, f"{case} seed {seed}: scales")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_wtacrs_gather_scale_matches_cpu(emu, dtype):
    x = activation((70, 45), dtype, seed=1)[:, :40]
    idx = torch.tensor([3, 0, 69, 3, 12, 40, 7], dtype=torch.int64)
    scales = torch.linspace(0.5, 3.0, idx.numel())
    lp = torch.ops.layerpress
    assert_same_bits(emu.gather_scale(x, idx, scales), lp.wtacrs_gather_scale(x.contiguous(), idx, scales), "scaled")
    assert_same_bits(emu.gather_scale(x, idx), lp.wtacrs_gather_scale(x.contiguous(), idx), "plain")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", [(20, 5, 7, 3), (100, 70, 130, 33), (64, 64, 64, 16)],
                         ids=lambda s: "M{}-N{}-D{}-k{}".format(*s))
def test_wtacrs_wgrad_matches_cpu(emu_any_order, shape, dtype):
    m, n, d, k = shape
    grad = activation((m, n + 2), dtype, seed=n)[:, :n]
    idx = torch.randint(0, m, (k,), generator=torch.Generator().manual_seed(k))
    scales = torch.rand(k, generator=torch.Generator().manual_seed(d)) + 0.5
    rows = activation((k, d), dtype, seed=d)
    got = emu_any_order.wgrad(grad, rows, idx, scales)
    want = torch.ops.layerpress.wtacrs_wgrad(grad.contiguous(), rows, idx, scales)
    ref = (grad.double()[idx] * scales.double()[:, None]).t() @ rows.double()
    assert_normwise_close(got, want, dtype, "wgrad vs CPU op", scale=4 * k ** 0.5)
    assert_normwise_close(got, ref, dtype, "wgrad vs float64", scale=4 * k ** 0.5)


# ---- the tests catch broken kernels ----------------------------------------------------------------

MUTATIONS = {
    # a wrong lane in the butterfly reduction of the forward GEMM
    "gemm-shuffle-lane": ("gemm_cuda.cu", "v += __shfl_xor_sync(0xffffffffu, v, off);",
                          "v += __shfl_xor_sync(0xffffffffu, v, off == 1 ? 2 : off);"),
    # the transposed GEMM's barrier between writing and summing the partial sums removed
    "gemm_t-missing-barrier": ("gemm_cuda.cu", "    __syncthreads();\n    if (warp == 0) {", "    if (warp == 0) {"),
    # the norms' block reduction reads one warp too few
    "norm-block-reduction": ("norm_cuda.cu", "A t = lane < static_cast<int>(blockDim.x >> 5) ? red[lane] : A(0);",
                             "A t = lane + 1 < static_cast<int>(blockDim.x >> 5) ? red[lane] : A(0);"),
}


def test_broken_kernels_fail(tmp_path_factory):
    """Copies of cuda/kernels with one deliberate bug each (a wrong shuffle lane, a missing barrier,
    a short reduction) are built into their own emulator library; the comparisons above must fail
    on every one of them."""
    kernels = tmp_path_factory.mktemp("broken") / "kernels"
    shutil.copytree(ROOT / "cuda" / "kernels", kernels)
    for name, (file, old, new) in MUTATIONS.items():
        text = (kernels / file).read_text()
        assert text.count(old) == 1, f"mutation {name}: the kernel source changed; update MUTATIONS"
        (kernels / file).write_text(text.replace(old, new))
    broken = Emulator(build(kernels.parent / "build", kernel_dir=kernels))
    spec = LARGE_M_SPECS[0]

    with pytest.raises(AssertionError, match="out of tolerance"):
        _check_gemm(broken, spec, torch.float32, 7, seed=1, transposed=False)

    caught = []
    for schedule in SCHEDULES:
        broken.configure(schedule=schedule, seed=5)
        try:
            _check_gemm(broken, spec, torch.float32, 40, seed=2, transposed=True)
        except AssertionError:
            caught.append(schedule)
    assert caught, "the missing barrier in gemm_t went unnoticed under every thread order"

    x, _, w, _ = _norm_inputs(3, 4096, torch.float32, seed=1, strided=False)
    y = broken.norm_forward(x, w, None, 1e-6, False)[0]
    with pytest.raises(AssertionError, match="max error"):
        assert_normwise_close(y, torch.ops.layerpress.rms_norm(x, w, 1e-6)[0], torch.float32, "broken norm", 2)
