"""Numerical guards of the flows: NaN/Inf weights refused with the layer's name, NaN/Inf
calibration activations stop the run with the block's name, and a Hessian that is not positive
definite gets escalating dampening (recorded in the report) instead of a crash."""
from __future__ import annotations

import pytest
import torch

from flows_testutils import calib_ids, tiny_model
from layerpress import QuantSpec
from layerpress.flows import quantize_model
from layerpress.flows.quantizers import DAMP_ESCALATIONS, damped_cholesky_inverse, gptq, rtn


@pytest.fixture(scope="module", autouse=True)
def _one_thread(torch_single_thread):
    yield


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_weight_is_refused_naming_the_layer(bad):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 7] = bad
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj: the weight holds 1 NaN/Inf"):
        quantize_model(model, bits=4, calib=calib_ids(2, 8), method="rtn", axis="oc")
    # refused before any work: nothing was swapped
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "Linear"


def test_nonfinite_calibration_inputs_stop_naming_the_block():
    model = tiny_model("llama")

    def overflow(mod, args, out):  # block 0's output turns Inf, as an fp16 overflow would
        return (out[0] * float("inf"),) + tuple(out[1:]) if isinstance(out, tuple) else out * float("inf")

    model.model.layers[0].register_forward_hook(overflow)
    with pytest.raises(ValueError, match=r"model\.layers\.1: its calibration inputs \(the output of "
                                         r"model\.layers\.0\) hold NaN/Inf"):
        quantize_model(model, bits=4, calib=calib_ids(2, 8), method="rtn", axis="oc")


@pytest.mark.parametrize("clip", [False, True])
def test_weight_too_large_for_fp16_scales_names_the_layer(clip):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(1e38)  # finite, but its scales overflow fp16
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj: .*overflows scale_dtype"):
        quantize_model(model, bits=4, calib=calib_ids(2, 8), method="rtn", axis="oc", clip=clip)


def test_nonfinite_activations_inside_a_block_stop_naming_the_layer():
    model = tiny_model("llama")
    with torch.no_grad():  # a norm (not a linear) turns the MLP's inputs into NaN
        model.model.layers[0].post_attention_layernorm.weight[0] = float("nan")
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.gate_proj: its calibration inputs hold NaN/Inf "
                                         r"\(inside model\.layers\.0\)"):
        quantize_model(model, bits=4, calib=calib_ids(2, 8), method="gptq", axis="oc")


def _indefinite_hessian(k, rows, shift, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g, dtype=torch.float64)
    h = 2 * x.t() @ x / rows
    return h - shift * torch.diag(h).mean() * torch.eye(k, dtype=torch.float64)


def test_non_pd_hessian_escalates_the_dampening():
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    spec = QuantSpec(bits=4, group_size=32)
    # rank 8 minus 5 % of the mean diagonal: 0.01 leaves it indefinite, 0.1 does not
    H = _indefinite_hessian(64, 8, 0.05)
    with pytest.raises(torch.linalg.LinAlgError):
        torch.linalg.cholesky(H + 0.01 * torch.diag(H).mean() * torch.eye(64, dtype=H.dtype))
    res = gptq(w, H, spec)
    assert res.damp == pytest.approx(0.1)
    assert torch.isfinite(res.weight).all()
    err = (res.weight - w).norm() / w.norm()
    assert err < 2 * (rtn(w, spec).weight - w).norm() / w.norm()
    # a PD Hessian keeps the asked dampening
    assert gptq(w, _indefinite_hessian(64, 256, 0.0), spec).damp == pytest.approx(0.01)


@pytest.mark.parametrize("what", ["nan", "negative", "zero"])
def test_hopeless_hessian_falls_back_to_rounding(what):
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(2))
    spec = QuantSpec(bits=3, group_size=32)
    H = {"nan": torch.full((64, 64), float("nan"), dtype=torch.float64),
         "negative": -torch.eye(64, dtype=torch.float64),
         "zero": torch.zeros(64, 64, dtype=torch.float64)}[what]
    res = gptq(w, H, spec, act_order=False)
    ref = rtn(w, spec)
    if what == "zero":  # every channel dead: weight zeroed, identity Hessian, asked dampening
        assert res.damp == pytest.approx(0.01)
        return
    assert res.damp == float("inf")
    assert torch.equal(res.codes, ref.codes) and torch.equal(res.scales, ref.scales)


def test_damped_cholesky_inverse_matches_the_plain_factor_when_pd():
    H = _indefinite_hessian(48, 200, 0.0, seed=3)
    U, damp = damped_cholesky_inverse(H, 0.01)
    Hd = H + 0.01 * torch.diag(H).mean() * torch.eye(48, dtype=H.dtype)
    want = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(Hd)), upper=True).float()
    assert damp == 0.01 and torch.equal(U, want)
    assert DAMP_ESCALATIONS >= 3


@pytest.mark.parametrize("n_samples, seq_len", [(1, 4), (1, 32)])
def test_one_calibration_sequence_quantises_and_records_the_dampening(n_samples, seq_len):
    model = tiny_model("llama")
    with torch.no_grad():  # dead input channels too: a zero embedding dimension
        model.model.embed_tokens.weight[:, :5] = 0
    rep = quantize_model(model, bits=4, calib=calib_ids(n_samples, seq_len), method="gptq", axis="oc")
    assert rep.layers and all(layer.gptq_damp is not None and layer.gptq_damp >= 0.01 for layer in rep.layers)
    assert all(layer.rel_error == layer.rel_error for layer in rep.layers)  # no NaN
    assert "gptq_damp" in rep.to_dict()["layers"][0]
