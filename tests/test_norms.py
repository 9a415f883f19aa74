"""Fused RMSNorm / LayerNorm ops and modules (torch.ops.layerpress.{rms_norm, add_rms_norm,
layer_norm, add_layer_norm, *_backward}; layerpress.nn.FusedRMSNorm / FusedLayerNorm).

References are plain PyTorch in float64 computed from the same (already rounded) inputs.

Tolerance rule (forward outputs, per element): |y − ref| ≤ TOL[dtype] · (1 + |ref|), with
TOL = 1e-12 (float64), 1e-5 (float32), 2⁻⁷ (bfloat16: one output rounding, half an ulp, plus
fp32 accumulation), 2⁻¹⁰ (float16). h (the fused residual sum) is one rounding of x + residual,
and must be bit-exact against (x.double() + residual.double()).to(dtype). Gradients are compared
relative to the reference's largest magnitude: |g − ref| ≤ GTOL[dtype] · max|ref|, with
GTOL = 1e-10, 1e-4, 3e-2, 4e-3; float64 gradients are also checked by torch.autograd.gradcheck.
Module outputs against torch.nn / HF norms (which round intermediates differently in low
precision) use the forward rule with twice the tolerance.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings, strategies as st
from torch.library import opcheck

import layerpress
from layerpress import norm_ops
from layerpress.nn import FusedLayerNorm, FusedRMSNorm
from layerpress.norms import fused_norm_from
from lp_testutils import TypedOps

_ops = torch.ops.layerpress
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}
GTOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 4e-3}
KINDS = ("rms", "layer", "add_rms", "add_layer")
VARIANTS = ("generic", "avx512")
# the variant fixture only sets an environment variable, identical for every generated example
FIXTURE_OK = settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(params=VARIANTS)
def variant(request, monkeypatch):
    """Each CPU norm kernel variant (AVX-512 is skipped where the CPU lacks it)."""
    if request.param == "avx512" and "avx512f" not in layerpress.build_info()["cpu_features"]:
        pytest.skip("no AVX-512 on this CPU")
    monkeypatch.setenv("LAYERPRESS_CPU_NORM_KERNEL", request.param)
    return request.param


# ---- references (float64) ------------------------------------------------------------------------

def ref_norm(kind, x, r, w, b, eps):
    """Returns (y, h) in float64; h is None for the non-fused kinds."""
    dt = x.dtype
    h = None
    v = x.double()
    if kind.startswith("add_"):
        h = (x.double() + r.double()).to(dt).double() if dt != torch.float64 else x + r
        v = h
    if kind.endswith("rms"):
        y = v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps)
    else:
        mu = v.mean(-1, keepdim=True)
        y = (v - mu) * torch.rsqrt((v - mu).pow(2).mean(-1, keepdim=True) + eps)
    if w is not None:
        y = y * w.double()
    if b is not None and not kind.endswith("rms"):
        y = y + b.double()
    return y, h


def call(kind, x, r, w, b, eps):
    if kind == "rms":
        return norm_ops.rms_norm(x, w, eps), None
    if kind == "layer":
        return norm_ops.layer_norm(x, w, b, eps), None
    if kind == "add_rms":
        return norm_ops.add_rms_norm(x, r, w, eps)
    return norm_ops.add_layer_norm(x, r, w, b, eps)


def ref_call(kind, x, r, w, b, eps):
    """Differentiable float64 reference with the op's outputs (y, or (y, h))."""
    h = x + r if kind.startswith("add_") else x
    if kind.endswith("rms"):
        y = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        y = y * w if w is not None else y
    else:
        y = F.layer_norm(h, (h.shape[-1],), w, b, eps)
    return (y, h) if kind.startswith("add_") else (y, None)


def assert_fwd_close(y, ref, dtype, factor=1.0):
    assert y.dtype == dtype
    err = (y.double() - ref).abs()
    bound = factor * TOL[dtype] * (1 + ref.abs())
    assert bool((err <= bound).all()), f"max err {err.max().item():.3g}, worst ratio " \
        f"{(err / bound).max().item():.3g}"


def assert_grad_close(g, ref, dtype):
    scale = ref.abs().max().item() + 1e-30
    err = (g.double() - ref).abs().max().item()
    assert err <= GTOL[dtype] * scale, f"max err {err:.3g} vs scale {scale:.3g}"


def make_inputs(kind, lead, hidden, dtype, weight, bias, noncontig, seed):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, offset=0.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + offset).to(dtype)

    if noncontig:
        # a column slice of a wider tensor (row stride != hidden) and, with >1 leading dim, a
        # transposed pair of leading dims (not mergeable -> copied by the launcher)
        x = rnd(*lead, hidden + 7, scale=2.0, offset=0.5)[..., 3:3 + hidden]
        if len(lead) >= 2:
            x = x.transpose(0, 1).contiguous().transpose(0, 1)
    else:
        x = rnd(*lead, hidden, scale=2.0, offset=0.5)
    r = rnd(*lead, hidden) if kind.startswith("add_") else None
    w = rnd(hidden, scale=0.5, offset=1.0) if weight else None
    b = rnd(hidden, scale=0.5) if (bias and not kind.endswith("rms")) else None
    return x, r, w, b


# ---- forward, many shapes and dtypes ---------------------------------------------------------------

@FIXTURE_OK
@given(kind=st.sampled_from(KINDS), dtype=st.sampled_from(DTYPES),
       lead=st.lists(st.integers(1, 5), min_size=0, max_size=3),
       hidden=st.sampled_from([1, 7, 64, 100, 128, 255, 1000, 1024, 4096]),
       weight=st.booleans(), bias=st.booleans(), noncontig=st.booleans(),
       eps=st.sampled_from([1e-6, 1e-5, 0.1]), seed=st.integers(0, 2 ** 16))
def test_forward_matches_reference(variant, kind, dtype, lead, hidden, weight, bias, noncontig, eps, seed):
    x, r, w, b = make_inputs(kind, lead, hidden, dtype, weight, bias, noncontig, seed)
    y, h = call(kind, x, r, w, b, eps)
    y_ref, h_ref = ref_norm(kind, x, r, w, b, eps)
    assert y.shape == x.shape and y.is_contiguous()
    assert_fwd_close(y, y_ref, dtype)
    if h_ref is not None:
        assert h.dtype == dtype and torch.equal(h.double(), h_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hidden", [65536 + 37])  # vector body + a masked tail
def test_large_hidden(variant, dtype, hidden):
    for kind in KINDS:
        x, r, w, b = make_inputs(kind, [3], hidden, dtype, True, True, False, seed=hidden)
        y, _ = call(kind, x, r, w, b, 1e-6)
        assert_fwd_close(y, ref_norm(kind, x, r, w, b, 1e-6)[0], dtype)


def test_stats_outputs():
    x = torch.randn(4, 3, 96, dtype=torch.float64)
    y, mean, rstd = _ops.layer_norm(x, None, None, 1e-5)
    assert mean.shape == rstd.shape == (4, 3) and mean.dtype == torch.float64
    torch.testing.assert_close(mean, x.mean(-1))
    torch.testing.assert_close(rstd, torch.rsqrt(x.var(-1, unbiased=False) + 1e-5))
    _, rstd32 = _ops.rms_norm(x.float(), None, 1e-5)
    assert rstd32.dtype == torch.float32
    torch.testing.assert_close(rstd32.double(), torch.rsqrt(x.float().double().pow(2).mean(-1) + 1e-5))


def test_streaming_store_path_matches(variant, monkeypatch):
    # outputs of at least LAYERPRESS_NORM_STREAM_BYTES (64 MB by default) with 64-byte aligned
    # rows use non-temporal stores in the AVX-512 kernel; force that path on small tensors
    monkeypatch.setenv("LAYERPRESS_NORM_STREAM_BYTES", "0")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for kind in KINDS:
            x, r, w, b = make_inputs(kind, [37], 256, dtype, True, True, False, seed=5)
            y, h = call(kind, x, r, w, b, 1e-6)
            y_ref, h_ref = ref_norm(kind, x, r, w, b, 1e-6)
            assert_fwd_close(y, y_ref, dtype)
            if h_ref is not None:
                assert torch.equal(h.double(), h_ref)


# ---- backward ------------------------------------------------------------------------------------

@FIXTURE_OK
@given(kind=st.sampled_from(KINDS), dtype=st.sampled_from(DTYPES),
       lead=st.lists(st.integers(1, 40), min_size=1, max_size=2),
       hidden=st.sampled_from([16, 64, 100, 256, 1000]),  # tiny rows: gradients cancel to ~0
       weight=st.booleans(), bias=st.booleans(), noncontig=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_backward_matches_reference(variant, kind, dtype, lead, hidden, weight, bias, noncontig, seed):
    x, r, w, b = make_inputs(kind, lead, hidden, dtype, weight, bias, noncontig, seed)
    leaves = [t for t in (x, r, w, b) if t is not None]
    for t in leaves:
        t.requires_grad_(True)
    y, h = call(kind, x, r, w, b, 1e-5)
    gen = torch.Generator().manual_seed(seed + 1)
    gy = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(dtype)
    gh = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(dtype) if h is not None else None
    outs, grads_in = [y], [gy]
    if h is not None:
        outs.append(h)
        grads_in.append(gh)
    got = torch.autograd.grad(outs, leaves, grads_in)

    leaves64 = [t.detach().double().requires_grad_(True) for t in leaves]
    it = iter(leaves64)
    x64 = next(it)
    r64 = next(it) if r is not None else None
    w64 = next(it) if w is not None else None
    b64 = next(it) if b is not None else None
    y64, h64 = ref_call(kind, x64, r64, w64, b64, 1e-5)
    outs64, gin64 = [y64], [gy.double()]
    if h64 is not None:
        outs64.append(h64)
        gin64.append(gh.double())
    want = torch.autograd.grad(outs64, leaves64, gin64)
    for g_, w_ in zip(got, want):
        assert g_.dtype == dtype and g_.shape == w_.shape
        assert_grad_close(g_, w_, dtype)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("affine", ["none", "weight", "weight+bias"])
def test_gradcheck_float64(kind, affine):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 20, generator=g, dtype=torch.float64, requires_grad=True)
    r = torch.randn(3, 4, 20, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(20, generator=g, dtype=torch.float64, requires_grad=True) if affine != "none" else None
    b = torch.randn(20, generator=g, dtype=torch.float64, requires_grad=True) if affine == "weight+bias" else None
    if kind.endswith("rms"):
        b = None
    args = [t for t in (x, r if kind.startswith("add_") else None, w, b) if t is not None]

    def fn(*a):
        it = iter(a)
        xx = next(it)
        rr = next(it) if kind.startswith("add_") else None
        ww = next(it) if w is not None else None
        bb = next(it) if b is not None else None
        y, h = call(kind, xx, rr, ww, bb, 1e-5)
        return (y, h) if h is not None else y

    assert torch.autograd.gradcheck(fn, args)


def test_large_hidden_backward(variant):
    x = torch.randn(5, 65536 + 3, dtype=torch.float32, requires_grad=True)
    w = torch.randn(65536 + 3, requires_grad=True)
    b = torch.randn(65536 + 3, requires_grad=True)
    gy = torch.randn(5, 65536 + 3)
    got = torch.autograd.grad(norm_ops.layer_norm(x, w, b, 1e-5), (x, w, b), gy)
    x64, w64, b64 = (t.detach().double().requires_grad_(True) for t in (x, w, b))
    want = torch.autograd.grad(F.layer_norm(x64, (x.shape[-1],), w64, b64, 1e-5), (x64, w64, b64), gy.double())
    for g_, w_ in zip(got, want):
        assert_grad_close(g_, w_, torch.float32)


# ---- opcheck ---------------------------------------------------------------------------------------

def _opcheck_cases():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 40, generator=g)
    r = torch.randn(2, 3, 40, generator=g)
    w = torch.randn(40, generator=g)
    b = torch.randn(40, generator=g)
    gy = torch.randn(2, 3, 40, generator=g)
    _, mean, rstd = _ops.layer_norm(x, w, b, 1e-5)
    _, rrstd = _ops.rms_norm(x, w, 1e-5)
    xg, rg, wg, bg = (t.clone().requires_grad_(True) for t in (x, r, w, b))
    return [
        ("rms_norm", (xg, wg, 1e-5)),
        ("rms_norm", (x.to(torch.bfloat16), None, 1e-6)),
        ("add_rms_norm", (xg, rg, wg, 1e-5)),
        ("layer_norm", (xg, wg, bg, 1e-5)),
        ("layer_norm", (x.double(), None, None, 1e-5)),
        ("add_layer_norm", (xg, rg, wg, bg, 1e-5)),
        ("rms_norm_backward", (gy, x, w, rrstd, None, True)),
        ("rms_norm_backward", (gy, x, None, rrstd, r, False)),
        ("layer_norm_backward", (gy, x, w, mean, rstd, None, True, True)),
        ("layer_norm_backward", (gy, x, w, mean, rstd, r, False, True)),
    ]


@pytest.mark.parametrize("i", range(10))
def test_opcheck(i):
    name, args = _opcheck_cases()[i]
    opcheck(getattr(_ops, name).default, args)


# ---- bad input -------------------------------------------------------------------------------------

def test_errors():
    x = torch.randn(4, 64)
    with pytest.raises(ValueError, match="weight must have shape \\[64\\]"):
        norm_ops.rms_norm(x, torch.ones(32))
    with pytest.raises(ValueError, match="bias must have shape"):
        norm_ops.layer_norm(x, torch.ones(64), torch.ones(2, 64))
    with pytest.raises(TypeError, match="weight must have the dtype of x"):
        norm_ops.rms_norm(x, torch.ones(64, dtype=torch.float16))
    with pytest.raises(TypeError, match="x must be float32, bfloat16, float16 or float64"):
        norm_ops.layer_norm(torch.ones(4, 64, dtype=torch.int32))
    with pytest.raises(ValueError, match="x must not be empty"):
        norm_ops.rms_norm(torch.empty(0, 64))
    with pytest.raises(ValueError, match="x must not be empty"):
        norm_ops.layer_norm(torch.empty(4, 0))
    with pytest.raises(ValueError, match="eps must be a positive"):
        norm_ops.rms_norm(x, None, 0.0)
    with pytest.raises(ValueError, match="eps must be a positive"):
        norm_ops.layer_norm(x, None, None, -1e-5)
    with pytest.raises(ValueError, match="residual must have the shape of x"):
        norm_ops.add_rms_norm(x, torch.randn(4, 32))
    with pytest.raises(TypeError, match="residual must have the dtype of x"):
        norm_ops.add_layer_norm(x, torch.randn(4, 64, dtype=torch.float64))
    with pytest.raises(ValueError, match="rstd must have shape"):
        TypedOps().rms_norm_backward(x, x, None, torch.ones(3), None, False)
    with pytest.raises(ValueError, match="weight_grad=True needs a weight"):
        TypedOps().rms_norm_backward(x, x, None, torch.ones(4), None, True)


@pytest.mark.gpu
def test_errors_device():
    x = torch.randn(4, 64, device="cuda")
    with pytest.raises(ValueError, match="weight is on"):
        norm_ops.rms_norm(x, torch.ones(64))


# ---- modules ----------------------------------------------------------------------------------------

def _hf_rms_classes():
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm
    del transformers
    return [LlamaRMSNorm, Qwen2RMSNorm]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_rmsnorm_matches_torch(dtype):
    g = torch.Generator().manual_seed(1)
    for eps in (None, 1e-6):
        ref = torch.nn.RMSNorm(256, eps=eps, dtype=dtype)
        with torch.no_grad():
            ref.weight.copy_(torch.randn(256, generator=g))
        m = FusedRMSNorm(256, eps=eps, dtype=dtype)
        m.load_state_dict(ref.state_dict())
        x = torch.randn(3, 5, 256, generator=g).to(dtype)
        with torch.no_grad():
            assert_fwd_close(m(x), ref.double()(x.double()), dtype, factor=2.0)
    # multi-dimensional normalized_shape, no affine
    ref = torch.nn.RMSNorm((4, 32), elementwise_affine=False)
    m = FusedRMSNorm((4, 32), elementwise_affine=False)
    x = torch.randn(6, 4, 32, generator=g)
    assert_fwd_close(m(x), ref(x.double()), torch.float32, 2.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rmsnorm_matches_hf(dtype):
    g = torch.Generator().manual_seed(2)
    for cls in _hf_rms_classes():
        ref = cls(128, eps=1e-6)
        with torch.no_grad():
            ref.weight.copy_(torch.randn(128, generator=g))
        ref = ref.to(dtype)
        m = FusedRMSNorm(128, eps=1e-6, dtype=dtype)
        m.load_state_dict(ref.state_dict())
        assert m.variance_epsilon == 1e-6
        x = torch.randn(2, 7, 128, generator=g).to(dtype)
        with torch.no_grad():
            want = ref.double()(x.double())
            assert_fwd_close(m(x), want, dtype, 2.0)
            assert_fwd_close(FusedRMSNorm.from_module(ref.to(dtype))(x), want, dtype, 2.0)
            # HF's own low-precision output is within the same rule of the float64 result
            assert_fwd_close(ref.to(dtype)(x).to(dtype), want, dtype, 2.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_fused_layernorm_matches_torch(dtype, bias):
    g = torch.Generator().manual_seed(3)
    ref = torch.nn.LayerNorm(192, eps=1e-5, bias=bias)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(192, generator=g))
        if bias:
            ref.bias.copy_(torch.randn(192, generator=g))
    m = FusedLayerNorm(192, bias=bias, dtype=dtype)
    m.load_state_dict(ref.to(dtype).state_dict())
    x = torch.randn(4, 9, 192, generator=g).to(dtype)
    with torch.no_grad():
        want = ref.double()(x.double())
        assert_fwd_close(m(x), want, dtype, 2.0)
        assert_fwd_close(FusedLayerNorm.from_module(ref.to(dtype))(x), want, dtype, 2.0)
    m2 = FusedLayerNorm(192, elementwise_affine=False)
    assert not list(m2.parameters())
    x = torch.randn(3, 192, generator=g)
    assert_fwd_close(m2(x), F.layer_norm(x.double(), (192,)), torch.float32, 2.0)


def test_module_residual_and_grads():
    g = torch.Generator().manual_seed(4)
    ref = torch.nn.LayerNorm(64)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(64, generator=g))
        ref.bias.copy_(torch.randn(64, generator=g))
    m = FusedLayerNorm.from_module(ref)
    x = torch.randn(5, 64, generator=g, requires_grad=True)
    r = torch.randn(5, 64, generator=g, requires_grad=True)
    y, h = m(x, r)
    (y.square().sum() + h.sum()).backward()
    x2, r2 = x.detach().clone().requires_grad_(True), r.detach().clone().requires_grad_(True)
    h2 = x2 + r2
    (ref(h2).square().sum() + h2.sum()).backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(r.grad, r2.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(m.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(m.bias.grad, ref.bias.grad, rtol=1e-4, atol=1e-4)


def test_fused_norm_from_and_types():
    assert isinstance(fused_norm_from(torch.nn.LayerNorm(8)), FusedLayerNorm)
    assert isinstance(fused_norm_from(torch.nn.RMSNorm(8)), FusedRMSNorm)
    assert fused_norm_from(torch.nn.Linear(8, 8)) is None
    with pytest.raises(TypeError):
        FusedLayerNorm.from_module(torch.nn.RMSNorm(8))
    assert layerpress.FusedRMSNorm is FusedRMSNorm and layerpress.nn.FusedLayerNorm is FusedLayerNorm


def test_torch_compile_traces_modules():
    torch._dynamo.reset()
    rms = FusedRMSNorm(64, eps=1e-6)
    ln = FusedLayerNorm(64)

    def f(x, r):
        y, h = rms(x, r)
        return ln(y) + h

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 64, requires_grad=True)
    r = torch.randn(3, 64)
    out = cf(x, r)
    torch.testing.assert_close(out, f(x, r))
    out.sum().backward()
    assert x.grad is not None


# ---- CUDA (skipped without a GPU; the CUDA kernels are compile-checked only on CPU machines) -------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 1000, 4096, 65536 + 8])
def test_cuda_matches_reference(dtype, hidden):
    for kind in KINDS:
        for noncontig in (False, True):
            x, r, w, b = make_inputs(kind, [3, 5], hidden, dtype, True, True, noncontig, seed=hidden)
            x, r, w, b = (t.cuda() if t is not None else None for t in (x, r, w, b))
            leaves = [t.requires_grad_(True) for t in (x, r, w, b) if t is not None]
            y, h = call(kind, x, r, w, b, 1e-5)
            y_ref, h_ref = ref_norm(kind, x.detach().cpu(), None if r is None else r.detach().cpu(),
                                    None if w is None else w.detach().cpu(),
                                    None if b is None else b.detach().cpu(), 1e-5)
            assert_fwd_close(y.detach().cpu(), y_ref, dtype)
            if h_ref is not None:
                assert torch.equal(h.detach().cpu().double(), h_ref)
            gy = torch.randn_like(y)
            got = torch.autograd.grad([y], leaves, [gy])
            cpu_leaves = [t.detach().cpu().requires_grad_(True) for t in leaves]
            it = iter(cpu_leaves)
            xc = next(it)
            rc = next(it) if r is not None else None
            wc = next(it) if w is not None else None
            bc = next(it) if b is not None else None
            yc, _ = call(kind, xc, rc, wc, bc, 1e-5)
            want = torch.autograd.grad([yc], cpu_leaves, [gy.cpu()])
            for g_, w_ in zip(got, want):
                assert_grad_close(g_.cpu(), w_.double(), dtype)


def test_large_cpu_outputs_reuse_freed_memory_without_aliasing():
    """Outputs of >= 8 MB come from a cache of freed blocks (cpp/ops/cpu_output_cache.h): a live
    output is never handed out again, a freed one is reused, and results stay exact."""
    import layerpress
    torch.manual_seed(0)
    x1, x2, x3 = (torch.randn(1024, 4096) for _ in range(3))  # 16 MB outputs
    w = torch.randn(4096)
    ref = [torch.nn.functional.rms_norm(x, (4096,), w, 1e-6) for x in (x1, x2, x3)]
    y1, _ = torch.ops.layerpress.rms_norm(x1, w, 1e-6)
    y2, _ = torch.ops.layerpress.rms_norm(x2, w, 1e-6)
    assert y1.data_ptr() != y2.data_ptr()
    held = torch.ops.layerpress.cpu_output_cache_held_bytes()
    p1 = y1.data_ptr()
    del y1
    assert torch.ops.layerpress.cpu_output_cache_held_bytes() >= held + x1.numel() * 4
    y3, _ = torch.ops.layerpress.rms_norm(x3, w, 1e-6)
    assert y3.data_ptr() == p1  # the freed block, not the live one
    torch.testing.assert_close(y2, ref[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y3, ref[2], rtol=1e-5, atol=1e-5)
    # an output that outlives many later calls keeps its values
    keep = y2.clone()
    for _ in range(3):
        torch.ops.layerpress.rms_norm(x1, w, 1e-6)
    assert torch.equal(y2, keep)
