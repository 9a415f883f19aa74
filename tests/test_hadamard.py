"""torch.ops.layerpress.hadamard (the randomised block Walsh–Hadamard transform) and the GEMM's
input rotation (gemm/gemm_t rot_signs, rot_block) on the CPU, every kernel variant forced.

Reference: the dense float64 matrix R = diag(s) · blockdiag(H_B) / sqrt(B), H_B built here by the
Sylvester recursion, applied to the same (already rounded) input.
Tolerance (per element): |y − ref| ≤ 2·log2(B)·u_acc·‖x_block‖₂ + eps(out)·|ref| — each of the
log2(B) butterfly stages rounds once in the accumulation type (u_acc = 2⁻²⁴ for fp32/bf16/fp16,
2⁻⁵³ for fp64) and no partial sum exceeds the block's ℓ1 norm / sqrt(B) ≤ ‖x_block‖₂; the last term
is the output rounding. A wrong sign, butterfly partner or stage breaks this by O(|x|).
"""
from __future__ import annotations

import functools
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from torch.library import opcheck

import layerpress
from layerpress import QuantSpec, ops
from layerpress.ops.rotation import hadamard, random_signs
from cuda_testutils import assert_same_bits
from lp_testutils import TypedOps, quantized, raw_error_contract

pytestmark = pytest.mark.usefixtures("torch_single_thread")

_ops = torch.ops.layerpress
typed = TypedOps()
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
FEATURES = layerpress.build_info()["cpu_features"]
VARIANTS = ["generic"] + (["avx2"] if "avx2" in FEATURES else []) + (["avx512"] if "avx512f" in FEATURES else [])
FIXTURE_OK = settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(params=VARIANTS)
def variant(request, monkeypatch):
    """Each CPU hadamard kernel variant this CPU runs (forced through the environment)."""
    monkeypatch.setenv("LAYERPRESS_CPU_HADAMARD_KERNEL", request.param)
    return request.param


def sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def dense_rotation(k: int, block: int, signs) -> torch.Tensor:
    r = torch.block_diag(*[sylvester(block) / math.sqrt(block)] * (k // block))
    if signs is not None:
        r = signs.double()[:, None] * r
    return r


@functools.lru_cache(maxsize=None)
def normalised_sylvester(block: int) -> torch.Tensor:
    return sylvester(block) / math.sqrt(block)


def reference(x, block, signs, transpose=False):
    """x·R (or x·Rᵀ) in float64, block by block with the dense H_B (R's blocks)."""
    x64 = x.double()
    s = torch.ones(x.shape[-1], dtype=torch.float64) if signs is None else signs.double()
    if not transpose:
        x64 = x64 * s
    y = (x64.reshape(*x.shape[:-1], x.shape[-1] // block, block) @ normalised_sylvester(block)).reshape(x.shape)
    return y * s if transpose else y


def test_blockwise_reference_is_the_dense_matrix():
    x = torch.randn(3, 96, dtype=torch.float64)
    s = random_signs(96, 1)
    r = dense_rotation(96, 32, s)
    assert torch.allclose(reference(x, 32, s), x @ r, rtol=0, atol=1e-13)
    assert torch.allclose(reference(x, 32, s, True), x @ r.t(), rtol=0, atol=1e-13)
    assert torch.allclose(r @ r.t(), torch.eye(96, dtype=torch.float64), atol=1e-13)


def tolerance(x, ref, block, out_dtype):
    u = 2.0 ** -53 if out_dtype == torch.float64 else 2.0 ** -24
    xb = x.double().reshape(*x.shape[:-1], x.shape[-1] // block, block)
    norm = xb.norm(dim=-1, keepdim=True).expand_as(xb).reshape(x.shape)
    return 2 * math.log2(block) * u * norm + torch.finfo(out_dtype).eps * ref.abs() + 1e-300


def check(y, x, block, signs, transpose=False, what=""):
    ref = reference(x, block, signs, transpose)
    assert y.dtype == x.dtype and y.shape == x.shape, what
    err = (y.double() - ref).abs()
    tol = tolerance(x, ref, block, x.dtype)
    assert bool((err <= tol).all()), f"{what}: worst err/tol {(err / tol).max().item():.2f}"


CASES = [(16, 16), (32, 16), (48, 16), (64, 64), (128, 32), (256, 256), (384, 128), (512, 512),
         (1024, 1024), (2048, 256), (4096, 4096)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k,block", CASES, ids=[f"k{k}-b{b}" for k, b in CASES])
def test_matches_dense(variant, dtype, k, block):
    g = torch.Generator().manual_seed(k + block)
    x = torch.randn(5, k, generator=g, dtype=torch.float64).to(dtype)
    s = random_signs(k, seed=block)
    for transpose in (False, True):
        check(hadamard(x, block, s, transpose), x, block, s, transpose, f"{variant} {dtype} T={transpose}")
    check(hadamard(x, block), x, block, None, False, f"{variant} {dtype} no signs")


@FIXTURE_OK
@given(lead=st.lists(st.integers(0, 4), min_size=0, max_size=2), log_block=st.integers(4, 9),
       nblocks=st.integers(1, 4), dtype=st.sampled_from(DTYPES), transpose=st.booleans(),
       strided=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_hypothesis_shapes(variant, lead, log_block, nblocks, dtype, transpose, strided, seed):
    block = 2 ** log_block
    k = block * nblocks
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, k + (8 if strided else 0), generator=g, dtype=torch.float64).to(dtype) * 3
    if strided:  # rows with a row stride larger than k
        x = x[..., 8:]
    s = (torch.rand(k, generator=g) * 4 - 2) if seed % 3 == 0 else random_signs(k, seed)  # any diagonal works
    check(hadamard(x, block, s, transpose), x, block, s, transpose, f"{variant} {dtype}")


def test_transpose_inverts_and_preserves_norm(variant):
    x = torch.randn(7, 768, dtype=torch.float64)
    s = random_signs(768, 3)
    y = hadamard(x, 256, s)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-13, atol=0)
    torch.testing.assert_close(hadamard(y, 256, s, transpose=True), x, rtol=0, atol=1e-13)


def test_variants_agree_and_are_thread_independent(monkeypatch):
    x = torch.randn(300, 1024).bfloat16()
    s = random_signs(1024, 1)
    outs = {}
    for v in VARIANTS:
        monkeypatch.setenv("LAYERPRESS_CPU_HADAMARD_KERNEL", v)
        outs[v] = hadamard(x, 128, s)
        torch.set_num_threads(2)
        try:
            assert torch.equal(hadamard(x, 128, s), outs[v]), v
        finally:
            torch.set_num_threads(1)
    for v in VARIANTS[1:]:  # the SIMD variants run the same stages in another order: within fp32 rounding
        check(outs[v], x, 128, s, what=v)


def test_random_signs_deterministic():
    a, b = random_signs(512, 7), random_signs(512, 7)
    assert torch.equal(a, b) and a.dtype == torch.float32
    assert set(a.tolist()) == {-1.0, 1.0}
    assert not torch.equal(a, random_signs(512, 8))


# ---- autograd, opcheck ------------------------------------------------------------------------------

def test_gradcheck():
    s = random_signs(64, 1).double().float()
    for transpose in (False, True):
        x = torch.randn(3, 64, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda t: hadamard(t, 16, s, transpose), (x,))
        assert torch.autograd.gradgradcheck(lambda t: hadamard(t, 32, s, transpose), (x,))


def test_no_gradient_for_signs():
    x = torch.randn(2, 32, requires_grad=True)
    s = random_signs(32, 0).requires_grad_()
    with pytest.raises(RuntimeError, match="signs"):
        hadamard(x, 16, s).sum().backward()


OPCHECK = [
    ("f32-grad", (torch.randn(3, 64, requires_grad=True), 16, random_signs(64, 0), False)),
    ("f32-transpose", (torch.randn(2, 3, 128), 128, random_signs(128, 1), True)),
    ("bf16-nosigns", (torch.randn(4, 256).bfloat16(), 64, None, False)),
    ("f16-1d", (torch.randn(32).half(), 32, random_signs(32, 2), False)),
    ("f64-grad", (torch.randn(5, 48, dtype=torch.float64, requires_grad=True), 16, random_signs(48, 3), True)),
]


@pytest.mark.parametrize("name,args", OPCHECK, ids=[c[0] for c in OPCHECK])
def test_opcheck(name, args):
    result = opcheck(_ops.hadamard, args)
    assert result and all(v == "SUCCESS" for v in result.values()), result


def test_compile():
    f = torch.compile(lambda t, s: hadamard(t, 32, s) * 2, fullgraph=True, backend="eager")
    x, s = torch.randn(4, 64), random_signs(64, 0)
    torch.testing.assert_close(f(x, s), hadamard(x, 32, s) * 2)


# ---- errors --------------------------------------------------------------------------------------

@pytest.mark.parametrize("block,match", [(8, "block must be a power of two >= 16"),
                                         (48, "block must be a power of two"),
                                         (128, "divides the row length 96"),
                                         (0, "block must be")])
def test_bad_block(block, match):
    with pytest.raises(ValueError, match=match):
        typed.hadamard(torch.randn(2, 96), block)
    raw_error_contract(lambda: _ops.hadamard(torch.randn(2, 96), block), ValueError, match)


def test_bad_arguments():
    x = torch.randn(2, 64)
    with pytest.raises(TypeError, match="signs must be float32"):
        hadamard(x, 16, random_signs(64, 0).double())
    with pytest.raises(ValueError, match=r"signs must have shape \[64\]"):
        hadamard(x, 16, random_signs(32, 0))
    with pytest.raises(TypeError, match="x must be float32, bfloat16, float16 or float64"):
        hadamard(x.int(), 16)
    with pytest.raises(ValueError, match="at least 1 dimension"):
        hadamard(torch.tensor(1.0), 16)


# ---- GEMM with an input rotation ------------------------------------------------------------------

GEMM_SPECS = [(QuantSpec(4, 128, "oc", False, torch.float16), 48, 256, 64),
              (QuantSpec(3, 32, "ic", True, torch.bfloat16), 64, 384, 128),
              (QuantSpec(2, -1, "oc", False, torch.float32), 17, 128, 16)]


@pytest.mark.parametrize("spec,n,k,block", GEMM_SPECS, ids=["w4-oc", "w3-ic", "w2-oc"])
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("m", (1, 5, 40))
def test_rotated_gemm_is_gemm_of_rotated_input(cpu_variant, spec, n, k, block, dtype, m):
    """The rotation is applied to the activation rows, then the unchanged kernel runs: bit-equal to
    gemm(hadamard(x)); gemm_t applies Rᵀ to its output rows: bit-equal to hadamard(gemm_t, T)."""
    _, _, _, _, (nq, ns, nz) = quantized(spec, n, k, seed=m)
    s = random_signs(k, seed=n)
    x = torch.randn(2, m, k).to(dtype)
    bias = torch.randn(n).to(dtype)
    y = ops.gemm(x, nq, ns, nz, bias, spec, n, rot_signs=s, rot_block=block)
    assert torch.equal(y, ops.gemm(hadamard(x, block, s), nq, ns, nz, bias, spec, n))
    g = torch.randn(m, n).to(dtype)
    gt = ops.gemm_t(g, nq, ns, nz, spec, n, rot_signs=s, rot_block=block)
    assert torch.equal(gt, hadamard(ops.gemm_t(g, nq, ns, nz, spec, n), block, s, transpose=True))


def test_rotated_layer_approximates_the_float_layer():
    """Quantising W·R and rotating x gives x·Wᵀ (up to 8-bit error): the direction of R is right."""
    n, k, block = 64, 256, 128
    w = torch.randn(n, k, dtype=torch.float64)
    s = random_signs(k, 5)
    wr = (w @ dense_rotation(k, block, s)).float()
    spec = QuantSpec(8, 32, "oc", False, torch.float32)
    codes, sc, z = ops.quantize(wr, spec)
    nq, ns, nz = ops.repack(ops.pack(codes, 8), sc, z, spec)
    x = torch.randn(9, k)
    y = ops.gemm(x, nq, ns, nz, None, spec, n, rot_signs=s, rot_block=block)
    ref = x.double() @ w.t()
    assert (y.double() - ref).norm() / ref.norm() < 1e-2
    unrotated = ops.gemm(x, nq, ns, nz, None, spec, n)
    assert (unrotated.double() - ref).norm() / ref.norm() > 0.5


def test_rotated_gemm_autograd():
    spec, n, k, block = QuantSpec(4, 64, "oc", False, torch.float16), 32, 128, 64
    _, _, _, _, (nq, ns, nz) = quantized(spec, n, k)
    s = random_signs(k, 1)
    x = torch.randn(3, k, requires_grad=True)
    y = ops.gemm(x, nq, ns, nz, None, spec, n, rot_signs=s, rot_block=block)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    assert torch.equal(gx, ops.gemm_t(g, nq, ns, nz, spec, n, rot_signs=s, rot_block=block))
    cases = [(x, nq, ns, nz, None, 4, 64, 0, 1, n, s, block),
             (torch.randn(2, 2, k).bfloat16(), nq, ns, nz, None, 4, 64, 0, 1, n, None, block)]
    for args in cases:
        result = opcheck(_ops.gemm, args)
        assert all(v == "SUCCESS" for v in result.values()), result
    result = opcheck(_ops.gemm_t, (torch.randn(3, n, requires_grad=True), nq, ns, nz, 4, 64, 0, 1, n, s, block))
    assert all(v == "SUCCESS" for v in result.values()), result


def test_rotated_gemm_errors():
    spec, n, k = QuantSpec(4, 64, "oc", False, torch.float16), 32, 128
    _, _, _, _, (nq, ns, nz) = quantized(spec, n, k)
    x = torch.randn(3, k)
    with pytest.raises(ValueError, match="rot_block must be a power of two >= 16 that divides the row length 128"):
        ops.gemm(x, nq, ns, nz, None, spec, n, rot_block=96)
    with pytest.raises(ValueError, match="rot_signs given but rot_block=0"):
        ops.gemm(x, nq, ns, nz, None, spec, n, rot_signs=random_signs(k, 0))
    with pytest.raises(ValueError, match=r"rot_signs must have shape \[128\]"):
        ops.gemm_t(torch.randn(3, n), nq, ns, nz, spec, n, rot_signs=random_signs(n, 0), rot_block=32)


# ---- CUDA (marked gpu: skipped without a GPU; run by scripts/gpu_check.sh) -----------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k,block", [(48, 16), (384, 128), (2048, 512), (4096, 4096), (16384, 16384)],
                         ids=["k48-b16", "k384-b128", "k2048-b512", "k4096-b4096", "k16384-b16384"])
def test_cuda_matches_cpu_bitwise(monkeypatch, dtype, k, block):
    """The CUDA kernel runs the portable CPU variant's stages in the same order: same bits."""
    monkeypatch.setenv("LAYERPRESS_CPU_HADAMARD_KERNEL", "generic")
    x = torch.randn(33, k + 8).to(dtype)[:, 8:]
    s = random_signs(k, block)
    for transpose in (False, True):
        got = hadamard(x.cuda(), block, s.cuda(), transpose)
        assert got.device.type == "cuda"
        assert_same_bits(got, hadamard(x, block, s, transpose), f"{dtype} T={transpose}")


@pytest.mark.gpu
def test_cuda_rotated_gemm_matches_cpu():
    """On CUDA the rotation is a separate hadamard launch before gemm (after gemm_t): the same as
    the canonical-layout GEMM of the rotated activation, and close to the CPU op."""
    from layerpress import Layout
    spec, n, k, block = QuantSpec(4, 128, "oc", False, torch.float16), 96, 512, 128
    codes, s, z, q, _ = quantized(spec, n, k)
    signs = random_signs(k, 2)
    x = torch.randn(7, k, dtype=torch.float16)
    dev = lambda t: None if t is None else t.cuda()  # noqa: E731
    canon = int(Layout.CANONICAL)
    y = ops.gemm(x.cuda(), dev(q), dev(s), dev(z), None, spec, n, canon, rot_signs=signs.cuda(), rot_block=block)
    y_ref = ops.gemm(hadamard(x.cuda(), block, signs.cuda()), dev(q), dev(s), dev(z), None, spec, n, canon)
    assert torch.equal(y, y_ref)
    g = torch.randn(7, n, dtype=torch.float16)
    gt = ops.gemm_t(g.cuda(), dev(q), dev(s), dev(z), spec, n, canon, rot_signs=signs.cuda(), rot_block=block)
    gt_ref = hadamard(ops.gemm_t(g.cuda(), dev(q), dev(s), dev(z), spec, n, canon), block, signs.cuda(), transpose=True)
    assert torch.equal(gt, gt_ref)
