"""RTN and GPTQ quantisers of the compression flows (layerpress.flows.quantizers)."""
from __future__ import annotations

import pytest
import torch

from layerpress import QuantLinear, QuantSpec, ops
from layerpress.flows.quantizers import HessianAccumulator, gptq, minmax_params, rtn


@pytest.fixture(scope="module", autouse=True)
def _one_thread(torch_single_thread):
    yield


def _problem(n=256, k=256, tokens=1024, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    # correlated inputs with uneven channel scales (as real activations): GPTQ has work to do
    x = torch.randn(tokens, k, generator=g) @ (torch.eye(k) + 0.3 * torch.randn(k, k, generator=g) / k ** 0.5)
    x = x * (0.2 + 2 * torch.rand(k, generator=g))
    acc = HessianAccumulator(k)
    for chunk in x.split(300):
        acc.add(chunk)
    return w, x, acc.hessian()


def _rel_err(x, w, wq):
    return ((x @ w.t() - x @ wq.t()).norm() / (x @ w.t()).norm()).item()


@pytest.mark.parametrize("axis", ["oc", "ic"])
@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_beats_rtn(axis, bits, act_order):
    w, x, H = _problem()
    spec = QuantSpec(bits=bits, group_size=128, axis=axis)
    e_rtn = _rel_err(x, w, rtn(w, spec).weight)
    e_gptq = _rel_err(x, w, gptq(w, H, spec, act_order=act_order).weight)
    assert e_gptq < 0.97 * e_rtn, (e_gptq, e_rtn)


@pytest.mark.parametrize("spec", [QuantSpec(4, 128, "oc"), QuantSpec(3, 64, "ic"),
                                  QuantSpec(4, 256, "oc"), QuantSpec(4, -1, "ic"),
                                  QuantSpec(2, 32, "oc", symmetric=True),
                                  QuantSpec(4, 32, "ic", symmetric=True, scale_dtype=torch.bfloat16)],
                         ids=lambda s: f"b{s.bits}-{s.axis}-g{s.group_size}-{'sym' if s.symmetric else 'asym'}")
@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_output_is_canonical(spec, act_order):
    """The result loads into QuantLinear.from_quantized and dequantises to the GPTQ solution;
    codes are exactly the format's RTN of that solution with the chosen scales."""
    w, x, H = _problem()
    res = gptq(w, H, spec, act_order=act_order)
    ql = QuantLinear.from_quantized(res.qweight, res.scales, res.zeros, spec)
    assert torch.equal(ql.dequantized_weight(), res.weight)
    codes, s, z = ops.quantize(res.weight, spec, scales=res.scales, zeros=res.zeros)
    assert torch.equal(codes, res.codes)
    y = ql(x[:4])
    assert torch.allclose(y, x[:4] @ res.weight.t(), rtol=1e-4, atol=1e-4)


def test_rtn_matches_ops_and_minmax():
    w, _, _ = _problem(n=128, k=256)
    for spec in (QuantSpec(4, 128, "oc"), QuantSpec(3, 64, "ic"), QuantSpec(4, 32, "oc", symmetric=True)):
        res = rtn(w, spec)
        codes, s, z = ops.quantize(w, spec)
        assert torch.equal(res.codes, codes) and torch.equal(res.scales, s)
        n, k = w.shape
        g = spec.group_for(n, k)
        v = w.reshape(n, k // g, g) if spec.axis == "oc" else w.t().reshape(k, n // g, g)
        s2, z2 = minmax_params(v, spec)
        assert torch.equal(s2, s) and (z is None or torch.equal(z2, z))


def test_gptq_rejects_bad_hessian_and_handles_dead_columns():
    w, x, H = _problem(n=128, k=128)
    with pytest.raises(ValueError, match="Hessian"):
        gptq(w, H[:64, :64], QuantSpec(4, 128))
    H = H.clone()
    H[5, :] = 0
    H[:, 5] = 0  # an input channel that is always zero
    res = gptq(w, H, QuantSpec(4, 128))
    assert torch.isfinite(res.weight).all()
    assert res.weight[:, 5].abs().max() < 0.02  # dead column quantised towards 0


def test_hessian_accumulator():
    acc = HessianAccumulator(32)
    with pytest.raises(ValueError):
        acc.hessian()
    x = torch.randn(3, 5, 32)
    acc.add(x)
    x2 = x.reshape(-1, 32).double()
    assert torch.allclose(acc.hessian(), 2 * x2.t() @ x2 / 15, rtol=1e-5, atol=1e-5)
