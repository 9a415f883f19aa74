"""GGUF export (llama.cpp, Ollama, LM Studio) of Llama / Mistral / Qwen2-style models whose linears
are per-OC :class:`QuantLinear` layers, written with the ``gguf`` package's own writer,
vocabulary readers and tensor-name map (``pip install gguf``). docs/interop.md.

GGUF's legacy block types hold 32 consecutive weights of a row with one fp16 scale ``d``
(ggml's ``block_q4_0`` / ``block_q4_1`` / ``block_q8_0``):

* ``Q4_0`` (18 bytes): ``d``, then 16 bytes whose low nibbles are codes 0..15 and high nibbles
  codes 16..31; ``w = d·(q − 8)``;
* ``Q4_1`` (20 bytes): ``d``, ``m`` (fp16), the same 16 bytes; ``w = d·q + m``;
* ``Q8_0`` (34 bytes): ``d``, 32 int8 ``x``; ``w = d·x``.

Every layerpress group (32, 64, 128, 256 or a whole row: all multiples of 32) is a run of such
blocks repeating its scale, so a per-OC layer maps without requantising: symmetric ≤ 4-bit →
``Q4_0`` (``q4 = q − 2^(b−1) + 8``, exact), asymmetric ≤ 4-bit → ``Q4_1`` (``d = s``,
``m = fp16(−s·z)``: exact up to that one fp16 rounding of the block's offset), symmetric 8-bit →
``Q8_0`` (``x = q − 128``, exact), provided the scales are fp16 values (other scales are
rounded to fp16, and the error reported). 2- and 3-bit layers therefore take 4.5 / 5 bits per
weight in the file. Asymmetric 8-bit layers, layers with an input permutation, and any layer
when ``ggml_type`` asks for another type are requantised from our weights: to the legacy types
with the ``gguf`` package's quantiser, to the K-quants ``Q4_K`` / ``Q5_K`` / ``Q6_K`` (super-blocks
of 256 weights) with :mod:`.gguf_kquants` (the package cannot quantise them). A layer whose rows
are not a multiple of 256 long cannot be a K-quant: it falls back to the legacy type llama.cpp
picks (``Q4_K`` → ``Q5_0``, ``Q5_K`` → ``Q5_1``, ``Q6_K`` → ``Q8_0``), said in its report entry.
Per-IC layers, side paths and rotations are refused unless ``requantize`` (which then quantises
their effective weight). Every quantised tensor's error against our weight is reported.
"""
from __future__ import annotations

import collections
import os
import tempfile
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from torch import nn

from .. import ops
from ..nn import QuantLinear
from . import _common as C
from . import gguf_kquants as KQ

__all__ = ["export_gguf", "quantlinear_to_gguf", "ARCHITECTURES", "GGML_TYPES"]

#: Hugging Face model_type -> GGUF architecture (Mistral runs as llama in llama.cpp)
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
#: block types a layer can be requantised to: the legacy ones (the gguf package's quantiser) and
#: the K-quants (ours, :mod:`.gguf_kquants`)
GGML_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0") + KQ.KQUANT_TYPES
#: ``general.file_type`` of a file whose layers were requantised to a K-quant (llama.cpp's "S"
#: presets: every quantised linear of that type)
_KQUANT_FILE_TYPE = {"Q4_K": "MOSTLY_Q4_K_S", "Q5_K": "MOSTLY_Q5_K_S", "Q6_K": "MOSTLY_Q6_K"}
BLOCK = 32


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ImportError("export_gguf needs the 'gguf' package: pip install gguf") from None
    return gguf


def _per_block(t: torch.Tensor, g: int, k: int) -> torch.Tensor:
    """Per-group ``[N, K/g]`` -> per-32-block ``[N, K/32]`` (each group's value repeated)."""
    return t.repeat_interleave((k if g == -1 else g) // BLOCK, dim=1)


def _fp16_bytes(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.float16).contiguous().numpy().view(np.uint8).reshape(*t.shape, 2)


def _nibbles(q4: torch.Tensor) -> np.ndarray:
    """Codes ``[N, B, 32]`` (< 16) -> ggml's 16 bytes per block: low nibble code j, high j + 16."""
    q = q4.to(torch.uint8)
    return (q[..., :16] | (q[..., 16:] << 4)).contiguous().numpy()


def _exact_blocks(m: QuantLinear):
    """``(type name, uint8 [N, K/32·bytes])`` of a per-OC layer without ``in_perm`` that maps onto
    a block type with its own codes, or None (asymmetric 8-bit)."""
    spec, n, k = m.spec, m.out_features, m.in_features
    q, s, z = m.canonical()
    codes = ops.unpack(q, spec.bits).to(torch.int16).view(n, k // BLOCK, BLOCK)
    d = _per_block(s, spec.group_size, k).float()
    if spec.bits == 8:
        if z is not None:
            return None
        x = (codes - 128).to(torch.int8).numpy().view(np.uint8)
        return "Q8_0", np.concatenate([_fp16_bytes(d), x], axis=-1).reshape(n, -1)
    if z is None:  # w = s·(q − 2^(b−1)) = d·(q4 − 8)
        q4 = codes - 2 ** (spec.bits - 1) + 8
        return "Q4_0", np.concatenate([_fp16_bytes(d), _nibbles(q4)], axis=-1).reshape(n, -1)
    zb = _per_block(z, spec.group_size, k).float()
    d16 = d.to(torch.float16).float()
    # s·z is exact in fp32 (an fp16 times an 8-bit integer); m takes one fp16 rounding
    mins = -(d16 * zb)
    return "Q4_1", np.concatenate([_fp16_bytes(d16), _fp16_bytes(mins), _nibbles(codes)],
                                  axis=-1).reshape(n, -1)


def _type_for_bits(m: QuantLinear) -> str:
    if m.spec.bits == 8:
        return "Q8_0"
    return "Q4_0" if m.spec.symmetric else "Q4_1"


def quantlinear_to_gguf(layer: QuantLinear, ggml_type: Optional[str] = None, name: str = "layer"):
    """``(type name, uint8 blocks [N, bytes per row], how)`` of one layer: its own codes in the
    block type they fit (``how="exact"``; ``"fp16 offset"`` for Q4_1) unless ``ggml_type`` names
    another type, the layer is asymmetric 8-bit or has an ``in_perm``: then its effective weight
    is quantised to ``ggml_type`` (default Q8_0 / Q4_0 / Q4_1 by bits and symmetry) with the gguf
    package's quantiser, or ours for the K-quants (``how="requantized"``). A K-quant asked for a
    layer whose ``in_features`` is not a multiple of 256 gives its legacy fallback
    (:data:`.gguf_kquants.FALLBACK`, ``how="fallback"``). Per-IC layers and side paths are
    quantised the same way (callers refuse them unless asked)."""
    gguf = _gguf()
    if ggml_type is not None and ggml_type not in GGML_TYPES:
        raise ValueError(f"{name}: ggml_type {ggml_type!r} is not supported (expected one of {GGML_TYPES})")
    direct = None
    if not C.unrepresentable(layer) and layer.in_perm is None:
        direct = _exact_blocks(layer)
    if direct is not None and ggml_type in (None, direct[0]):
        qtype, blocks = direct
        how = "fp16 offset" if qtype == "Q4_1" else "exact"
        return qtype, blocks, how
    qtype = ggml_type or _type_for_bits(layer)
    how = "requantized"
    if qtype in KQ.KQUANT_TYPES and layer.in_features % KQ.QK_K:
        qtype, how = KQ.FALLBACK[qtype], "fallback"
    w = layer.effective_weight(torch.float32).contiguous().numpy()
    if qtype in KQ.KQUANT_TYPES:
        blocks, _ = KQ.quantize(w, qtype)
    else:
        blocks = gguf.quants.quantize(w, gguf.GGMLQuantizationType[qtype])
    return qtype, blocks, how


def _dequantize(blocks: np.ndarray, qtype: str) -> torch.Tensor:
    gguf = _gguf()
    return torch.from_numpy(np.ascontiguousarray(
        gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[qtype])))


# ---- model-level --------------------------------------------------------------------------------

def _qk_rows(n_head: int, n_rows: int) -> torch.Tensor:
    """The output-row order llama.cpp's ``llama`` architecture wants for q/k projections
    (convert_hf_to_gguf's ``permute``): Hugging Face keeps the two rotary halves of each head
    apart, llama.cpp interleaves them."""
    return torch.arange(n_rows).reshape(n_head, 2, n_rows // n_head // 2).transpose(1, 2).reshape(-1)


def _rope_theta(cfg) -> float:
    rp = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    kind = rp.get("rope_type", rp.get("type", "default")) if isinstance(rp, dict) else "default"
    if kind not in (None, "default"):
        raise ValueError(f"export_gguf: rope type {kind!r} is not supported (only plain RoPE)")
    theta = rp.get("rope_theta") if isinstance(rp, dict) else None
    return float(theta if theta is not None else getattr(cfg, "rope_theta", 10000.0))


def _add_tokenizer(writer, gguf, tokenizer, n_vocab: int, pre: Optional[str]) -> None:
    """The vocabulary through the gguf package's readers of a saved Hugging Face tokenizer
    (byte-level BPE -> ``gpt2``; SentencePiece-style BPE with byte fallback -> ``llama``),
    padded with unused ``[PAD<i>]`` tokens to the model's vocabulary size."""
    with tempfile.TemporaryDirectory() as tmp:
        if isinstance(tokenizer, (str, os.PathLike)):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
        if not hasattr(tokenizer, "save_pretrained"):
            raise TypeError("export_gguf: tokenizer must be a Hugging Face tokenizer or its "
                            f"directory, got {type(tokenizer).__name__}")
        tokenizer.save_pretrained(tmp)
        vocab = None
        for cls in (gguf.vocab.BpeVocab, gguf.vocab.LlamaHfVocab):
            try:
                vocab = cls(Path(tmp))
                break
            except FileNotFoundError:
                continue
        if vocab is None:
            raise ValueError("export_gguf: the tokenizer is neither a byte-level BPE nor a "
                             "byte-fallback BPE tokenizer with a tokenizer.json (the vocabularies "
                             "this exporter writes)")
        tokens, scores, types = [], [], []
        for text, score, ttype in vocab.all_tokens():
            tokens.append(text)
            scores.append(score)
            types.append(ttype)
        if len(tokens) > n_vocab:
            raise ValueError(f"export_gguf: the tokenizer has {len(tokens)} tokens, the model's "
                             f"embedding only {n_vocab}")
        for i in range(len(tokens), n_vocab):
            tokens.append(f"[PAD{i}]".encode())
            scores.append(-1000.0)
            types.append(gguf.TokenType.UNUSED)
        writer.add_tokenizer_model(vocab.tokenizer_model)
        if vocab.tokenizer_model == "gpt2":
            writer.add_tokenizer_pre(pre or "default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        gguf.SpecialVocab(Path(tmp), load_merges=vocab.tokenizer_model == "gpt2",
                          n_vocab=n_vocab).add_to_gguf(writer, quiet=True)


@C.exports_unfused
def export_gguf(model: nn.Module, path: Union[str, Path], tokenizer, requantize: bool = False,
                ggml_type: Optional[str] = None, float_type: str = "f16",
                tokenizer_pre: Optional[str] = None, overwrite: bool = False) -> dict:
    """Writes a Llama / Mistral / Qwen2 Hugging Face model (``model.config.model_type``) whose
    quantised linears are :class:`QuantLinear` layers as one GGUF file: architecture metadata,
    the vocabulary of ``tokenizer`` (a Hugging Face tokenizer or its directory;
    ``tokenizer_pre`` sets llama.cpp's pre-tokenizer name for BPE vocabularies, default
    ``"default"``), and the tensors under llama.cpp's names (q/k rows reordered for the
    ``llama`` architecture as llama.cpp's converter does). Quantised layers map as described in
    the module docstring; ``ggml_type`` (one of :data:`GGML_TYPES`) requantises every layer
    whose codes do not fit that type (a K-quant falls back to a legacy type for layers whose rows
    are not a multiple of 256 long, ``how="fallback"`` with a ``note``). Unquantised matrices are stored as ``float_type``
    (``"f16"`` or ``"f32"``), vectors as F32. Per-IC layers, 16-bit side paths and rotations are
    refused unless ``requantize``. Written atomically.

    Returns ``{"path", "architecture", "tensors": [{"tensor", "layer", "type", "how",
    "max_abs_error", "rel_error"[, "note"]}]}``; the errors compare the gguf package's dequantisation of
    each stored quantised tensor with the layer's effective weight."""
    gguf = _gguf()
    if float_type not in ("f16", "f32"):
        raise ValueError(f"export_gguf: float_type must be 'f16' or 'f32', got {float_type!r}")
    cfg = getattr(model, "config", None)
    mtype = getattr(cfg, "model_type", None)
    if mtype not in ARCHITECTURES:
        raise ValueError(f"export_gguf: model_type {mtype!r} is not supported (expected one of "
                         f"{sorted(ARCHITECTURES)})")
    arch = ARCHITECTURES[mtype]
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists (pass overwrite=True to replace it)")
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not layers:
        raise ValueError("export_gguf: the model has no QuantLinear layers: quantise it first")
    C.refuse_unrepresentable(layers, "gguf", requantize)

    n_layers, hidden = cfg.num_hidden_layers, cfg.hidden_size
    n_head = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_head
    head_dim = getattr(cfg, "head_dim", None) or hidden // n_head
    n_vocab = cfg.vocab_size
    arch_enum = next(a for a, nm in gguf.MODEL_ARCH_NAMES.items() if nm == arch)
    names = gguf.get_tensor_name_map(arch_enum, n_layers)

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    report = []
    try:
        w = gguf.GGUFWriter(tmp, arch)
        w.add_name(str(getattr(cfg, "name_or_path", "") or type(model).__name__))
        w.add_context_length(int(cfg.max_position_embeddings))
        w.add_embedding_length(hidden)
        w.add_block_count(n_layers)
        w.add_feed_forward_length(int(cfg.intermediate_size))
        w.add_head_count(n_head)
        w.add_head_count_kv(n_kv)
        w.add_rope_dimension_count(head_dim)
        if head_dim != hidden // n_head:
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
        w.add_rope_freq_base(_rope_theta(cfg))
        w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
        w.add_vocab_size(n_vocab)
        _add_tokenizer(w, gguf, tokenizer, n_vocab, tokenizer_pre)

        qtypes = collections.Counter()
        sd = C.float_tensors(model, layers)
        tied = bool(getattr(cfg, "tie_word_embeddings", False))
        items = [(k, v, None) for k, v in sd.items()] + [(f"{n}.weight", None, m) for n, m in layers.items()]
        for key, t, m in sorted(items, key=lambda x: x[0]):
            if key.endswith("rotary_emb.inv_freq"):
                continue
            if key == "lm_head.weight" and tied and m is None:
                continue  # llama.cpp uses token_embd when there is no output tensor
            gname = names.get_name(key, try_suffixes=(".weight", ".bias"))
            if gname is None:
                raise ValueError(f"export_gguf: no GGUF name for tensor {key!r} of a {mtype} model")
            heads = None
            if arch == "llama" and key.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
                heads = n_head
            elif arch == "llama" and key.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
                heads = n_kv
            if m is None:
                a = t.detach().float()
                if heads is not None:
                    a = a[_qk_rows(heads, a.shape[0])]
                dt = np.float16 if (a.dim() == 2 and float_type == "f16") else np.float32
                w.add_tensor(gname, a.contiguous().numpy().astype(dt))
                continue
            qtype, blocks, how = quantlinear_to_gguf(m, ggml_type, key[: -len(".weight")])
            ref = m.effective_weight(torch.float32)
            if heads is not None:
                rows = _qk_rows(heads, m.out_features)
                blocks, ref = blocks[rows.numpy()], ref[rows]
            err = C.weight_error(_dequantize(blocks, qtype), ref)
            entry = {"tensor": gname, "layer": key[: -len(".weight")], "type": qtype, "how": how, **err}
            if how == "fallback":
                entry["note"] = (f"{ggml_type} needs rows a multiple of {KQ.QK_K} long, this layer's "
                                 f"are {m.in_features}: {qtype} instead (as llama.cpp does)")
            report.append(entry)
            qtypes[qtype] += 1
            w.add_tensor(gname, np.ascontiguousarray(blocks),
                         raw_dtype=gguf.GGMLQuantizationType[qtype])
        main = ggml_type or qtypes.most_common(1)[0][0]
        w.add_file_type(int(getattr(gguf.LlamaFileType, _KQUANT_FILE_TYPE.get(main, f"MOSTLY_{main}"))))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return {"path": str(path), "architecture": arch, "tensors": report}
