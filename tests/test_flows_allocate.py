"""Knapsack bit allocation: optimality against brute force, the target never exceeded, errors;
the per-layer error measurement against an independent computation."""
from __future__ import annotations

import itertools
import os
import sys
from fractions import Fraction

import numpy as np
import pytest
import torch

from flows_testutils import calib_ids, tiny_model
from layerpress import reference
from layerpress.flows.allocate import allocate_knapsack, measure_layer_errors
from layerpress.flows.models import adapter_for, weight_oi
from layerpress.spec import QuantSpec


def _brute(params, errors, target, widths):
    best = None
    for bits in itertools.product(widths, repeat=len(params)):
        if sum(b * p for b, p in zip(bits, params)) <= Fraction(target) * sum(params):
            e = sum(err[b] for err, b in zip(errors, bits))
            if best is None or e < best[0]:
                best = (e, bits)
    return best


def test_knapsack_matches_brute_force():
    rng = np.random.default_rng(0)
    for trial in range(150):
        n = int(rng.integers(1, 6))
        widths = sorted(rng.choice([2, 3, 4, 8], size=int(rng.integers(1, 5)), replace=False).tolist())
        unit = int(rng.choice([1, 7, 64]))
        params = [unit * int(p) for p in rng.integers(1, 9, n)]
        # errors: usually decreasing in the width (as measured), sometimes arbitrary
        errors = []
        for _ in range(n):
            e = rng.exponential(1.0, len(widths))
            e = np.sort(e)[::-1] if rng.random() < 0.8 else e
            errors.append({w: float(x) for w, x in zip(widths, e)})
        target = float(rng.uniform(widths[0], widths[-1] + 0.5))
        if rng.random() < 0.3:  # a target hit exactly by some allocation (equality meets it)
            bits = rng.choice(widths, n)
            target = float(Fraction(int(sum(b * p for b, p in zip(bits, params))), sum(params)))
        a = allocate_knapsack(params, errors, target, widths)
        ref_err, _ = _brute(params, errors, target, widths)
        assert a.exact and all(b in widths for b in a.bits)
        assert sum(b * p for b, p in zip(a.bits, params)) <= Fraction(target) * sum(params)
        assert a.average <= target
        assert a.error == pytest.approx(ref_err, rel=1e-12, abs=1e-12), (params, errors, target)
        assert a.error == pytest.approx(sum(e[b] for e, b in zip(errors, a.bits)), rel=1e-12)


def test_knapsack_uses_the_exact_budget_and_ties():
    # equal-size layers: 3.25 = (4+3+3+3)/4 is met exactly, the 4 bits going to the layer whose
    # error falls most
    errs = [{3: 1.0, 4: 0.9}, {3: 5.0, 4: 1.0}, {3: 1.0, 4: 0.8}, {3: 1.0, 4: 0.95}]
    a = allocate_knapsack([10] * 4, errs, 3.25, widths=(3, 4))
    assert a.bits == [3, 4, 3, 3] and a.average == 3.25
    # a target that is an exact average counts as met (equality)
    a = allocate_knapsack([1, 3], [{2: 1.0, 4: 0.0}, {2: 3.0, 4: 0.0}], 3.5, widths=(2, 4))
    assert a.bits == [2, 4] and a.average == 3.5
    # ties: equal errors at two widths -> the lower width
    a = allocate_knapsack([1], [{3: 1.0, 4: 1.0}], 4, widths=(3, 4))
    assert a.bits == [3]
    # a target above the widest width: every layer at its best width
    a = allocate_knapsack([1, 1], [{2: 3.0, 8: 0.0}] * 2, 9, widths=(2, 8))
    assert a.bits == [8, 8]


def test_knapsack_coarsened_never_above_target():
    rng = np.random.default_rng(1)
    params = [int(p) for p in rng.integers(1000, 5000, 12)]  # gcd 1 -> a large budget
    errors = [{w: float(np.exp(-w) * rng.uniform(0.5, 2)) for w in (2, 3, 4, 8)} for _ in params]
    exact = allocate_knapsack(params, errors, 3.3)
    coarse = allocate_knapsack(params, errors, 3.3, max_cells=2000)
    assert exact.exact and not coarse.exact
    for a in (exact, coarse):
        assert sum(b * p for b, p in zip(a.bits, params)) <= Fraction(3.3) * sum(params)
    assert exact.error <= coarse.error <= 1.2 * exact.error


def test_knapsack_errors():
    with pytest.raises(ValueError, match=r"bits=1.5 is unreachable with widths \(2, 3, 4, 8\)"):
        allocate_knapsack([1, 1], [{2: 1, 3: 1, 4: 1, 8: 1}] * 2, 1.5)
    with pytest.raises(ValueError, match="bits=2.9 is unreachable"):
        allocate_knapsack([1], [{3: 1, 4: 0}], 2.9, widths=(3, 4))
    with pytest.raises(ValueError, match="widths must be"):
        allocate_knapsack([1], [{5: 1}], 5, widths=(5,))
    with pytest.raises(ValueError, match="no entry for widths"):
        allocate_knapsack([1], [{3: 1}], 4, widths=(3, 4))
    with pytest.raises(ValueError, match="one error table per item"):
        allocate_knapsack([1, 2], [{3: 1}], 4, widths=(3,))


def test_measure_layer_errors_reference(torch_single_thread):
    """Errors against the plain-PyTorch quantiser (layerpress.reference) and the linears' inputs
    captured from the full-precision model's forward pass (float64)."""
    model = tiny_model("gpt2", layers=2)
    ids = calib_ids(4, 16)
    names, params, errors = measure_layer_errors(model, ids, widths=(2, 4), group_size=32, axis="auto")
    ad = adapter_for(model)
    mods = {f"{ad.block_name(bi)}.{n}": m for bi, b in enumerate(ad.blocks())
            for n, m in ad.linears(b).items()}
    assert names == list(mods)
    xs = {}
    hooks = [m.register_forward_hook(lambda mod, a, o, _n=n: xs.update({_n: a[0].detach()}))
             for n, m in mods.items()]
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    for name, p, table in zip(names, params, errors):
        W = weight_oi(mods[name]).double()
        X = xs[name].reshape(-1, W.shape[1]).double()
        assert p == W.numel()
        for bits in (2, 4):
            errs = []
            for axis in ("oc", "ic"):
                spec = QuantSpec(bits=bits, group_size=32, axis=axis)
                c, s, z = reference.quantize(W.float(), spec)
                Wq = reference.dequantize(c, s, z, spec).double()
                errs.append(((X @ (W - Wq).t()) ** 2).sum().item() / X.shape[0])
            assert table[bits] == pytest.approx(min(errs), rel=1e-4)
        assert table[2] > table[4] > 0


# ---- in the flow: quantize_model(allocation="knapsack"), effective bits, report --------------------

def test_quantize_model_knapsack_and_effective_bits(torch_single_thread):
    from layerpress.flows import quantize_model
    from layerpress.flows.report import block_table, layer_table, quantized_layers
    model = tiny_model("llama", layers=2)
    ids = calib_ids(4, 16)
    names, params, errors = measure_layer_errors(model, ids, widths=(2, 3, 4), group_size=32)
    want = allocate_knapsack(params, errors, 3.25, widths=(2, 3, 4))
    rep = quantize_model(model, bits=3.25, group_size=32, method="rtn", calib=ids,
                         allocation="knapsack", widths=(2, 3, 4))
    got = {name: m.spec.bits for name, m in quantized_layers(model)}
    assert got == dict(zip(names, want.bits)) == {lay.name: lay.bits for lay in rep.layers}
    assert rep.allocation == "knapsack" and rep.average_bits == pytest.approx(want.average)
    assert sum(b * p for b, p in zip(want.bits, params)) <= Fraction(3.25) * sum(params)
    assert len(set(want.bits)) > 1  # really mixed
    # effective bits: codes + fp16 scale + uint8 zero per group of 32 (asymmetric default)
    for lay in rep.layers:
        assert lay.effective_bits == pytest.approx(lay.bits + (16 + 8) / 32)
    w = [lay.in_features * lay.out_features for lay in rep.layers]
    assert rep.effective_bits == pytest.approx(
        sum((lay.bits + 0.75) * n for lay, n in zip(rep.layers, w)) / sum(w))
    assert "effective" in rep.summary() and "knapsack" in rep.summary()
    table = layer_table(rep)
    assert rep.layers[0].name in table and f"{rep.effective_bits:.3f} effective" in table
    assert "score (lim)" in block_table(rep)
    with pytest.raises(ValueError, match="bits=1.5 is unreachable"):
        quantize_model(tiny_model("llama"), bits=1.5, calib=ids, method="rtn", allocation="knapsack")
    with pytest.raises(ValueError, match="allocation must be"):
        quantize_model(tiny_model("llama"), bits=3.5, calib=ids, method="rtn", allocation="greedy")


def test_quantize_model_hessian_importance(torch_single_thread):
    from layerpress.flows import quantize_model
    from layerpress.flows.importance import hessian_scores, importance_order
    ids = calib_ids(2, 12)
    scores = hessian_scores(tiny_model("opt", layers=3), ids, batch_size=8)
    rep = quantize_model(tiny_model("opt", layers=3), bits=3.5, method="rtn", calib=ids,
                         importance="hessian", group_size=32)
    assert rep.importance == "hessian" and rep.block_scores == pytest.approx(scores)
    order = importance_order(scores, "hessian")
    assert rep.demoted == order[:len(rep.demoted)] and rep.average_bits <= 3.5


def test_plots(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from layerpress.flows import quantize_model
    from layerpress.flows.report import PlotsUnavailable, plot_report
    rep = quantize_model(tiny_model("opt", layers=2), bits=3.5, method="rtn", calib=calib_ids(2, 12),
                         importance="zd", group_size=32)
    paths = plot_report(rep, tmp_path / "plots")
    assert sorted(p.name for p in paths) == ["bits.png", "scores.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    assert sorted(os.listdir(tmp_path / "plots")) == ["bits.png", "scores.png"]  # no temp files
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    with pytest.raises(PlotsUnavailable, match="pip install matplotlib"):
        plot_report(rep, tmp_path / "none")


def test_hawq_layer_errors_and_knapsack_hessian(torch_single_thread):
    """HAWQ-V3 objective: t_l · ||W − Q(W)||² against the plain-PyTorch quantiser; negative
    trace estimates clamp to 0; quantize_model(allocation="knapsack", importance="hessian")
    allocates with it."""
    from layerpress.flows import quantize_model
    from layerpress.flows.allocate import hawq_layer_errors
    from layerpress.flows.importance import hessian_traces
    from layerpress.flows.report import quantized_layers
    model = tiny_model("opt", layers=2)
    ad = adapter_for(model)
    mods = {f"{ad.block_name(bi)}.{n}": m for bi, b in enumerate(ad.blocks())
            for n, m in ad.linears(b).items()}
    traces = {n: (0.5 + i) * (-1 if i == 3 else 1) for i, n in enumerate(mods)}
    names, params, errors = hawq_layer_errors(model, traces, widths=(2, 4), group_size=32)
    assert names == list(mods)
    for i, (name, table) in enumerate(zip(names, errors)):
        W = weight_oi(mods[name]).double()
        for bits in (2, 4):
            best = min((W - reference.dequantize(*reference.quantize(W.float(), s), s).double())
                       .pow(2).sum().item()
                       for s in (QuantSpec(bits=bits, group_size=32, axis=a) for a in ("oc", "ic")))
            want = 0.0 if i == 3 else traces[name] * best
            assert table[bits] == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match="no Hessian trace"):
        hawq_layer_errors(model, {}, widths=(2, 4), group_size=32)
    model = tiny_model("bert", layers=2)  # the encoder proxy's traces are positive: no ties at 0
    ids = calib_ids(2, 12)
    ht = hessian_traces(model, ids, batch_size=8)
    assert min(ht.linear.values()) > 0
    want = allocate_knapsack(*hawq_layer_errors(model, ht.linear, widths=(3, 4), group_size=32)[1:],
                             3.5, widths=(3, 4))
    rep = quantize_model(model, bits=3.5, method="rtn", calib=ids, importance="hessian",
                         allocation="knapsack", widths=(3, 4), group_size=32)
    assert [m.spec.bits for _, m in quantized_layers(model)] == want.bits
    assert rep.block_scores == pytest.approx(ht.block) and rep.average_bits <= 3.5


def test_effective_bits_count_side_paths(torch_single_thread):
    """Outliers and LoRC factors are stored bits too: effective bits = every stored tensor of the
    layer (state dict, bias and input permutation aside) per weight."""
    from layerpress.flows import quantize_model
    model = tiny_model("opt", layers=1)
    rep = quantize_model(model, bits=4, group_size=32, method="rtn", calib=calib_ids(2, 12),
                         outliers=0.01, lorc_rank=2)
    for lay in rep.layers:
        sd = model.get_submodule(lay.name).state_dict()
        assert set(sd) - {"qweight", "scales", "zeros", "bias", "in_perm"}  # side paths present
        stored = sum(t.numel() * t.element_size() for k, t in sd.items() if k not in ("bias", "in_perm"))
        nk = lay.in_features * lay.out_features
        assert lay.effective_bits == pytest.approx(8 * stored / nk)
        assert lay.effective_bits > 4 + 24 / 32 + 16 * 2 * (lay.in_features + lay.out_features) / nk
