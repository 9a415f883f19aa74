"""LIM / ZD importance scores and fractional bit allocation."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from flows_testutils import calib_ids, tiny_model
from layerpress.flows.allocate import allocate_bits, bit_pair
from layerpress.flows.importance import importance_order, lim_scores, zd_score, zd_scores
from layerpress.flows.models import adapter_for


@pytest.mark.parametrize("family", ["bert", "llama", "gpt2"])
def test_lim_matches_hidden_states_reference(family):
    model = tiny_model(family, layers=3)
    ids = calib_ids(6, 16)
    scores = lim_scores(model, ids, batch_size=4)
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
    # hidden_states[i] enters block i, hidden_states[i+1] leaves it (the last one may have the
    # final norm applied in decoder LMs, so only the blocks before it are compared there)
    n_cmp = 3 if family == "bert" else 2
    for i in range(n_cmp):
        a, b = hs[i].reshape(-1, hs[i].shape[-1]).numpy().astype(np.float64), \
            hs[i + 1].reshape(-1, hs[i].shape[-1]).numpy().astype(np.float64)
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        assert scores[i] == pytest.approx(-cos.mean(), abs=1e-5)


def test_zd_reference():
    model = tiny_model("opt", layers=2)
    ad = adapter_for(model)
    scores = zd_scores(model)
    for block, s in zip(ad.blocks(), scores):
        w = np.concatenate([m.weight.detach().numpy().ravel().astype(np.float64)
                            for m in ad.linears(block).values()])
        z = np.abs(w - w.mean()) / w.std(ddof=1)
        assert s == pytest.approx((z > 1).mean(), abs=1e-12)
    g = torch.Generator().manual_seed(0)
    assert zd_score([torch.randn(200000, generator=g)]) == pytest.approx(0.3173, abs=0.005)


def test_importance_order():
    assert importance_order([0.1, 0.5, 0.3], "lim") == [0, 2, 1]  # LIM: low = least important
    assert importance_order([0.1, 0.5, 0.3], "zd") == [1, 2, 0]   # ZD: high = least important
    with pytest.raises(ValueError):
        importance_order([1.0], "hessian")


def test_allocate_equal_blocks():
    a = allocate_bits([100] * 8, [7, 6, 5, 4, 3, 2, 1, 0], 3.25)
    assert a.average == pytest.approx(3.25) and a.demoted == [7, 6, 5, 4, 3, 2]
    assert a.bits == [4, 4, 3, 3, 3, 3, 3, 3]
    a = allocate_bits([100] * 8, list(range(8)), 3.3)  # not hit exactly: <= target, closest
    assert a.average == pytest.approx(3.25) and len(a.demoted) == 6
    a = allocate_bits([100] * 8, list(range(8)), 4)
    assert a.demoted == [] and a.average == 4
    a = allocate_bits([100] * 4, list(range(4)), 3)
    assert a.bits == [3, 3, 3, 3]


def test_allocate_weighted_and_reference():
    rng = np.random.default_rng(0)
    for trial in range(50):
        n = int(rng.integers(1, 10))
        params = [int(p) for p in rng.integers(1, 1000, n)]
        order = [int(i) for i in rng.permutation(n)]
        target = float(rng.uniform(2.0, 4.0))
        a = allocate_bits(params, order, target, high=4, low=2)
        # reference: shortest prefix of the order whose demotion brings the average <= target
        total = sum(params)
        for k in range(n + 1):
            bits = [4] * n
            for i in order[:k]:
                bits[i] = 2
            avg = sum(b * p for b, p in zip(bits, params)) / total
            if avg <= target + 1e-12:
                break
        assert a.bits == bits and a.average == pytest.approx(avg)
        assert a.average <= target + 1e-12


def test_allocate_errors():
    with pytest.raises(ValueError, match="unreachable"):
        allocate_bits([1, 1], [0, 1], 2.5, high=4, low=3)
    with pytest.raises(ValueError, match="not supported"):
        bit_pair(5.5)
    with pytest.raises(ValueError, match="permutation"):
        allocate_bits([1, 1], [0, 0], 3.5)
