"""LIM / ZD importance scores and fractional bit allocation."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from flows_testutils import calib_ids, tiny_model
from layerpress.flows.allocate import allocate_bits, bit_pair
from layerpress.flows.importance import (hessian_traces, importance_order, lim_scores, zd_score,
                                         zd_scores)
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


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_lim_every_block_matches_hooked_reference(family):
    """All blocks, the last included: block inputs/outputs hooked in one plain forward pass of
    the whole model (not the flow's capture/run_block), cosines in float64 numpy."""
    model = tiny_model(family, layers=3)
    ids = calib_ids(4, 16)
    scores = lim_scores(model, ids, batch_size=3)
    ad = adapter_for(model)
    seen = {}
    hooks = []
    for i, block in enumerate(ad.blocks()):
        hooks.append(block.register_forward_pre_hook(
            lambda m, a, kw, _i=i: seen.__setitem__(("in", _i), (a[0] if a else kw["hidden_states"]).detach()),
            with_kwargs=True))
        hooks.append(block.register_forward_hook(
            lambda m, a, o, _i=i: seen.__setitem__(("out", _i), (o[0] if isinstance(o, tuple) else o).detach())))
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    for i in range(3):
        a = seen[("in", i)].reshape(-1, seen[("in", i)].shape[-1]).numpy().astype(np.float64)
        b = seen[("out", i)].reshape(-1, a.shape[-1]).numpy().astype(np.float64)
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        assert scores[i] == pytest.approx(-cos.mean(), abs=1e-5)


def test_zd_conv1d_reference():
    """GPT-2's Conv1D linears (weight stored [in, out]) pool the same values."""
    model = tiny_model("gpt2", layers=2)
    for block, s in zip(adapter_for(model).blocks(), zd_scores(model)):
        w = np.concatenate([p.detach().numpy().ravel().astype(np.float64)
                            for n, p in block.named_parameters() if n.endswith("weight") and p.dim() == 2])
        assert s == pytest.approx((np.abs(w - w.mean()) / w.std(ddof=1) > 1).mean(), abs=1e-12)


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
    assert importance_order([0.1, 0.5, 0.3], "hessian") == [0, 2, 1]  # trace: high = important
    with pytest.raises(ValueError, match="importance must be one of"):
        importance_order([1.0], "fisher")


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


# ---- Hessian trace (Hutchinson) ------------------------------------------------------------------

def _micro_model(family):
    """A float64 model small enough for an exact Hessian of all its linear weights (eager
    attention so the reference needs no special attention kernel)."""
    import transformers as T
    torch.manual_seed(3)
    common = dict(vocab_size=32, hidden_size=4, intermediate_size=8, num_hidden_layers=2,
                  num_attention_heads=2, max_position_embeddings=16, attn_implementation="eager")
    if family == "bert":
        m = T.BertModel(T.BertConfig(**common))
    else:
        m = T.LlamaForCausalLM(T.LlamaConfig(num_key_value_heads=1, **common))
    return m.double().eval()


def _exact_hessian(model, ids, family):
    """(H, owner): the exact Hessian of the flow's loss with respect to the concatenated linear
    weights of all blocks (float64, torch.autograd.functional.hessian), and each entry's block."""
    from torch.func import functional_call
    ad = adapter_for(model)
    names, owner, flat = [], [], []
    for bi, block in enumerate(ad.blocks()):
        for n, m in ad.linears(block).items():
            names.append(f"{ad.block_name(bi)}.{n}.weight")
            owner += [bi] * m.weight.numel()
            flat.append(m.weight.detach().reshape(-1))
    theta0 = torch.cat(flat)
    shapes = [dict(model.named_parameters())[n].shape for n in names]
    with torch.no_grad():
        ref = None if family == "llama" else model(input_ids=ids).last_hidden_state

    def loss(theta):
        parts, i = {}, 0
        for n, shp in zip(names, shapes):
            parts[n] = theta[i:i + shp.numel()].reshape(shp)
            i += shp.numel()
        out = functional_call(model, parts, args=(), kwargs={"input_ids": ids})
        if family == "llama":  # mean next-token cross-entropy
            return torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 32),
                                                     ids[:, 1:].reshape(-1))
        y = out.last_hidden_state  # output distortion: (1/2T) sum_t ||y_t - y_t(W0)||^2
        return 0.5 * (y - ref).pow(2).sum() / (ids.numel())

    H = torch.autograd.functional.hessian(loss, theta0, vectorize=True)
    return H, torch.tensor(owner), theta0, loss


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_hessian_trace_replayed_probes_exact(family, torch_single_thread):
    """Each Hutchinson term is vᵀHv with H the exact Hessian: replaying the estimator's
    Rademacher probes (probe k from a generator seeded seed·1000003 + k, one tensor per linear
    weight in adapter order)
    against the exact float64 Hessian gives the same per-block and per-linear estimates."""
    model = _micro_model(family)
    ids = torch.randint(0, 32, (3, 6), generator=torch.Generator().manual_seed(5))
    H, owner, _, _ = _exact_hessian(model, ids, family)
    m = 4
    est = hessian_traces(model, ids, n_probes=m, batch_size=2, seed=7)
    ad = adapter_for(model)
    weights = [mm.weight for b in ad.blocks() for mm in ad.linears(b).values()]
    per_block = torch.zeros(2, dtype=torch.float64)
    for k in range(m):
        gen = torch.Generator().manual_seed(7 * 1_000_003 + k)  # the documented probe seeds
        v = torch.cat([(torch.randint(0, 2, w.shape, generator=gen) * 2 - 1).reshape(-1).double()
                       for w in weights])
        hv = H @ v
        for b in range(2):
            per_block[b] += (v * hv)[owner == b].sum() / m
    for b in range(2):
        # rel 1e-6: HF Llama runs RMSNorm and the rotary embedding in float32 even in a
        # float64 model, so the two float64 computations differ by float32 round-off there
        assert est.block_trace[b] == pytest.approx(per_block[b].item(), rel=1e-9 if family == "bert" else 1e-6)
        assert est.params[b] == int((owner == b).sum())
        assert est.block[b] == pytest.approx(est.block_trace[b] / est.params[b])
    # per-linear scores average to the block score (parameter-weighted)
    for bi, block in enumerate(ad.blocks()):
        lins = {f"{ad.block_name(bi)}.{n}": mm.weight.numel() for n, mm in ad.linears(block).items()}
        tot = sum(est.linear[n] * k for n, k in lins.items())
        assert tot / est.params[bi] == pytest.approx(est.block[bi], rel=1e-9)


def test_hessian_trace_converges_to_exact(torch_single_thread):
    """Hutchinson with m probes against the exact per-block trace. For one joint Rademacher
    probe v over all blocks, X_b = v_bᵀ(Hv)_b has mean Tr(H_bb) and variance
    2·Σ_{i≠j in b} H_ij² + Σ_{i in b, j not in b} H_ij²; the mean of m probes must lie within
    4 standard deviations of the exact trace (normal approximation: a false failure has
    probability ~6e-5; the seed is fixed, so the test is deterministic). On an untrained causal
    LM the Hessian is indefinite and dominated by off-diagonal terms, so Hutchinson needs far
    more probes there; the encoder proxy (PSD Gauss-Newton) shows convergence with few."""
    model = _micro_model("bert")
    ids = torch.randint(0, 32, (3, 6), generator=torch.Generator().manual_seed(5))
    H, owner, _, _ = _exact_hessian(model, ids, "bert")
    m = 64
    est = hessian_traces(model, ids, n_probes=m, batch_size=3, seed=1)
    assert est.loss == "output_distortion"
    off = H - torch.diag(torch.diag(H))
    for b in range(2):
        inb = owner == b
        exact = torch.diag(H)[inb].sum().item()
        var = 2 * off[inb][:, inb].pow(2).sum() + off[inb][:, ~inb].pow(2).sum()
        sd = (var / m).sqrt().item()
        assert abs(est.block_trace[b] - exact) <= 4 * sd, (b, est.block_trace[b], exact, sd)
        assert 4 * sd < 0.5 * abs(exact)  # the tolerance is tight enough to mean something
        assert est.block_stderr[b] == pytest.approx(sd, rel=0.5)  # the reported error is honest


def test_hessian_output_distortion_is_gauss_newton(torch_single_thread):
    """The encoder proxy's Hessian at W0 is JᵀJ/T (J: Jacobian of the last hidden states), an
    independent computation from first derivatives only; its trace is ||J||²/T."""
    model = _micro_model("bert")
    ids = torch.randint(0, 32, (2, 5), generator=torch.Generator().manual_seed(2))
    H, owner, theta0, _ = _exact_hessian(model, ids, "bert")
    from torch.func import functional_call
    ad = adapter_for(model)
    names = [f"{ad.block_name(bi)}.{n}.weight" for bi, b in enumerate(ad.blocks())
             for n in ad.linears(b)]
    shapes = [dict(model.named_parameters())[n].shape for n in names]

    def out(theta):
        parts, i = {}, 0
        for n, shp in zip(names, shapes):
            parts[n] = theta[i:i + shp.numel()].reshape(shp)
            i += shp.numel()
        return functional_call(model, parts, args=(), kwargs={"input_ids": ids}).last_hidden_state.reshape(-1)

    J = torch.autograd.functional.jacobian(out, theta0, vectorize=True)
    gn = J.t() @ J / ids.numel()
    assert torch.allclose(H, gn, atol=1e-10 * gn.abs().max().item() + 1e-14)
    m = 32
    est = hessian_traces(model, ids, n_probes=m, seed=0)
    off = gn - torch.diag(torch.diag(gn))
    for b in range(2):
        inb = owner == b
        exact = J[:, inb].pow(2).sum().item() / ids.numel()
        var = 2 * off[inb][:, inb].pow(2).sum() + off[inb][:, ~inb].pow(2).sum()
        assert abs(est.block_trace[b] - exact) <= 4 * (var / m).sqrt().item()  # as above


def test_hessian_traces_leave_model_unchanged_and_errors():
    model = tiny_model("gpt2", layers=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    est = hessian_traces(model, calib_ids(2, 8), n_probes=2)
    assert len(est.block) == 2 and all(np.isfinite(est.block))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="n_probes"):
        hessian_traces(model, calib_ids(2, 8), n_probes=0)
