"""AWQ of the compression flows (layerpress.flows.awq): folding is exact, the search helps."""
from __future__ import annotations

import copy

import pytest
import torch

from flows_testutils import FAMILIES, calib_ids, quantised_linear_count, tiny_model
from layerpress import QuantSpec
from layerpress.flows import quantize_model
from layerpress.flows.awq import awq_block, fold_scales
from layerpress.flows.calibration import capture_block_inputs
from layerpress.flows.models import adapter_for, get_submodule, weight_oi
from layerpress.flows.quantizers import rtn


@pytest.fixture(scope="module", autouse=True)
def _one_thread(torch_single_thread):
    yield


def _out(model, ids):
    o = model(input_ids=ids)
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


@pytest.mark.parametrize("family", FAMILIES)
def test_folded_model_is_exactly_equivalent(family):
    """Random positive scales over four orders of magnitude folded into every foldable group of
    every block: the float64 model's outputs are unchanged (to float64 rounding), while the
    weights really changed."""
    model = tiny_model(family).double()
    ids = calib_ids(4, 24, seed=5)
    with torch.no_grad():
        ref = _out(model, ids)
        adapter = adapter_for(model)
        gen = torch.Generator().manual_seed(0)
        n_folded = 0
        before = copy.deepcopy(model.state_dict())
        for block in adapter.blocks():
            for g in adapter.scaling_groups(block):
                if g.fold not in ("norm", "linear"):
                    with pytest.raises(ValueError, match="not supported"):
                        fold_scales(block, g, torch.ones(1, dtype=torch.float64))
                    continue
                k = weight_oi(get_submodule(block, g.linears[0])).shape[1]
                s = torch.exp(torch.empty(k, dtype=torch.float64).uniform_(-4.6, 4.6, generator=gen))
                fold_scales(block, g, s)
                n_folded += 1
        out = _out(model, ids)
    assert n_folded >= len(adapter.blocks())
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed
    assert torch.allclose(out, ref, rtol=1e-9, atol=1e-9), (out - ref).abs().max()


def test_fold_scales_rejects_bad_scales():
    model = tiny_model("llama")
    block = adapter_for(model).blocks()[0]
    g = adapter_for(model).scaling_groups(block)[0]
    with pytest.raises(ValueError, match="positive"):
        fold_scales(block, g, torch.zeros(128))
    with pytest.raises(ValueError, match="channels"):
        fold_scales(block, g, torch.ones(64))


def _outlier_llama():
    """A tiny Llama whose post-attention norm gives a few channels 20x larger activations (as
    real LLMs have): the situation AWQ is made for."""
    model = tiny_model("llama", layers=1)
    with torch.no_grad():
        norm = model.model.layers[0].post_attention_layernorm
        norm.weight[:4] = 20.0
    return model


def test_awq_lowers_the_group_output_error_below_rtn():
    """On the same captured inputs, the MLP output error of the gate/up group quantised with
    the searched AWQ scales is lower than with plain RTN (α = 0), by a margin."""
    model = _outlier_llama()
    adapter = adapter_for(model)
    ids = calib_ids(8, 32, seed=2)
    inputs = capture_block_inputs(model, ids, adapter)
    block = adapter.blocks()[0]
    spec = QuantSpec(bits=3, group_size=128, axis="oc")
    with torch.no_grad():  # α = 0 in the grid is plain RTN; its error is reported as "none"
        res = awq_block(copy.deepcopy(block), adapter, inputs, lambda n, o, i: spec, clip=False)
    by_prev = {r.prev: r for r in res}
    r = by_prev["post_attention_layernorm"]
    assert r.alpha is not None and r.alpha > 0
    assert r.error["best"] < 0.8 * r.error["none"], r.error


def test_awq_search_error_is_measured_independently():
    """The searched α's error, recomputed independently: fold the scales into a copy of the
    float block, RTN-quantise the group's linears there, and compare the MLP output with the
    float MLP's on the same inputs -- equal to the error awq_block reported."""
    model = _outlier_llama()
    adapter = adapter_for(model)
    ids = calib_ids(8, 32, seed=2)
    inputs = capture_block_inputs(model, ids, adapter)
    block = adapter.blocks()[0]
    spec = QuantSpec(bits=3, group_size=128, axis="oc")
    folded = copy.deepcopy(block)
    with torch.no_grad():
        res = {r.prev: r for r in awq_block(folded, adapter, inputs, lambda n, o, i: spec,
                                              clip=False)}
        r = res["post_attention_layernorm"]
        # float MLP inputs/outputs of the original block and of the folded one
        grab = lambda blk: _mlp_io(blk, inputs)  # noqa: E731
        (x0, y0), (x1, _) = grab(block), grab(folded)
        mlp = copy.deepcopy(folded.mlp)
        for n in ("gate_proj", "up_proj"):
            lin = getattr(mlp, n)
            lin.weight.copy_(rtn(lin.weight, spec).weight)
        err = sum((mlp(x).double() - y.double()).pow(2).sum().item() for x, y in zip(x1, y0))
        err /= sum(y.numel() for y in y0)
    assert err == pytest.approx(r.error["best"], rel=1e-3)
    assert err < r.error["none"]


def _mlp_io(block, inputs):
    xs, ys = [], []
    h = block.mlp.register_forward_hook(lambda m, a, o: (xs.append(a[0]), ys.append(o), None)[-1])
    try:
        for hid, a, kw in zip(inputs.hidden, inputs.args, inputs.kwargs):
            block(hid, *a, **kw)
    finally:
        h.remove()
    return xs, ys


@pytest.mark.parametrize("family, method", [("llama", "awq"), ("opt", "awq"), ("gpt2", "awq"),
                                            ("bert", "awq"), ("llama", "awq+gptq")])
def test_quantize_model_with_awq(family, method):
    """AWQ through the whole flow: every linear swapped, a report entry per scaling group (the
    activation-folded ones marked skipped), and the output still close to the float model's."""
    model = tiny_model(family)
    ref_model = copy.deepcopy(model)
    ids = calib_ids()
    adapter = adapter_for(model)
    n_groups = sum(len(adapter.scaling_groups(b)) for b in adapter.blocks())
    rep = quantize_model(model, bits=4, calib=ids, method=method, axis="auto")
    assert len(rep.awq_groups) == n_groups
    for g in rep.awq_groups:
        assert (g["alpha"] is None) == bool(g["skipped"])
    x = calib_ids(2, 16, seed=9)
    with torch.no_grad():
        y, y0 = _out(model, x), _out(ref_model, x)
    assert ((y - y0).norm() / y0.norm()).item() < 0.5
    assert quantised_linear_count(model) == len(rep.layers)
