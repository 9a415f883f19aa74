"""Norm flows on Hugging Face models built from configs (random weights, no download):
Pre-LN -> Pre-RMSNorm conversion of GPT-2 and OPT, folding norm weights, swapping norms for the
fused modules.

Tolerance rule: logits must agree within float rounding of the model's dtype,
|Δ| ≤ 64·eps(dtype)·max(1, max|logits|) (2.8e-14 in float64, 7.6e-6 in float32).
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from layerpress.flows import convert_pre_ln_to_rmsnorm, fold_norm_weights, fuse_norms
from layerpress.nn import FusedLayerNorm, FusedRMSNorm

transformers = pytest.importorskip("transformers")

VOCAB = 97


def _perturb(model: nn.Module, seed: int) -> nn.Module:
    """Random init leaves norms at γ=1, β=0 and biases at 0: randomise every 1-D parameter so
    folding and centring are really exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    return model


def gpt2(n_embd, n_layer, seed):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_embd=n_embd, n_layer=n_layer, n_head=4, vocab_size=VOCAB,
                                  n_positions=32, bos_token_id=0, eos_token_id=0,
                                  attn_implementation="eager")
    return _perturb(transformers.GPT2LMHeadModel(cfg), seed).eval()


def opt(hidden, layers, seed, proj_dim=None, pre_ln=True):
    torch.manual_seed(seed)
    cfg = transformers.OPTConfig(hidden_size=hidden, ffn_dim=2 * hidden, num_hidden_layers=layers,
                                 num_attention_heads=4, vocab_size=VOCAB, max_position_embeddings=32,
                                 word_embed_proj_dim=proj_dim or hidden, bos_token_id=0,
                                 eos_token_id=0, pad_token_id=1, do_layer_norm_before=pre_ln,
                                 attn_implementation="eager")
    return _perturb(transformers.OPTForCausalLM(cfg), seed).eval()


def llama_like(kind, seed):
    torch.manual_seed(seed)
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=32,
                  bos_token_id=0, eos_token_id=0, attn_implementation="eager")
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    return _perturb(model, seed).eval()


def logits(model, dtype=None):
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return model(ids).logits


def assert_same_logits(a, b):
    bound = 64 * torch.finfo(a.dtype).eps * max(1.0, b.abs().max().item())
    err = (a - b).abs().max().item()
    assert err <= bound, f"logits differ by {err:.3g} (bound {bound:.3g})"


MODELS = {
    "gpt2-64x2": lambda s: gpt2(64, 2, s),
    "gpt2-96x3": lambda s: gpt2(96, 3, s),
    "opt-64x2": lambda s: opt(64, 2, s),
    "opt-128x3": lambda s: opt(128, 3, s),
    "opt-64x2-proj48": lambda s: opt(64, 2, s, proj_dim=48),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(MODELS))
def test_convert_pre_ln_to_rmsnorm_keeps_logits(name, dtype):
    model = MODELS[name](len(name)).to(dtype)
    ref = logits(model)
    conv = convert_pre_ln_to_rmsnorm(copy.deepcopy(model))
    assert not any(isinstance(m, (nn.LayerNorm, FusedLayerNorm)) for m in conv.modules())
    assert sum(isinstance(m, FusedRMSNorm) for m in conv.modules()) == \
        sum(isinstance(m, nn.LayerNorm) for m in model.modules())
    assert_same_logits(logits(conv), ref)
    # the lm head was untied from the (now centred) token embedding
    assert conv.lm_head.weight is not conv.get_input_embeddings().weight


def test_convert_with_torch_rmsnorm():
    model = gpt2(64, 2, seed=3)
    ref = logits(model)
    conv = convert_pre_ln_to_rmsnorm(copy.deepcopy(model), fused=False)
    assert sum(isinstance(m, nn.RMSNorm) for m in conv.modules()) == 5
    assert not any(isinstance(m, nn.LayerNorm) for m in conv.modules())
    assert_same_logits(logits(conv), ref)


def test_converted_residual_stream_is_centred():
    model = convert_pre_ln_to_rmsnorm(gpt2(64, 2, seed=5))
    ids = torch.randint(0, VOCAB, (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
    for h in hs[:-1]:  # the last one is after the final norm
        assert h.mean(-1).abs().max().item() < 1e-5 * (1 + h.abs().max().item())


@pytest.mark.parametrize("name", ["gpt2-64x2", "opt-64x2", "opt-64x2-proj48", "llama", "qwen2"])
def test_fold_norm_weights_keeps_logits(name):
    model = llama_like(name, 11) if name in ("llama", "qwen2") else MODELS[name](11)
    model = model.double()
    ref = logits(model)
    folded = fold_norm_weights(copy.deepcopy(model))
    assert_same_logits(logits(folded), ref)
    for m in folded.modules():
        if isinstance(m, nn.LayerNorm) or type(m).__name__.endswith("RMSNorm"):
            assert torch.all(m.weight == 1)
            if getattr(m, "bias", None) is not None:
                assert torch.all(m.bias == 0)


@pytest.mark.parametrize("name", ["gpt2-64x2", "opt-64x2", "llama", "qwen2"])
def test_fuse_norms(name):
    model = llama_like(name, 13) if name in ("llama", "qwen2") else MODELS[name](13)
    n_norms = sum(isinstance(m, nn.LayerNorm) or type(m).__name__.endswith("RMSNorm")
                  for m in model.modules())
    ref = logits(model)
    fused = copy.deepcopy(model)
    assert fuse_norms(fused) == n_norms
    assert sum(isinstance(m, (FusedRMSNorm, FusedLayerNorm)) for m in fused.modules()) == n_norms
    # fp32 kernels vs PyTorch's own norms: a few float32 roundings per layer
    torch.testing.assert_close(logits(fused), ref, rtol=1e-4, atol=1e-5)
    assert fuse_norms(fused) == 0  # idempotent
    # conversion then fusion: still the same logits
    conv = convert_pre_ln_to_rmsnorm(copy.deepcopy(model)) if name.startswith(("gpt2", "opt")) else None
    if conv is not None:
        torch.testing.assert_close(logits(conv), ref, rtol=1e-4, atol=1e-5)


def test_unsupported_models():
    with pytest.raises(NotImplementedError, match="post-LN"):
        convert_pre_ln_to_rmsnorm(opt(64, 1, seed=0, pre_ln=False))
    with pytest.raises(NotImplementedError, match="supports pre-LN GPT-2 and OPT"):
        convert_pre_ln_to_rmsnorm(llama_like("llama", 0))
    with pytest.raises(ValueError, match="without LM"):
        convert_pre_ln_to_rmsnorm(transformers.GPT2Model(transformers.GPT2Config(
            n_embd=64, n_layer=1, n_head=4, vocab_size=VOCAB, n_positions=32)))
    with pytest.raises(NotImplementedError, match="no norm adapter"):
        fold_norm_weights(nn.Sequential(nn.Linear(4, 4)))
