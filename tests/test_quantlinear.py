"""QuantLinear: forward/backward against the plain-PyTorch reference, state dict round trips,
dtype/device moves, repr, and torch.compile of a small quantised MLP."""
from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from layerpress import Layout, QuantLinear, QuantSpec, quantize_linear
from layerpress import reference as R

from lp_testutils import assert_within, cpu_gemm_operands, dtype_id, folded_magnitude, gemm_tolerance, spec_id

pytestmark = pytest.mark.usefixtures("torch_single_thread")

SPECS = [
    QuantSpec(4, 32, "oc", False, torch.float16),
    QuantSpec(3, -1, "ic", True, torch.bfloat16),
    QuantSpec(8, 64, "ic", False, torch.float32),
    QuantSpec(2, 128, "oc", True, torch.float32),
]
SHAPES = {  # (in_features K, out_features N) valid for the spec
    0: (128, 37), 1: (96, 33), 2: (64, 128), 3: (256, 24),
}


def _linear(k, n, bias=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        if bias:
            lin.bias.uniform_(-1, 1)
    return lin.to(dtype)


def _layer(i, bias=True):
    k, n = SHAPES[i]
    lin = _linear(k, n, bias)
    return lin, QuantLinear.from_linear(lin, SPECS[i])


def _canonical_codes(ql):
    q, s, z = ql.canonical()
    return R.unpack(q, ql.spec.bits), s, z


@pytest.mark.parametrize("adtype", [torch.float32, torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("i", range(len(SPECS)), ids=[spec_id(s) for s in SPECS])
def test_forward_and_backward_match_reference(i, adtype):
    lin, ql = _layer(i)
    spec, (k, n) = SPECS[i], SHAPES[i]
    assert ql.bias.dtype == torch.float32  # module bias float32, activations of another dtype

    # the layer holds RTN of the linear weight (reference quantisation of the same weight)
    codes, s, z = _canonical_codes(ql)
    rc, rs, rz = R.quantize(lin.weight.detach(), spec)
    assert torch.equal(codes, rc) and torch.equal(s, rs)
    assert (z is None and rz is None) or torch.equal(z, rz)
    w64 = R.dequantize(codes, s, z, spec).double()
    assert torch.equal(ql.dequantized_weight(), R.dequantize(codes, s, z, spec))
    mag = folded_magnitude(codes, s, z, spec)

    torch.manual_seed(1)
    x = torch.randn(2, 5, k).to(adtype).requires_grad_()
    y = ql(x)
    assert y.dtype == adtype and y.shape == (2, 5, n)
    b = ql.bias.detach().to(adtype)  # forward casts the bias to the activation dtype
    # reference: F.linear with the dequantised weight, in float64, through autograd
    x64 = x.detach().double().requires_grad_()
    b64 = ql.bias.detach().double().requires_grad_()
    # value: the bias as the forward uses it (rounded to the activation dtype); gradient: to b64
    y64 = F.linear(x64, w64, b.double() + (b64 - b64.detach()))
    # forward value: the operands as the active CPU variant multiplies them
    xk, wk = cpu_gemm_operands(x.detach().reshape(-1, k), w64, spec)
    y_fwd = F.linear(xk, wk, b.double())
    tol = gemm_tolerance(xk, mag, y_fwd, adtype, b)
    assert_within(y.detach().reshape(-1, n), y_fwd, tol, "forward")

    gout = torch.randn(2, 5, n).to(adtype)
    y.backward(gout)
    y64.backward(gout.double())
    g2 = gout.reshape(-1, n)
    gx_ref = x64.grad.reshape(-1, k)
    assert x.grad.dtype == adtype
    assert_within(x.grad.reshape(-1, k), gx_ref, gemm_tolerance(g2, mag.t(), gx_ref, adtype), "grad x")
    # bias grad: the batch sum of the output gradient (computed in the activation dtype)
    assert ql.bias.grad.dtype == torch.float32
    gb_ref = b64.grad
    tol_b = (torch.finfo(adtype).eps * (g2.double().abs().sum(0)) * 2 + 1e-6)
    assert_within(ql.bias.grad, gb_ref, tol_b, "grad bias")


def test_no_bias_and_weight_is_frozen():
    lin, ql = _layer(0, bias=False)
    assert ql.bias is None and list(ql.parameters()) == []
    x = torch.randn(3, 128, requires_grad=True)
    ql(x).sum().backward()
    codes, s, z = _canonical_codes(ql)
    want = torch.ones(3, 37, dtype=torch.float64) @ R.dequantize(codes, s, z, ql.spec).double()
    assert torch.allclose(x.grad.double(), want, rtol=1e-5, atol=1e-5)
    assert not any(t.requires_grad for t in (ql.qweight, ql.scales))


def test_input_without_grad_only_bias_grad():
    lin, ql = _layer(1)
    x = torch.randn(4, 96)
    ql(x).pow(2).sum().backward()
    assert ql.bias.grad is not None and ql.bias.grad.shape == (33,)


@pytest.mark.parametrize("i", range(len(SPECS)), ids=[spec_id(s) for s in SPECS])
def test_state_dict_round_trip(i):
    lin, ql = _layer(i)
    spec, (k, n) = SPECS[i], SHAPES[i]
    sd = ql.state_dict()
    want_keys = {"qweight", "scales", "bias"} | (set() if spec.symmetric else {"zeros"})
    assert set(sd) == want_keys
    g = spec.group_for(n, k)
    assert sd["qweight"].dtype == torch.int32 and sd["qweight"].shape == (n, k * spec.bits // 32)
    assert sd["scales"].dtype == spec.scale_dtype
    assert sd["scales"].shape == ((n, k // g) if spec.axis == "oc" else (k, n // g))
    if not spec.symmetric:
        assert sd["zeros"].dtype == torch.uint8 and sd["zeros"].shape == sd["scales"].shape
    assert sd["bias"].dtype == torch.float32
    # canonical layout: exactly the reference packing of the reference RTN codes
    rc, rs, rz = R.quantize(lin.weight.detach(), spec)
    assert torch.equal(sd["qweight"], R.pack(rc, spec.bits)) and torch.equal(sd["scales"], rs)
    # the live weight stays in the CPU kernel layout
    assert ql.layout == Layout.CPU_BITPLANE16 and ql.qweight.dim() == 4

    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    loaded = torch.load(buf)
    fresh = QuantLinear(k, n, spec)
    x = torch.randn(3, k)
    assert not torch.equal(fresh(x), ql(x))
    result = fresh.load_state_dict(loaded)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(fresh(x), ql(x))
    for key, t in fresh.state_dict().items():
        assert torch.equal(t, sd[key]) and t.dtype == sd[key].dtype, key
    # and through from_quantized
    q, s, z = ql.canonical()
    again = QuantLinear.from_quantized(q, s, z, spec, bias=ql.bias.detach())
    assert torch.equal(again(x), ql(x))


def test_state_dict_prefix_inside_a_model():
    torch.manual_seed(0)
    model = nn.Sequential(quantize_linear(nn.Linear(64, 32), SPECS[0]), nn.ReLU(),
                          quantize_linear(nn.Linear(32, 8, bias=False), SPECS[1]))
    sd = model.state_dict()
    assert set(sd) == {"0.qweight", "0.scales", "0.zeros", "0.bias", "2.qweight", "2.scales"}
    fresh = nn.Sequential(QuantLinear(64, 32, SPECS[0]), nn.ReLU(), QuantLinear(32, 8, SPECS[1], bias=False))
    fresh.load_state_dict(sd)
    x = torch.randn(4, 64)
    assert torch.equal(fresh(x), model(x))


@pytest.mark.parametrize("i", [0, 2], ids=[spec_id(SPECS[0]), spec_id(SPECS[2])])
def test_dtype_and_device_moves_keep_scales(exact_cpu_gemm_variant, i):
    lin, ql = _layer(i)
    spec, (k, n) = SPECS[i], SHAPES[i]
    x = torch.randn(3, k)
    y0 = ql(x)
    q0 = ql.qweight.clone()
    assert ql.to("cpu") is ql and torch.equal(ql(x), y0)
    assert ql.to(torch.device("cpu"), torch.float32) is ql and torch.equal(ql(x), y0)

    ql.half()
    assert ql.scales.dtype == spec.scale_dtype and ql.bias.dtype == torch.float16
    assert isinstance(ql.bias, nn.Parameter) and ql.bias.requires_grad
    assert ql.qweight.dtype == torch.int32 and torch.equal(ql.qweight, q0)
    assert ql.zeros is None or ql.zeros.dtype == torch.uint8
    # only the bias changed: rounding it to fp16 is the whole difference
    codes, s, z = _canonical_codes(ql)
    y_ref = R.gemm(x, codes, s, z, spec, ql.bias.detach().float())
    tol = gemm_tolerance(x, folded_magnitude(codes, s, z, spec), y_ref, torch.float32, ql.bias.float())
    assert_within(ql(x), y_ref, tol, "after .half()")
    xh = x.half()
    assert ql(xh).dtype == torch.float16

    ql.to(torch.bfloat16)
    assert ql.scales.dtype == spec.scale_dtype and ql.bias.dtype == torch.bfloat16
    ql.float()
    assert ql.scales.dtype == spec.scale_dtype and ql.bias.dtype == torch.float32
    assert set(ql.state_dict()) >= {"qweight", "scales"}
    assert ql.state_dict()["scales"].dtype == spec.scale_dtype


def test_repr_mentions_the_spec():
    _, ql = _layer(0)
    r = repr(ql)
    for part in ("in_features=128", "out_features=37", "bits=4", "group_size=32", "axis=oc",
                 "symmetric=False", "scale_dtype=float16", "bias=True", "layout=cpu_bitplane16"):
        assert part in r, (part, r)
    _, ql = _layer(1)
    r = repr(ql)
    for part in ("bits=3", "group_size=whole", "axis=ic", "symmetric=True", "scale_dtype=bfloat16"):
        assert part in r, (part, r)


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        QuantLinear.from_linear(nn.Linear(64, 96), QuantSpec(4, 32, "oc", False, torch.float16)),
        nn.GELU(),
        QuantLinear.from_linear(nn.Linear(96, 64), QuantSpec(3, 32, "ic", True, torch.bfloat16)),
        nn.SiLU(),
        QuantLinear.from_linear(nn.Linear(64, 33), QuantSpec(8, -1, "oc", False, torch.float32)),
    )


def test_torch_compile_mlp_fullgraph_forward_and_backward():
    """Inductor (CPU) compiles the quantised MLP in one graph (fullgraph=True: the custom ops and
    their fakes/autograd trace without graph breaks); outputs and gradients match eager."""
    torch._dynamo.reset()
    model = _mlp()
    x = torch.randn(5, 64)
    xe = x.clone().requires_grad_()
    ye = model(xe)
    ye.square().sum().backward()
    ge = xe.grad.clone()
    gb = [m.bias.grad.clone() for m in model if isinstance(m, QuantLinear)]
    model.zero_grad()

    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    xc = x.clone().requires_grad_()
    yc = compiled(xc)
    yc.square().sum().backward()
    # the same custom kernels run in both; only the pointwise ops are fused by inductor
    torch.testing.assert_close(yc, ye, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xc.grad, ge, rtol=1e-5, atol=1e-5)
    for m, want in zip([m for m in model if isinstance(m, QuantLinear)], gb):
        torch.testing.assert_close(m.bias.grad, want, rtol=1e-5, atol=1e-5)
    # a new batch size reuses or recompiles the graph without breaking it
    x2 = torch.randn(3, 7, 64)
    torch.testing.assert_close(compiled(x2), model(x2), rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
