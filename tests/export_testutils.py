"""Small models and a tokenizer for the export tests and scripts/check_llamacpp.py (imported, not a
test file): a byte-level BPE tokenizer trained here on a few sentences (no download), and tiny
Llama / Qwen2 models whose linears are replaced by RTN-quantised QuantLinear layers."""
from __future__ import annotations

import itertools

import torch
from torch import nn

from layerpress import QuantLinear, QuantSpec

GGUF_VOCAB = 320
TEXT = ["the quick brown fox jumps over the lazy dog", "layerpress exports quantised models",
        "to gguf for llama.cpp and to compressed tensors for vllm", "hello world 0123456789",
        "a model compressed with adadim serves wherever models are served"]


def tiny_bpe_tokenizer():
    """A byte-level BPE ``PreTrainedTokenizerFast`` (256 byte tokens, <s>, </s> and merges)."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(TEXT * 4, trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>")


def tiny_decoder(family: str = "llama", layers: int = 2, seed: int = 0, hidden: int = 128,
                 heads: int = 4, kv_heads: int = 2):
    import transformers as T

    torch.manual_seed(seed)
    common = dict(vocab_size=GGUF_VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                  max_position_embeddings=128, bos_token_id=0, eos_token_id=1,
                  tie_word_embeddings=False)
    if family == "llama":
        return T.LlamaForCausalLM(T.LlamaConfig(**common)).eval()
    if family == "mistral":
        return T.MistralForCausalLM(T.MistralConfig(**common)).eval()
    if family == "qwen2":
        return T.Qwen2ForCausalLM(T.Qwen2Config(**common)).eval()
    raise ValueError(family)


def quantise_linears(model: nn.Module, specs, skip=("lm_head",)) -> nn.Module:
    """Every nn.Linear except ``skip`` becomes an RTN QuantLinear, cycling through ``specs``."""
    cycle = itertools.cycle(specs)
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear) and name not in skip:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, QuantLinear.from_linear(mod, next(cycle)))
    return model


MIXED = [QuantSpec(4, 32), QuantSpec(4, 128, symmetric=True), QuantSpec(8, 64, symmetric=True),
         QuantSpec(3, 32), QuantSpec(2, -1, symmetric=True), QuantSpec(8, -1),
         QuantSpec(4, 64, scale_dtype=torch.bfloat16)]
