"""Bad input is rejected with a clear error that names the offending argument (TypeError for a
wrong dtype, ValueError for a wrong value/shape/layout), before any kernel runs.

The op calls go through ``TypedOps`` (the Python API's error types); ``test_raw_op_error_is_tagged``
checks the same cases on the raw ``torch.ops.layerpress`` ops, whose errors carry a type tag."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from layerpress import Layout, QuantLinear, QuantSpec, ops
from lp_testutils import TypedOps, raw_error_contract

L = TypedOps()
CPU = int(Layout.CPU_BITPLANE16)

pytestmark = pytest.mark.usefixtures("torch_single_thread")

N, K = 20, 64
SPEC = QuantSpec(4, 32, "oc", False, torch.float16)
IC_SPEC = QuantSpec(4, 32, "ic", True, torch.float32)


def _valid(spec=SPEC, n=N, k=K):
    w = torch.randn(n, k)
    codes, s, z = ops.quantize(w, spec)
    q = ops.pack(codes, spec.bits)
    nq, ns, nz = ops.repack(q, s, z, spec)
    return w, codes, s, z, q, nq, ns, nz


W, CODES, S, Z, Q, NQ, NS, NZ = _valid()
IW, ICODES, IS, _, IQ, INQ, INS, _ = _valid(IC_SPEC, 64, 96)


def _noncontig(t):
    """Same shape and values, not contiguous."""
    return t.t().contiguous().t() if t.dim() == 2 else t.transpose(-1, -2).contiguous().transpose(-1, -2)


def gemm(x=None, qweight=NQ, scales=NS, zeros=NZ, bias=None, bits=4, group_size=32, axis=0, layout=CPU, n=N):
    x = torch.randn(3, K) if x is None else x
    return L.gemm(x, qweight, scales, zeros, bias, bits, group_size, axis, layout, n)


def gemm_t(grad=None, qweight=NQ, scales=NS, zeros=NZ, bits=4, group_size=32, axis=0, layout=CPU, n=N):
    grad = torch.randn(3, N) if grad is None else grad
    return L.gemm_t(grad, qweight, scales, zeros, bits, group_size, axis, layout, n)


# (id, callable, exception type, regex that must name the argument)
CASES = [
    # ---- quantize -------------------------------------------------------------------------------
    ("quantize-weight-int", lambda: L.quantize(W.long(), 4, 32, 0, False, torch.float16), TypeError, r"weight must be float32"),
    ("quantize-weight-f64", lambda: L.quantize(W.double(), 4, 32, 0, False, torch.float16), TypeError, r"weight must be float32"),
    ("quantize-weight-3d", lambda: L.quantize(W[None], 4, 32, 0, False, torch.float16), ValueError, r"weight must be 2-D"),
    ("quantize-weight-noncontig", lambda: L.quantize(_noncontig(W), 4, 32, 0, False, torch.float16), ValueError, r"weight must be contiguous"),
    ("quantize-bits-5", lambda: L.quantize(W, 5, 32, 0, False, torch.float16), ValueError, r"bits must be one of 2, 3, 4, 8, got 5"),
    ("quantize-group-48", lambda: L.quantize(W, 4, 48, 0, False, torch.float16), ValueError, r"group_size must be one of .*got 48"),
    ("quantize-axis-2", lambda: L.quantize(W, 4, 32, 2, False, torch.float16), ValueError, r"axis must be 0 .* or 1 .*got 2"),
    ("quantize-K-48", lambda: L.quantize(torch.randn(N, 48), 4, -1, 0, False, torch.float16), ValueError, r"in_features \(K\) must be a positive multiple of 32, got K=48"),
    ("quantize-K-not-div-group", lambda: L.quantize(torch.randn(N, 96), 4, 64, 0, False, torch.float16), ValueError, r"in_features K=96 is not divisible by group_size=64"),
    ("quantize-N-not-div-group-ic", lambda: L.quantize(torch.randn(20, 64), 4, 32, 1, False, torch.float16), ValueError, r"out_features N=20 is not divisible by group_size=32"),
    ("quantize-N-0", lambda: L.quantize(torch.randn(0, 64), 4, 32, 0, False, torch.float16), ValueError, r"out_features \(N\) must be >= 1"),
    ("quantize-nan", lambda: L.quantize(torch.where(torch.arange(K) == 7, float("nan"), W), 4, 32, 0, False, torch.float16), ValueError, r"weight contains NaN or Inf"),
    ("quantize-inf", lambda: L.quantize(torch.where(torch.arange(K) == 7, float("-inf"), W), 4, 32, 0, True, torch.float32), ValueError, r"weight contains NaN or Inf"),
    ("quantize-nan-bf16-ic", lambda: L.quantize(IW.bfloat16().index_put((torch.tensor([40]), torch.tensor([5])), torch.tensor(float("nan"), dtype=torch.bfloat16)), 4, 32, 1, False, torch.float16), ValueError, r"weight contains NaN or Inf"),
    ("quantize-scale-dtype-int", lambda: L.quantize(W, 4, 32, 0, False, torch.int32), TypeError, r"scale_dtype must be float32"),
    ("quantize-given-scales-dtype", lambda: L.quantize(W, 4, 32, 0, False, torch.float16, S.float(), Z), TypeError, r"scales have dtype"),
    ("quantize-given-scales-shape", lambda: L.quantize(W, 4, 32, 0, False, torch.float16, S[:, :1].contiguous(), Z[:, :1].contiguous()), ValueError, r"scales must have shape"),
    ("quantize-given-scales-noncontig", lambda: L.quantize(W, 4, 32, 0, False, torch.float16, _noncontig(S), Z), ValueError, r"scales must be contiguous"),
    ("quantize-given-zeros-int32", lambda: L.quantize(W, 4, 32, 0, False, torch.float16, S, Z.int()), TypeError, r"zeros must be uint8"),
    ("quantize-given-zeros-shape", lambda: L.quantize(W, 4, 32, 0, False, torch.float16, S, Z[:5].contiguous()), ValueError, r"zeros must have shape"),
    ("quantize-given-zeros-too-big", lambda: L.quantize(W, 4, 32, 0, False, torch.float16, S, torch.full_like(Z, 16)), ValueError, r"zeros must be <= 2\^bits - 1 = 15"),
    ("quantize-given-zero-scale", lambda: L.quantize(W, 4, 32, 0, False, torch.float16, torch.zeros_like(S), Z), ValueError, r"scales must be finite and non-zero"),
    ("quantize-given-nan-scale", lambda: L.quantize(W, 4, 32, 0, False, torch.float16, torch.full_like(S, float("nan")), Z), ValueError, r"scales must be finite and non-zero"),
    ("quantize-sym-with-zeros", lambda: L.quantize(W, 4, 32, 0, True, torch.float16, S, Z), ValueError, r"zeros must be None for symmetric"),
    ("quantize-asym-without-zeros", lambda: L.quantize(W, 4, 32, 0, False, torch.float16, S, None), ValueError, r"needs zeros"),
    ("quantize-zeros-without-scales", lambda: L.quantize(W, 4, 32, 0, False, torch.float16, None, Z), ValueError, r"zeros given without scales"),
    # ---- pack / unpack ----------------------------------------------------------------------------
    ("pack-codes-float", lambda: L.pack(CODES.float(), 4), TypeError, r"codes must be uint8"),
    ("pack-codes-int32", lambda: L.pack(CODES.int(), 4), TypeError, r"codes must be uint8"),
    ("pack-codes-too-big", lambda: L.pack(torch.full((2, 32), 8, dtype=torch.uint8), 3), ValueError, r"codes must be < 2\^bits = 8"),
    ("pack-codes-16-bits-2", lambda: L.pack(torch.full((2, 32), 4, dtype=torch.uint8), 2), ValueError, r"codes must be < 2\^bits = 4 for bits=2, got a code 4"),
    ("pack-codes-K-48", lambda: L.pack(torch.zeros(2, 48, dtype=torch.uint8), 4), ValueError, r"codes: K must be a positive multiple of 32, got K=48"),
    ("pack-codes-1d", lambda: L.pack(torch.zeros(64, dtype=torch.uint8), 4), ValueError, r"codes must be 2-D"),
    ("pack-codes-noncontig", lambda: L.pack(_noncontig(torch.zeros(64, 64, dtype=torch.uint8)), 4), ValueError, r"codes must be contiguous"),
    ("pack-bits-5", lambda: L.pack(CODES, 5), ValueError, r"bits must be one of"),
    ("unpack-qweight-float", lambda: L.unpack(Q.float(), 4), TypeError, r"qweight must be int32"),
    ("unpack-qweight-3d", lambda: L.unpack(Q[None], 4), ValueError, r"qweight must be 2-D"),
    ("unpack-words-not-multiple-of-bits", lambda: L.unpack(torch.zeros(2, 7, dtype=torch.int32), 3), ValueError, r"qweight has 7 words per row, not a multiple of bits=3"),
    ("unpack-bits-1", lambda: L.unpack(Q, 1), ValueError, r"bits must be one of"),
    # ---- dequantize -------------------------------------------------------------------------------
    ("dequantize-scales-int", lambda: L.dequantize(Q, S.int(), Z, 4, 32, 0), TypeError, r"scales must be float32"),
    ("dequantize-scales-shape", lambda: L.dequantize(Q, S.t().contiguous(), Z, 4, 32, 0), ValueError, r"scales must have shape \[20, 2\]"),
    ("dequantize-scales-noncontig", lambda: L.dequantize(Q, _noncontig(S), Z, 4, 32, 0), ValueError, r"scales must be contiguous"),
    ("dequantize-zeros-int32", lambda: L.dequantize(Q, S, Z.int(), 4, 32, 0), TypeError, r"zeros must be uint8"),
    ("dequantize-zeros-shape", lambda: L.dequantize(Q, S, Z.reshape(-1).contiguous(), 4, 32, 0), ValueError, r"zeros must have shape"),
    ("dequantize-qweight-noncontig", lambda: L.dequantize(_noncontig(torch.zeros(64, 32, dtype=torch.int32)), torch.ones(64, 1), None, 4, -1, 0), ValueError, r"qweight must be contiguous"),
    ("dequantize-out-dtype-int", lambda: L.dequantize(Q, S, Z, 4, 32, 0, torch.int32), TypeError, r"out_dtype must be float32"),
    ("dequantize-group-mismatch", lambda: L.dequantize(Q, S, Z, 4, 64, 0), ValueError, r"scales must have shape \[20, 1\]"),
    ("dequantize-bits-mismatch", lambda: L.dequantize(Q, S, Z, 3, 32, 0), ValueError, r"qweight has 8 words per row, not a multiple of bits=3"),
    # ---- repack / unrepack ------------------------------------------------------------------------
    ("repack-layout-5", lambda: L.repack(Q, S, Z, 4, 32, 0, 5), ValueError, r"layout 5 is not a CPU kernel layout"),
    ("repack-qweight-float", lambda: L.repack(Q.float(), S, Z, 4, 32, 0, CPU), TypeError, r"qweight must be int32"),
    ("repack-zeros-shape", lambda: L.repack(Q, S, Z[:, :1].contiguous(), 4, 32, 0, CPU), ValueError, r"zeros must have shape"),
    ("unrepack-canonical-qweight", lambda: L.unrepack(Q, S, Z, 4, 32, 0, CPU, N), ValueError, r"qweight must have the cpu_bitplane16 shape"),
    ("unrepack-out-features", lambda: L.unrepack(NQ, NS, NZ, 4, 32, 0, CPU, 40), ValueError, r"qweight has 2 row tiles but out_features=40 needs 3"),
    ("unrepack-scales-canonical", lambda: L.unrepack(NQ, S, Z, 4, 32, 0, CPU, N), ValueError, r"scales must have shape \[2, 2, 16\]"),
    # ---- gemm -------------------------------------------------------------------------------------
    ("gemm-x-int64", lambda: gemm(x=torch.ones(3, K, dtype=torch.int64)), TypeError, r"x must be float32, bfloat16 or float16"),
    ("gemm-x-f64", lambda: gemm(x=torch.ones(3, K, dtype=torch.float64)), TypeError, r"x must be float32"),
    ("gemm-x-0d", lambda: gemm(x=torch.tensor(1.0)), ValueError, r"x must have at least 1 dimension"),
    ("gemm-x-last-dim", lambda: gemm(x=torch.randn(3, 48)), ValueError, r"x has last dimension 48 but the layer's in_features is 64"),
    ("gemm-qweight-float", lambda: gemm(qweight=NQ.float()), TypeError, r"qweight must be int32"),
    ("gemm-qweight-canonical", lambda: gemm(qweight=Q), ValueError, r"qweight must have the cpu_bitplane16 shape"),
    ("gemm-qweight-noncontig", lambda: gemm(qweight=NQ.transpose(0, 1).contiguous().transpose(0, 1)), ValueError, r"qweight must be contiguous"),
    ("gemm-qweight-bits-mismatch", lambda: gemm(bits=3), ValueError, r"qweight must have the cpu_bitplane16 shape .* for bits=3"),
    ("gemm-scales-shape", lambda: gemm(scales=S), ValueError, r"scales must have shape \[2, 2, 16\]"),
    ("gemm-scales-dtype", lambda: gemm(scales=NS.int()), TypeError, r"scales must be float32"),
    ("gemm-scales-noncontig", lambda: gemm(scales=_noncontig(NS)), ValueError, r"scales must be contiguous"),
    ("gemm-zeros-int32", lambda: gemm(zeros=NZ.int()), TypeError, r"zeros must be uint8"),
    ("gemm-zeros-shape", lambda: gemm(zeros=Z), ValueError, r"zeros must have shape"),
    ("gemm-bias-dtype", lambda: gemm(bias=torch.zeros(N, dtype=torch.float16)), TypeError, r"bias must have the dtype of x"),
    ("gemm-bias-shape", lambda: gemm(bias=torch.zeros(N + 1)), ValueError, r"bias must have shape \[20\]"),
    ("gemm-bias-2d", lambda: gemm(bias=torch.zeros(1, N)), ValueError, r"bias must have shape \[20\]"),
    ("gemm-bias-noncontig", lambda: gemm(bias=torch.zeros(2 * N)[::2]), ValueError, r"bias must be contiguous"),
    ("gemm-layout-0", lambda: gemm(layout=0), ValueError, r"layout 0 is not a CPU kernel layout"),
    ("gemm-bits-5", lambda: gemm(bits=5), ValueError, r"bits must be one of"),
    ("gemm-group-48", lambda: gemm(group_size=48), ValueError, r"group_size must be one of"),
    ("gemm-axis-2", lambda: gemm(axis=2), ValueError, r"axis must be 0"),
    ("gemm-out-features-tiles", lambda: gemm(n=40), ValueError, r"out_features=40"),
    ("gemm-ic-N-not-div-group", lambda: L.gemm(torch.randn(2, 96), INQ, INS, None, None, 4, 32, 1, CPU, 48), ValueError, r"out_features N=48 is not divisible by group_size=32"),
    ("gemm-ic-scales-shape", lambda: L.gemm(torch.randn(2, 96), INQ, IS, None, None, 4, 32, 1, CPU, 64), ValueError, r"scales must have shape \[2, 96\]"),
    # ---- gemm_t -----------------------------------------------------------------------------------
    ("gemm_t-grad-int", lambda: gemm_t(grad=torch.ones(3, N, dtype=torch.int32)), TypeError, r"grad must be float32"),
    ("gemm_t-grad-last-dim", lambda: gemm_t(grad=torch.randn(3, N + 1)), ValueError, r"grad has last dimension 21 but the layer's out_features is 20"),
    ("gemm_t-qweight-canonical", lambda: gemm_t(qweight=Q), ValueError, r"qweight must have the cpu_bitplane16 shape"),
    ("gemm_t-layout-0", lambda: gemm_t(layout=0), ValueError, r"layout 0 is not a CPU kernel layout"),
]


@pytest.mark.parametrize("name,fn,exc,match", CASES, ids=[c[0] for c in CASES])
def test_op_rejects_bad_input(name, fn, exc, match):
    with pytest.raises(exc, match=match):
        fn()


@pytest.mark.parametrize("name,fn,exc,match", CASES, ids=[c[0] for c in CASES])
def test_raw_op_error_is_tagged(name, fn, exc, match, monkeypatch):
    monkeypatch.setitem(globals(), "L", torch.ops.layerpress)
    raw_error_contract(fn, exc, match)


def test_pack_rejection_is_not_partial():
    """A rejected pack leaves no output behind and the same call succeeds once the codes are valid."""
    codes = torch.zeros(4, 32, dtype=torch.uint8)
    codes[3, 31] = 16
    with pytest.raises(ValueError, match="codes"):
        L.pack(codes, 4)
    codes[3, 31] = 15
    assert ops.unpack(L.pack(codes, 4), 4)[3, 31].item() == 15


# ---- QuantSpec --------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    ({"bits": 5}, r"QuantSpec.bits"),
    ({"bits": 1}, r"QuantSpec.bits"),
    ({"bits": True}, r"QuantSpec.bits"),
    ({"bits": "4"}, r"QuantSpec.bits"),
    ({"group_size": 48}, r"QuantSpec.group_size"),
    ({"group_size": 0}, r"QuantSpec.group_size"),
    ({"group_size": True}, r"QuantSpec.group_size"),
    ({"axis": "x"}, r"QuantSpec.axis"),
    ({"axis": 0}, r"QuantSpec.axis"),
    ({"symmetric": 1}, r"QuantSpec.symmetric"),
    ({"symmetric": "yes"}, r"QuantSpec.symmetric"),
    ({"scale_dtype": torch.float64}, r"QuantSpec.scale_dtype"),
    ({"scale_dtype": torch.int8}, r"QuantSpec.scale_dtype"),
    ({"scale_dtype": "float16"}, r"QuantSpec.scale_dtype"),
], ids=lambda v: repr(v) if isinstance(v, dict) else None)
def test_quantspec_rejects_invalid_fields(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantSpec(**kwargs)


def test_quantspec_from_dict_errors_and_round_trip():
    for spec in (QuantSpec(), QuantSpec(2, -1, "ic", True, torch.bfloat16), QuantSpec(8, 256, "oc", False, torch.float32)):
        assert QuantSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match=r"unknown keys \['bitz'\]"):
        QuantSpec.from_dict({"bitz": 4})
    with pytest.raises(ValueError, match=r"QuantSpec.scale_dtype: unknown dtype 'float17'"):
        QuantSpec.from_dict({"scale_dtype": "float17"})
    with pytest.raises(ValueError, match=r"QuantSpec.scale_dtype"):
        QuantSpec.from_dict({"scale_dtype": "float64"})
    with pytest.raises(ValueError, match=r"QuantSpec.bits"):
        QuantSpec.from_dict({"bits": 6})


@pytest.mark.parametrize("spec,n,k,match", [
    (QuantSpec(4, 32, "oc"), 8, 48, r"in_features \(K\) must be a positive multiple of 32"),
    (QuantSpec(4, 32, "oc"), 8, 0, r"in_features \(K\)"),
    (QuantSpec(4, 32, "oc"), 0, 64, r"out_features \(N\) must be >= 1"),
    (QuantSpec(4, 64, "oc"), 8, 96, r"in_features K=96 is not divisible by group_size=64"),
    (QuantSpec(4, 32, "ic"), 20, 64, r"out_features N=20 is not divisible by group_size=32"),
])
def test_quantspec_check_shape_and_quantlinear_constructor(spec, n, k, match):
    with pytest.raises(ValueError, match=match):
        spec.check_shape(n, k)
    with pytest.raises(ValueError, match=match):
        QuantLinear(k, n, spec)


def test_quantlinear_rejects_bad_arguments():
    with pytest.raises(TypeError, match="spec must be a QuantSpec"):
        QuantLinear(64, 8, {"bits": 4})
    with pytest.raises(TypeError, match="from_linear expects an nn.Linear"):
        QuantLinear.from_linear(nn.Conv1d(4, 4, 1))
    ql = QuantLinear(64, 8, SPEC)
    with pytest.raises(ValueError, match=r"x has last dimension 32 but the layer's in_features is 64"):
        ql(torch.randn(2, 32))
    with pytest.raises(TypeError, match=r"x must be float32"):
        ql(torch.randn(2, 64).double())


# ---- QuantLinear state dict -----------------------------------------------------------------------

def _layer(spec=SPEC, n=N, k=K, bias=True):
    torch.manual_seed(0)
    return QuantLinear.from_linear(nn.Linear(k, n, bias=bias), spec)


def test_state_dict_wrong_shapes_are_reported():
    src = _layer().state_dict()
    for key, bad, match in [
        ("qweight", src["qweight"][:, :4].contiguous(), r"qweight: expected int32 \[20, 8\], got torch.int32 \[20, 4\]"),
        ("qweight", src["qweight"].float(), r"qweight: expected int32"),
        ("scales", src["scales"][:10].contiguous(), r"scales: expected torch.float16 \[20, 2\]"),
        ("scales", src["scales"].float(), r"scales: expected torch.float16 \[20, 2\], got torch.float32"),
        ("zeros", src["zeros"][:, :1].contiguous(), r"zeros: expected uint8 \[20, 2\]"),
        ("zeros", src["zeros"].int(), r"zeros: expected uint8"),
        ("bias", src["bias"][:5].clone(), r"bias"),
    ]:
        sd = dict(src)
        sd[key] = bad
        dst = _layer()
        before = dst.dequantized_weight().clone()
        with pytest.raises(RuntimeError, match=match):
            dst.load_state_dict(sd)
        # a rejected weight leaves the layer as it was
        assert torch.equal(dst.dequantized_weight(), before), key


def test_state_dict_missing_and_unexpected_keys():
    src = _layer().state_dict()
    for key in ("qweight", "scales", "zeros", "bias"):
        sd = {k: v for k, v in src.items() if k != key}
        with pytest.raises(RuntimeError, match=rf"Missing key\(s\).*\"{key}\""):
            _layer().load_state_dict(sd)
        result = _layer().load_state_dict(sd, strict=False)
        assert result.missing_keys == [key]
    # a symmetric layer has no zeros; a checkpoint that carries them is rejected
    sym = _layer(QuantSpec(4, 32, "oc", True, torch.float16))
    sd = dict(sym.state_dict())
    assert "zeros" not in sd
    sd["zeros"] = torch.zeros(N, 2, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\).*\"zeros\""):
        sym.load_state_dict(sd)
    # a stray key is still reported
    sd = dict(src)
    sd["qweight_extra"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\).*qweight_extra"):
        _layer().load_state_dict(sd)


def test_state_dict_from_a_different_spec_is_rejected():
    src = _layer(QuantSpec(4, 32, "oc", False, torch.float16)).state_dict()
    with pytest.raises(RuntimeError, match=r"scales: expected torch.float16 \[20, 1\]"):
        _layer(QuantSpec(4, 64, "oc", False, torch.float16)).load_state_dict(src)
    with pytest.raises(RuntimeError, match=r"qweight: expected int32 \[20, 6\], got torch.int32 \[20, 8\]"):
        _layer(QuantSpec(3, 32, "oc", False, torch.float16)).load_state_dict(src)


@pytest.mark.gpu
def test_wrong_device_is_named():
    x = torch.randn(3, K, device="cuda")
    with pytest.raises((ValueError, RuntimeError), match=r"x is on cuda.*qweight is on cpu|device"):
        gemm(x=x)
    with pytest.raises((ValueError, RuntimeError), match=r"bias is on cuda.*qweight is on cpu|device"):
        gemm(bias=torch.zeros(N, device="cuda"))
    with pytest.raises((ValueError, RuntimeError), match=r"scales is on cuda|device"):
        L.dequantize(Q, S.cuda(), Z, 4, 32, 0)


def test_quantize_scale_overflow_names_scale_dtype():
    """A group whose range does not fit the scale dtype is refused rather than stored as inf."""
    w = torch.zeros(4, 64)
    w[0, 0] = 1e7
    with pytest.raises(ValueError, match=r"scale overflows scale_dtype"):
        L.quantize(w, 4, 32, 0, False, torch.float16)
    L.quantize(w, 4, 32, 0, False, torch.float32)  # fine with fp32 scales


def test_strided_activations_are_accepted():
    """Activations whose last dimension is strided are copied, not refused (as F.linear does)."""
    x = torch.randn(K, 3).t()
    g = torch.randn(N, 3).t()
    assert torch.equal(gemm(x=x), gemm(x=x.contiguous()))
    assert torch.equal(gemm_t(grad=g), gemm_t(grad=g.contiguous()))
