"""Autograd registrations of the ops: gemm_t's adjoint (double backward of gemm) against a
float64 reference, and a clear error, not a silently missing gradient, for every op that has no
gradient."""
from __future__ import annotations

import pytest
import torch

import layerpress  # noqa: F401
from layerpress import QuantSpec, ops
from lp_testutils import dequant64, quantized


@pytest.mark.parametrize("axis", ["oc", "ic"])
@pytest.mark.parametrize("bits", [3, 4])
def test_double_backward_of_gemm_matches_reference(exact_cpu_gemm_variant, bits, axis):
    n, k, m = 64, 96, 5
    spec = QuantSpec(bits=bits, group_size=32, axis=axis)
    codes, scales, zeros, _, native = quantized(spec, n, k, seed=bits)
    w = dequant64(codes, scales, zeros, spec)  # [n, k] float64
    qweight, s1, z1 = native  # the CPU kernel layout (1)
    args = (qweight, s1, z1, None, bits, 32, spec.axis_id, 1, n)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=g, requires_grad=True)
    u = torch.randn(m, n, generator=g)
    v = torch.randn(m, k, generator=g)
    # first backward with a graph: d<gemm(x), u>/dx = gemm_t(u); its derivative w.r.t. u along
    # v is gemm(v) = v · Wᵀ (the adjoint of gemm_t)
    uu = u.clone().requires_grad_(True)
    y = torch.ops.layerpress.gemm(x, *args)
    (gx,) = torch.autograd.grad(y, x, uu, create_graph=True)
    torch.testing.assert_close(gx.double(), u.double() @ w, rtol=1e-5, atol=1e-4)
    (gu,) = torch.autograd.grad(gx, uu, v)
    torch.testing.assert_close(gu.double(), v.double() @ w.t(), rtol=1e-5, atol=1e-4)


def test_gemm_t_gradcheck_against_its_adjoint(exact_cpu_gemm_variant):
    n, k = 32, 64
    spec = QuantSpec(bits=4, group_size=32)
    _, _, _, _, (qweight, scales, zeros) = quantized(spec, n, k, seed=3)
    g = torch.randn(3, n, requires_grad=True)
    out = torch.ops.layerpress.gemm_t(g, qweight, scales, zeros, 4, 32, 0, 1, n)
    u = torch.randn_like(out)
    (gg,) = torch.autograd.grad(out, g, u)
    # <gemm_t(g), u> is linear in g: its gradient is gemm(u), and also the finite difference
    eps = 1.0
    d = torch.randn_like(g)
    out2 = torch.ops.layerpress.gemm_t((g + eps * d).detach(), qweight, scales, zeros, 4, 32, 0, 1, n)
    lhs = ((out2 - out.detach()) * u).sum().double()
    torch.testing.assert_close(lhs, (gg * d).sum().double(), rtol=1e-4, atol=1e-3)


def _no_grad_calls():
    spec = QuantSpec(bits=4, group_size=32)
    w = torch.randn(16, 64, requires_grad=True)
    codes, s, z = ops.quantize(w.detach(), spec)
    qw = ops.pack(codes, 4)
    s_req = s.float().requires_grad_(True)
    x = torch.randn(4, 64, requires_grad=True)
    yield "quantize", lambda: torch.ops.layerpress.quantize(w, 4, 32, 0, False, torch.float16)[1]
    yield "dequantize", lambda: torch.ops.layerpress.dequantize(qw, s_req, z, 4, 32, 0)
    yield "wtacrs_row_norms", lambda: torch.ops.layerpress.wtacrs_row_norms(x)
    yield "rms_norm_backward", lambda: torch.ops.layerpress.rms_norm_backward(
        torch.ones(4, 64), x, None, torch.ones(4), None, False)[0]


@pytest.mark.parametrize("name,call", list(_no_grad_calls()), ids=lambda v: v if isinstance(v, str) else "")
def test_backward_through_an_op_without_gradient_raises(name, call):
    out = call()
    assert out.requires_grad
    with pytest.raises(RuntimeError, match=f"layerpress::{name} is not differentiable"):
        out.float().sum().backward()
