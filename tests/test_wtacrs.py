"""WTA-CRS sampled matmul (issue 6): ops against torch references, the estimator's statistics
(unbiasedness, closed-form variance, variance below plain column-row sampling), the fallbacks,
memory kept for backward, opcheck, error messages, the modules and model surgery.

The statistical tests compare against confidence bounds computed from the sample variance of the
draws (Bonferroni-corrected z = 4.5 over the matrix entries), so they fail on a biased estimator
or a wrong variance, not by chance (false-alarm rate < 1e-4 per test)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from layerpress import QuantSpec
from layerpress.nn import LoRALinear, QuantLinear, WTACRSLinear
from layerpress.wtacrs import apply_lora, apply_wtacrs
from lp_testutils import TypedOps

ops = torch.ops.layerpress
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
Z = 4.5


@pytest.fixture(autouse=True)
def one_thread():
    """These tests make thousands of tiny op calls and train tiny models: run them on one thread
    (a parallel region per tiny call only adds synchronisation, painfully so on a loaded machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def heavy_tailed(m=96, d=12, n=10, seed=0):
    """Rows of H with log-normal (heavy-tailed) norms, a gradient G of unit-ish rows."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(m, d, generator=g, dtype=torch.float64)
    h = h / h.norm(dim=1, keepdim=True) * torch.exp(1.5 * torch.randn(m, 1, generator=g, dtype=torch.float64))
    grad = torch.randn(m, n, generator=g, dtype=torch.float64)
    return h.float(), grad.float()


def reference_c(norms: torch.Tensor, k: int) -> int:
    """The variance rule in plain Python: argmin_c (1 - P_C) / (k - c), first minimum."""
    p = sorted((float(v) / float(norms.sum()) for v in norms), reverse=True)
    best, best_c, cum = 1.0 / k, 0, 0.0
    for c in range(1, k):
        cum += p[c - 1]
        v = (1.0 - cum) / (k - c)
        if v < best - 1e-15:
            best, best_c = v, c
    return best_c


def estimates(h, grad, k, draws, seed0=1000):
    """WTA-CRS estimates of gradᵀ h (float64 [draws, N, D]) and the winner count."""
    norms = ops.wtacrs_row_norms(h)
    out = []
    for t in range(draws):
        idx, sc = ops.wtacrs_select(norms, k, seed0 + t)
        rows = ops.wtacrs_gather_scale(h, idx)
        out.append(ops.wtacrs_wgrad(grad, rows, idx, sc).double())
    return torch.stack(out)


def closed_form_wtacrs(h, grad, k, c):
    """E‖est − exact‖²_F = (1/s) [Σ_{j∉C} (1 − P_C)/p_j ‖A_j‖² − ‖Σ_{j∉C} A_j‖²], A_j = g_jᵀ h_j."""
    h, grad = h.double(), grad.double()
    norms = h.norm(dim=1)
    p = norms / norms.sum()
    order = torch.argsort(p, descending=True, stable=True)
    rest = order[c:]
    pc = p[order[:c]].sum()
    a2 = grad[rest].square().sum(1) * h[rest].square().sum(1)  # ‖g_jᵀ h_j‖²_F = ‖g_j‖²‖h_j‖²
    a_r = grad[rest].t() @ h[rest]
    return float(((1 - pc) / p[rest] * a2).sum() - a_r.square().sum()) / (k - c)


def closed_form_crs(h, grad, k):
    return closed_form_wtacrs(h, grad, k, 0)


# ---- ops against references ------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_ops_match_reference(dtype):
    torch.manual_seed(0)
    x = torch.randn(5, 37, 70).to(dtype)           # D = 70: a partial 64-column chunk
    grad = torch.randn(5, 37, 131).to(dtype)       # N = 131: partial 4-row tile and 64-row task
    x2, g2 = x.reshape(-1, 70).float(), grad.reshape(-1, 131).float()
    norms = ops.wtacrs_row_norms(x)
    torch.testing.assert_close(norms, x2.norm(dim=1), rtol=1e-5, atol=1e-5)
    idx, sc = ops.wtacrs_select(norms, 60, 7)
    assert idx.shape == (60,) and sc.shape == (60,) and idx.dtype == torch.int64 and sc.dtype == torch.float32
    rows = ops.wtacrs_gather_scale(x, idx)
    typed = TypedOps()  # the Python API's error types (raw ops carry a type tag instead)
    assert torch.equal(rows, x.reshape(-1, 70)[idx])
    scaled = ops.wtacrs_gather_scale(x, idx, sc)
    torch.testing.assert_close(scaled, (x2[idx] * sc[:, None]).to(dtype))
    dw = ops.wtacrs_wgrad(grad, rows, idx, sc)
    ref = (g2[idx] * sc[:, None]).t() @ rows.float()
    assert dw.dtype == dtype and dw.shape == (131, 70)
    tol = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(dw.float(), ref, rtol=tol, atol=tol * ref.abs().max().item())
    # non-contiguous rows of the activation (a strided view) are read correctly
    xs = torch.randn(40, 2, 70).to(dtype)[:, 0]
    torch.testing.assert_close(ops.wtacrs_row_norms(xs), xs.float().norm(dim=1), rtol=1e-5, atol=1e-5)


def test_select_structure_and_seed():
    h, _ = heavy_tailed()
    norms = ops.wtacrs_row_norms(h)
    k = 30
    idx, sc = ops.wtacrs_select(norms, k, 42)
    c = reference_c(norms, k)
    assert c > 0, "heavy-tailed norms should give winners"
    top = torch.argsort(norms, descending=True, stable=True)[:c]
    assert torch.equal(idx[:c], top) and torch.all(sc[:c] == 1)
    assert torch.all(sc[c:] != 1) and torch.all(sc[c:] > 0)
    assert not set(idx[c:].tolist()) & set(top.tolist()), "draws must come from outside the winners"
    p = norms.double() / norms.double().sum()
    expect = (1 - p[top].sum()) / ((k - c) * p[idx[c:]])
    torch.testing.assert_close(sc[c:].double(), expect, rtol=1e-5, atol=0)
    idx2, sc2 = ops.wtacrs_select(norms, k, 42)
    assert torch.equal(idx, idx2) and torch.equal(sc, sc2)
    idx3, _ = ops.wtacrs_select(norms, k, 43)
    assert not torch.equal(idx, idx3)


# ---- statistics ---------------------------------------------------------------------------------------

def test_unbiased_and_variance_matches_closed_form():
    h, grad = heavy_tailed()
    k, draws = 24, 3000
    exact = grad.double().t() @ h.double()
    est = estimates(h, grad, k, draws)
    # unbiased: every entry of the mean within Z standard errors of the exact product
    mean, se = est.mean(0), est.std(0) / math.sqrt(draws)
    z = (mean - exact).abs() / se.clamp_min(1e-12)
    assert z.max() < Z, f"max |z| = {z.max():.2f}: the estimator looks biased"
    # total variance E‖est − exact‖² against the closed form, bound from the sample variance
    err2 = (est - exact).square().sum((1, 2))
    c = reference_c(ops.wtacrs_row_norms(h), k)
    v = closed_form_wtacrs(h, grad, k, c)
    bound = Z * err2.std().item() / math.sqrt(draws)
    assert abs(err2.mean().item() - v) < bound, (err2.mean().item(), v, bound)


def test_variance_below_plain_crs_on_heavy_tails():
    h, grad = heavy_tailed(seed=3)
    k, draws = 24, 2000
    norms = ops.wtacrs_row_norms(h)
    c = reference_c(norms, k)
    assert c > 0
    v_wta, v_crs = closed_form_wtacrs(h, grad, k, c), closed_form_crs(h, grad, k)
    assert v_wta < 0.8 * v_crs, (v_wta, v_crs)
    # empirical: plain CRS (k draws with replacement, scale 1/(k p_j)) in torch
    exact = grad.double().t() @ h.double()
    p = norms.double() / norms.double().sum()
    gen = torch.Generator().manual_seed(5)
    crs = []
    for _ in range(draws):
        j = torch.multinomial(p, k, replacement=True, generator=gen)
        crs.append(((grad.double()[j] / (k * p[j])[:, None]).t() @ h.double()[j] - exact).square().sum())
    crs = torch.stack(crs)
    wta = (estimates(h, grad, k, draws, seed0=77) - exact).square().sum((1, 2))
    se = math.sqrt(crs.var().item() / draws + wta.var().item() / draws)
    assert crs.mean().item() - wta.mean().item() > Z * se * 0.5, (crs.mean(), wta.mean(), se)
    assert abs(crs.mean().item() - v_crs) < Z * crs.std().item() / math.sqrt(draws)


def test_no_winner_fallback_is_plain_crs():
    # equal norms: nothing beats 1/k, so |C| = 0 and every row is a draw with scale M/k
    torch.manual_seed(1)
    m, k = 50, 10
    h = torch.randn(m, 6)
    h = h / h.norm(dim=1, keepdim=True)
    grad = torch.randn(m, 4)
    norms = ops.wtacrs_row_norms(h)
    assert reference_c(norms, k) == 0
    idx, sc = ops.wtacrs_select(norms, k, 3)
    torch.testing.assert_close(sc, torch.full((k,), m / k), rtol=1e-5, atol=0)
    assert len(set(idx.tolist())) < k or True  # with replacement: repeats allowed
    exact = grad.double().t() @ h.double()
    est = estimates(h, grad, k, 1500, seed0=9)
    z = (est.mean(0) - exact).abs() / (est.std(0) / math.sqrt(1500))
    assert z.max() < Z
    # all-zero activations: zero gradient, no NaN
    zero = torch.zeros(m, 6)
    idx, sc = ops.wtacrs_select(ops.wtacrs_row_norms(zero), k, 1)
    dw = ops.wtacrs_wgrad(grad, ops.wtacrs_gather_scale(zero, idx), idx, sc)
    assert torch.isfinite(dw).all() and torch.all(dw == 0)
    # all mass in fewer rows than k: winners take it, the draws get scale 0, the result is exact
    few = torch.zeros(m, 6)
    few[:3] = torch.randn(3, 6)
    idx, sc = ops.wtacrs_select(ops.wtacrs_row_norms(few), k, 1)
    dw = ops.wtacrs_wgrad(grad, ops.wtacrs_gather_scale(few, idx), idx, sc)
    torch.testing.assert_close(dw, grad.t() @ few, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("how", ["ratio1", "min_k"])
def test_k_at_least_tokens_gives_exact_gradient(how):
    torch.manual_seed(0)
    lin = nn.Linear(32, 16)
    mod = WTACRSLinear.from_linear(lin, ratio=1.0) if how == "ratio1" else \
        WTACRSLinear.from_linear(lin, ratio=0.1, min_k=1000)
    x = torch.randn(3, 20, 32, requires_grad=True)
    mod(x).square().sum().backward()
    got = (lin.weight.grad.clone(), lin.bias.grad.clone(), x.grad.clone())
    lin.zero_grad()
    x.grad = None
    lin(x).square().sum().backward()
    for a, b in zip(got, (lin.weight.grad, lin.bias.grad, x.grad)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    idx, sc = ops.wtacrs_select(torch.rand(7), 10, 0)
    assert torch.equal(idx, torch.arange(7)) and torch.all(sc == 1)
    # an empty batch: no sampling, zero gradients
    empty = torch.randn(0, 5, 32, requires_grad=True)
    lin.zero_grad()
    mod(empty).sum().backward()
    assert torch.all(lin.weight.grad == 0)


def test_module_gradients_unbiased_exact_input_and_bias_grad():
    torch.manual_seed(0)
    lin = nn.Linear(24, 8)
    mod = WTACRSLinear.from_linear(lin, ratio=0.3, min_k=4)
    x = torch.randn(2, 40, 24) * torch.exp(torch.randn(2, 40, 1))
    gy = torch.randn(2, 40, 8)
    xr = x.clone().requires_grad_(True)
    lin(xr).backward(gy)
    exact_w, exact_b, exact_x = lin.weight.grad.clone(), lin.bias.grad.clone(), xr.grad.clone()
    draws, acc = 300, []
    for t in range(draws):
        lin.zero_grad()
        xi = x.clone().requires_grad_(True)
        y = mod(xi)
        torch.testing.assert_close(y, torch.nn.functional.linear(x, lin.weight, lin.bias))
        y.backward(gy)
        torch.testing.assert_close(xi.grad, exact_x)
        torch.testing.assert_close(lin.bias.grad, exact_b)
        acc.append(lin.weight.grad.double().clone())
    est = torch.stack(acc)
    z = (est.mean(0) - exact_w.double()).abs() / (est.std(0) / math.sqrt(draws)).clamp_min(1e-12)
    assert z.max() < Z


# ---- memory kept for backward --------------------------------------------------------------------

def saved_activation_bytes(module, x):
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    total = [0]

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x).sum().backward()
    return total[0]


def test_saved_bytes_ratio():
    torch.manual_seed(0)
    lin = nn.Linear(256, 128)
    x = torch.randn(8, 64, 256, requires_grad=True)
    full = saved_activation_bytes(lin, x)
    assert full == x.numel() * 4
    got = saved_activation_bytes(WTACRSLinear.from_linear(lin, ratio=0.3), x)
    assert got <= 0.32 * full, got / full


# ---- opcheck and errors ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_opcheck(dtype):
    torch.manual_seed(0)
    x = torch.randn(4, 9, 20).to(dtype)
    grad = torch.randn(4, 9, 12).to(dtype)
    norms = ops.wtacrs_row_norms(x)
    idx, sc = ops.wtacrs_select(norms, 11, 5)
    rows = ops.wtacrs_gather_scale(x, idx)
    typed = TypedOps()  # the Python API's error types (raw ops carry a type tag instead)
    torch.library.opcheck(ops.wtacrs_row_norms.default, (x,))
    torch.library.opcheck(ops.wtacrs_select.default, (norms, 11, 5))
    torch.library.opcheck(ops.wtacrs_select.default, (norms, 100, 5))
    torch.library.opcheck(ops.wtacrs_gather_scale.default, (x, idx, sc))
    torch.library.opcheck(ops.wtacrs_gather_scale.default, (x, idx, None))
    torch.library.opcheck(ops.wtacrs_wgrad.default, (grad, rows, idx, sc))
    torch.library.opcheck(ops.wtacrs_wgrad.default, (grad, rows, idx, None))
    torch.library.opcheck(ops.wtacrs_sample.default, (x, 11, torch.tensor(5)))


def test_bad_inputs():
    for r in (0, 0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="ratio"):
            WTACRSLinear(4, 4, ratio=r)
        with pytest.raises(ValueError, match="ratio"):
            apply_wtacrs(nn.Sequential(nn.Linear(4, 4)), ratio=r, targets=["0"])
    with pytest.raises(ValueError, match="min_k"):
        WTACRSLinear(4, 4, min_k=0)
    mod = WTACRSLinear(8, 4)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        mod(torch.randn(8))
    with pytest.raises(ValueError, match="in_features=8"):
        mod(torch.randn(3, 7))
    x, g = torch.randn(10, 8), torch.randn(10, 4)
    idx = torch.arange(5)
    rows = ops.wtacrs_gather_scale(x, idx)
    typed = TypedOps()  # the Python API's error types (raw ops carry a type tag instead)
    with pytest.raises(ValueError, match="x must have at least 2 dimensions"):
        typed.wtacrs_row_norms(torch.randn(8))
    with pytest.raises(ValueError, match=r"idx values must lie in \[0, 10\)"):
        typed.wtacrs_gather_scale(x, torch.tensor([0, 10]))
    with pytest.raises(TypeError, match="idx must be int64"):
        typed.wtacrs_gather_scale(x, idx.int())
    with pytest.raises(ValueError, match="scales must have shape"):
        typed.wtacrs_gather_scale(x, idx, torch.ones(4))
    with pytest.raises(ValueError, match="idx has 4 entries but rows has 5"):
        typed.wtacrs_wgrad(g, rows, idx[:4])
    with pytest.raises(TypeError, match="rows must have the dtype of grad"):
        typed.wtacrs_wgrad(g, rows.double(), idx)
    with pytest.raises(TypeError, match="grad must be float32"):
        typed.wtacrs_wgrad(g.int(), rows, idx)
    with pytest.raises(ValueError, match="k must be >= 1"):
        typed.wtacrs_select(torch.rand(5), 0, 1)
    with pytest.raises(ValueError, match="norms must be non-negative"):
        typed.wtacrs_select(-torch.rand(5), 2, 1)
    with pytest.raises(ValueError, match="norms must be 1-D"):
        typed.wtacrs_select(torch.rand(5, 2), 2, 1)
    with pytest.raises(ValueError, match="no nn.Linear"):
        apply_wtacrs(nn.Sequential(nn.Linear(4, 4)), targets=["nothing"])


# ---- modules: autocast, compile, LoRA, QLoRA ----------------------------------------------------------

def test_autocast_and_compile():
    torch.manual_seed(0)
    model = nn.Sequential(WTACRSLinear(32, 64), nn.ReLU(), WTACRSLinear(64, 4))
    x = torch.randn(4, 16, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert model[0].weight.grad.dtype == torch.float32 and torch.isfinite(model[0].weight.grad).all()
    model.zero_grad()
    compiled = torch.compile(model, backend="aot_eager")
    torch.manual_seed(3)
    out_c = compiled(x)
    out_c.sum().backward()
    g_c = model[0].weight.grad.clone()
    model.zero_grad()
    torch.manual_seed(3)
    model(x).sum().backward()   # same seed stream: same samples, same gradient
    torch.testing.assert_close(out_c, model(x))
    torch.testing.assert_close(g_c, model[0].weight.grad, rtol=1e-4, atol=1e-4)
    # the per-step seed is a graph input, not a constant: no recompilation from step to step
    from torch._dynamo.utils import counters
    compiled(x).sum().backward()
    graphs = counters["stats"]["unique_graphs"]
    for _ in range(3):
        compiled(x).sum().backward()
    assert counters["stats"]["unique_graphs"] == graphs


@pytest.mark.parametrize("base_kind", ["linear", "quant"])
def test_lora_and_qlora(exact_cpu_gemm_variant, base_kind):
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    base = lin if base_kind == "linear" else QuantLinear.from_linear(lin, QuantSpec(bits=4, group_size=32))
    lora = LoRALinear(base, r=4, alpha=8, ratio=0.3)
    nn.init.normal_(lora.lora_B.weight, std=0.1)
    assert isinstance(lora.lora_A, WTACRSLinear)
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable == ["lora_A.weight", "lora_B.weight"]
    x = torch.randn(3, 30, 64, requires_grad=True)
    y = lora(x)
    w_eff = (lin.weight if base_kind == "linear" else base.dequantized_weight())
    ref = x @ w_eff.t() + lin.bias + (x @ lora.lora_A.weight.t() @ lora.lora_B.weight.t()) * lora.scaling
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    gy = torch.randn_like(y)
    y.backward(gy)
    xr = x.detach().clone().requires_grad_(True)
    ref = xr @ w_eff.t() + (xr @ lora.lora_A.weight.detach().t() @ lora.lora_B.weight.detach().t()) * lora.scaling
    ref.backward(gy)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-4)   # exact input gradient
    assert lora.lora_A.weight.grad is not None and lora.lora_B.weight.grad is not None
    # the LoRA layer keeps only the compact rows of x (plus the small r-wide activation)
    x2 = torch.randn(4, 64, 64, requires_grad=True)
    full = LoRALinear(base, r=4, ratio=None)
    assert saved_activation_bytes(lora, x2) < 0.45 * saved_activation_bytes(full, x2)


# ---- Hugging Face models ------------------------------------------------------------------------------

transformers = pytest.importorskip("transformers")


def _tiny(kind, intermediate=48):
    t = transformers
    common = dict(vocab_size=64, hidden_size=32, num_attention_heads=2, intermediate_size=intermediate,
                  num_hidden_layers=2)
    if kind == "llama":
        return t.LlamaForCausalLM(t.LlamaConfig(num_key_value_heads=2, **common))
    if kind == "qwen2":
        return t.Qwen2ForCausalLM(t.Qwen2Config(num_key_value_heads=2, **common))
    if kind == "opt":
        return t.OPTForCausalLM(t.OPTConfig(vocab_size=64, hidden_size=32, num_attention_heads=2,
                                            ffn_dim=48, num_hidden_layers=2, word_embed_proj_dim=32,
                                            dropout=0.0, attention_dropout=0.0))
    if kind == "gpt2":
        return t.GPT2LMHeadModel(t.GPT2Config(vocab_size=64, n_embd=32, n_head=2, n_layer=2, n_inner=48,
                                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    return t.BertForMaskedLM(t.BertConfig(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                          **common))


EXPECTED = {
    "llama": {"self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"},
    "qwen2": {"self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"},
    "opt": {"self_attn.out_proj", "fc1", "fc2"},
    "gpt2": {"attn.c_proj", "mlp.c_fc", "mlp.c_proj"},
    "bert": {"attention.output.dense", "intermediate.dense", "output.dense"},
}


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_apply_wtacrs_hf(kind):
    torch.manual_seed(0)
    model = _tiny(kind).train()
    ids = torch.randint(0, 64, (2, 12))
    model.config.use_cache = False
    ref_out = model(input_ids=ids, labels=ids)
    ref_out.loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    names = apply_wtacrs(model, ratio=1.0)   # k = tokens: exact, so gradients must match
    layers = model.config.num_hidden_layers
    assert len(names) == layers * len(EXPECTED[kind])
    assert all(any(n.endswith(s) for s in EXPECTED[kind]) for n in names)
    assert not any(q in n for n in names for q in ("q_proj", "k_proj", "v_proj", "c_attn", "query", "key", "value"))
    out = model(input_ids=ids, labels=ids)
    torch.testing.assert_close(out.loss, ref_out.loss)
    out.loss.backward()
    for n, p in model.named_parameters():
        if n in ref_grads:
            torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-4, atol=1e-5, msg=n)
    # and at ratio 0.3 the model still trains: loss goes down on a fixed batch
    model2 = _tiny(kind).train()
    apply_wtacrs(model2, ratio=0.3, min_k=4)
    opt = torch.optim.Adam(model2.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = model2(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_apply_lora_qlora_llama():
    torch.manual_seed(0)
    model = _tiny("llama", intermediate=64).train()   # QuantLinear needs in_features % 32 == 0
    model.config.use_cache = False
    names = apply_lora(model, r=4, ratio=0.3, quant_spec=QuantSpec(bits=4, group_size=32))
    assert len(names) == 2 * 4
    assert isinstance(model.get_submodule(names[0]).base, QuantLinear)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    ids = torch.randint(0, 64, (2, 12))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("quant", [False, True])
def test_apply_lora_gpt2_conv1d(quant):
    """GPT-2's default targets are Conv1D layers: wrapped (quantised first with a spec); the
    output is unchanged at initialisation (B = 0) up to the quantisation, and it trains."""
    torch.manual_seed(0)
    t = transformers  # n_inner 64: QuantLinear needs in_features % 32 == 0
    model = t.GPT2LMHeadModel(t.GPT2Config(vocab_size=64, n_embd=32, n_head=2, n_layer=2, n_inner=64,
                                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).train()
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    spec = QuantSpec(bits=8, group_size=32) if quant else None
    names = apply_lora(model, r=4, ratio=None, quant_spec=spec)
    assert names and all(type(model.get_submodule(n)).__name__ == "LoRALinear" for n in names)
    assert all(isinstance(model.get_submodule(n).base, QuantLinear) == quant for n in names)
    with torch.no_grad():
        out = model(input_ids=ids).logits
    if quant:
        assert ((out - ref).norm() / ref.norm()).item() < 0.02
    else:
        torch.testing.assert_close(out, ref)
    model(input_ids=ids, labels=ids).loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and p.grad is not None for n, p in trainable)


def test_apply_lora_on_an_already_quantised_model():
    torch.manual_seed(0)
    model = _tiny("llama", intermediate=64).train()
    model.config.use_cache = False
    for name, mod in list(model.named_modules()):
        if type(mod) is nn.Linear and name.startswith("model.layers"):
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf,
                    QuantLinear.from_linear(mod, QuantSpec(bits=4, group_size=32)))
    names = apply_lora(model, r=4, ratio=0.3)
    assert len(names) == 2 * 4
    assert all(isinstance(model.get_submodule(n).base, QuantLinear) for n in names)
    ids = torch.randint(0, 64, (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and p.grad is not None for n, p in trainable)


def test_apply_lora_no_match_changes_nothing():
    model = _tiny("llama")
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(ValueError, match="no nn.Linear, QuantLinear or Conv1D module matches"):
        apply_lora(model, targets=["no_such_layer"])
    assert [p.requires_grad for p in model.parameters()] == flags


def test_peft_lora_down_projections():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = peft.get_peft_model(_tiny("llama"), peft.LoraConfig(
        r=4, target_modules=["o_proj", "gate_proj", "up_proj", "down_proj"]))
    names = apply_wtacrs(model)   # defaults to the adapters' lora_A for a peft model
    assert len(names) == 2 * 4 and all(n.endswith("lora_A.default") for n in names)
    assert all(isinstance(model.get_submodule(n), WTACRSLinear) for n in names)
    ids = torch.randint(0, 64, (2, 12))
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


# ---- CUDA (skipped without a GPU) ------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_cuda_ops_match_cpu(dtype):
    torch.manual_seed(0)
    x = (torch.randn(6, 50, 200) * torch.exp(torch.randn(6, 50, 1))).to(dtype)
    grad = torch.randn(6, 50, 130).to(dtype)
    xc, gc = x.cuda(), grad.cuda()
    norms, norms_c = ops.wtacrs_row_norms(x), ops.wtacrs_row_norms(xc)
    torch.testing.assert_close(norms_c.cpu(), norms, rtol=1e-4, atol=1e-4)
    idx, sc = ops.wtacrs_select(norms, 90, 11)
    idx_c, sc_c = ops.wtacrs_select(norms.cuda(), 90, 11)   # same weights, same seed
    assert (idx_c.cpu() == idx).float().mean() > 0.95
    rows_c = ops.wtacrs_gather_scale(xc, idx.cuda())
    assert torch.equal(rows_c.cpu(), ops.wtacrs_gather_scale(x, idx))
    torch.testing.assert_close(ops.wtacrs_gather_scale(xc, idx.cuda(), sc.cuda()).cpu(),
                               ops.wtacrs_gather_scale(x, idx, sc))
    dw_c = ops.wtacrs_wgrad(gc, rows_c, idx.cuda(), sc.cuda()).cpu().float()
    dw = ops.wtacrs_wgrad(grad, ops.wtacrs_gather_scale(x, idx), idx, sc).float()
    tol = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(dw_c, dw, rtol=tol, atol=tol * dw.abs().max().item())
    torch.library.opcheck(ops.wtacrs_wgrad.default, (gc, rows_c, idx.cuda(), sc.cuda()))
    lin = WTACRSLinear(200, 64, device="cuda", dtype=dtype)
    lin(xc.requires_grad_(True)).float().sum().backward()
    assert torch.isfinite(lin.weight.grad.float()).all()
