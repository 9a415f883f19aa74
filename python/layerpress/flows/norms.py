"""Norm flows: fold norm weights into the linears that read them, convert Pre-LN transformers
to (exactly equivalent) Pre-RMSNorm ones, and swap norms for the fused layerpress modules.

Pre-LN -> Pre-RMSNorm (Jiang et al., "Pre-RMSNorm and Pre-CRMSNorm Transformers"): every
LayerNorm's γ, β are folded into the linears reading its output (``W ← W·diag(γ)``,
``b ← b + W·β``); the token/position embeddings are centred (each row minus its mean) and every
linear that writes to the residual stream is centred (``W ← (I − 11ᵀ/d)·W``, ``b ← b − mean(b)``),
so the residual stream stays zero-mean and each LayerNorm equals an RMSNorm with the same eps.
The logits are unchanged up to float rounding.

Supported families, through small adapters: GPT-2 (``Conv1D`` modules, weight ``[in, out]``), OPT
(pre-LN configs, ``do_layer_norm_before=True``, with or without ``project_in/out``); for
``fold_norm_weights`` also Llama/Mistral/Qwen2-style pre-RMSNorm models. A tied LM head is
untied (``config.tie_word_embeddings = False``) before anything is folded into it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch
from torch import nn

from ..nn.linears import weight_oi
from ..nn.norm import FusedLayerNorm, FusedRMSNorm, fused_norm_from, is_layer_norm, is_rms_norm

__all__ = ["fold_norm_weights", "convert_pre_ln_to_rmsnorm", "fuse_norms", "norm_plan"]


# ---- linear-like modules: nn.Linear ([out, in]) and HF Conv1D ([in, out]) -------------------------

def _ensure_bias(m: nn.Module) -> torch.Tensor:
    if getattr(m, "bias", None) is None:
        w = m.weight
        out = w.shape[0] if isinstance(m, nn.Linear) else w.shape[1]
        m.bias = nn.Parameter(torch.zeros(out, dtype=w.dtype, device=w.device))
    return m.bias.data


@torch.no_grad()
def _fold_into(norm: nn.Module, consumers: List[nn.Module]) -> None:
    """Fold norm's γ (and β) into every consumer, then reset the norm to γ = 1, β = 0."""
    gamma = getattr(norm, "weight", None)
    beta = getattr(norm, "bias", None) if is_layer_norm(norm) else None
    if gamma is None and beta is None:
        return
    if not consumers:
        raise ValueError(f"cannot fold {type(norm).__name__}: no linear reads its output")
    g = gamma.detach().double().reshape(-1) if gamma is not None else None
    bt = beta.detach().double().reshape(-1) if beta is not None else None
    for lin in consumers:
        w = weight_oi(lin)
        w64 = w.double()
        if bt is not None and bool((bt != 0).any()):
            bias = _ensure_bias(lin)
            bias.copy_((bias.double() + w64 @ bt).to(bias.dtype))
        if g is not None:
            w.copy_((w64 * g[None, :]).to(w.dtype))
    if gamma is not None:
        gamma.data.fill_(1.0)
    if beta is not None:
        beta.data.zero_()


@torch.no_grad()
def _centre_writer(lin: nn.Module) -> None:
    w = weight_oi(lin)
    w.copy_((w.double() - w.double().mean(0, keepdim=True)).to(w.dtype))
    if getattr(lin, "bias", None) is not None:
        b = lin.bias.data
        b.copy_((b.double() - b.double().mean()).to(b.dtype))


@torch.no_grad()
def _centre_embedding(emb: nn.Embedding) -> None:
    w = emb.weight.data
    w.copy_((w.double() - w.double().mean(1, keepdim=True)).to(w.dtype))


# ---- adapters ------------------------------------------------------------------------------------

@dataclass
class NormPlan:
    """Where the norms of a model sit: each norm with the linears reading it; the modules writing
    to the residual stream (embeddings, linears); the module owning a tied LM head."""
    family: str
    norms: List[tuple] = field(default_factory=list)          # (norm module, [consumer linears])
    embeddings: List[nn.Embedding] = field(default_factory=list)  # centred by the conversion
    writers: List[nn.Module] = field(default_factory=list)     # linears writing to the residual
    lm_head_owner: Optional[nn.Module] = None                 # module with .lm_head
    lm_head_tied_to: Optional[nn.Embedding] = None


def _config(model):
    return getattr(model, "config", None)


def norm_plan(model: nn.Module) -> NormPlan:
    """The adapter for a Hugging Face model (by ``config.model_type``)."""
    cfg = _config(model)
    mt = getattr(cfg, "model_type", None)
    head = getattr(model, "lm_head", None)
    if mt == "gpt2":
        base = getattr(model, "transformer", model)
        if getattr(cfg, "add_cross_attention", False):
            raise NotImplementedError("GPT-2 with cross-attention is not supported")
        p = NormPlan("gpt2")
        for blk in base.h:
            p.norms.append((blk.ln_1, [blk.attn.c_attn]))
            p.norms.append((blk.ln_2, [blk.mlp.c_fc]))
            p.writers += [blk.attn.c_proj, blk.mlp.c_proj]
        p.norms.append((base.ln_f, [head] if head is not None else []))
        p.embeddings = [base.wte, base.wpe]
        emb = base.wte
    elif mt == "opt":
        dec = model.model.decoder if hasattr(model, "model") else model.decoder
        if not getattr(cfg, "do_layer_norm_before", True):
            raise NotImplementedError("OPT with do_layer_norm_before=False is post-LN; only pre-LN "
                                      "models convert exactly")
        p = NormPlan("opt")
        for layer in dec.layers:
            a = layer.self_attn
            p.norms.append((layer.self_attn_layer_norm, [a.q_proj, a.k_proj, a.v_proj]))
            p.norms.append((layer.final_layer_norm, [layer.fc1]))
            p.writers += [a.out_proj, layer.fc2]
        if dec.final_layer_norm is not None:
            reader = dec.project_out if dec.project_out is not None else head
            p.norms.append((dec.final_layer_norm, [reader] if reader is not None else []))
        if dec.project_in is not None:
            p.writers.append(dec.project_in)
            p.embeddings = [dec.embed_positions]
        else:
            p.embeddings = [dec.embed_tokens, dec.embed_positions]
        emb = dec.embed_tokens
        if dec.final_layer_norm is None:
            p.family = "opt-no-final-norm"
    elif mt in ("llama", "mistral", "qwen2", "qwen3"):
        base = model.model if hasattr(model, "model") else model
        p = NormPlan(mt)
        for layer in base.layers:
            a, m = layer.self_attn, layer.mlp
            p.norms.append((layer.input_layernorm, [a.q_proj, a.k_proj, a.v_proj]))
            p.norms.append((layer.post_attention_layernorm, [m.gate_proj, m.up_proj]))
            p.writers += [a.o_proj, m.down_proj]
        p.norms.append((base.norm, [head] if head is not None else []))
        emb = base.embed_tokens
        p.embeddings = [emb]  # (pre-RMSNorm: nothing to centre; the rotation folding reads them)
    else:
        raise NotImplementedError(f"no norm adapter for model_type {mt!r} (supported: gpt2, opt, "
                                  "llama, mistral, qwen2, qwen3)")
    if head is not None:
        p.lm_head_owner = model
        if head.weight is emb.weight:
            p.lm_head_tied_to = emb
    return p


def _untie_head(model: nn.Module, plan: NormPlan) -> None:
    if plan.lm_head_tied_to is None:
        return
    head = plan.lm_head_owner.lm_head
    head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
    cfg = _config(model)
    if cfg is not None:
        cfg.tie_word_embeddings = False
        if hasattr(cfg, "get_text_config"):
            try:
                cfg.get_text_config().tie_word_embeddings = False
            except Exception:  # pragma: no cover - config layouts differ between versions
                pass
    plan.lm_head_tied_to = None


# ---- flows ---------------------------------------------------------------------------------------

@torch.no_grad()
def fold_norm_weights(model: nn.Module) -> nn.Module:
    """Fold every norm's γ (and β) into the linears reading it; the norms keep γ = 1, β = 0.
    A norm with no linear reading it (e.g. the final norm of a model without LM head) is left
    as it is. The model's outputs are unchanged up to float rounding. In place; returns model."""
    plan = norm_plan(model)
    _untie_head(model, plan)
    for norm, consumers in plan.norms:
        if consumers:
            _fold_into(norm, consumers)
    return model


def _replace(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    for name, m in model.named_modules():
        for child_name, child in m.named_children():
            if child is old:
                setattr(m, child_name, new)


@torch.no_grad()
def convert_pre_ln_to_rmsnorm(model: nn.Module, fused: bool = True) -> nn.Module:
    """Exact Pre-LN -> Pre-RMSNorm conversion of a GPT-2 or OPT (pre-LN) causal LM: fold γ/β,
    centre the embeddings and every linear writing to the residual stream, swap each LayerNorm
    for an RMSNorm without weight (``FusedRMSNorm`` when ``fused``, else ``torch.nn.RMSNorm``) with
    the LayerNorm's eps. Logits are unchanged up to float rounding. In place; returns model."""
    plan = norm_plan(model)
    if plan.family not in ("gpt2", "opt"):
        raise NotImplementedError(f"convert_pre_ln_to_rmsnorm supports pre-LN GPT-2 and OPT models, "
                                  f"got {plan.family}")
    for norm, consumers in plan.norms:
        if not is_layer_norm(norm):
            raise TypeError(f"expected LayerNorm, found {type(norm).__name__}")
        if not consumers:
            raise ValueError("the final LayerNorm has no linear reading it (a model without LM "
                             "head): its γ/β cannot be folded; convert the *ForCausalLM model")
    _untie_head(model, plan)
    for norm, consumers in plan.norms:
        _fold_into(norm, consumers)
    for emb in plan.embeddings:
        _centre_embedding(emb)
    for lin in plan.writers:
        _centre_writer(lin)
    for norm, _ in plan.norms:
        shape = tuple(norm.normalized_shape)
        new = (FusedRMSNorm(shape, eps=norm.eps, elementwise_affine=False) if fused
               else nn.RMSNorm(shape, eps=norm.eps, elementwise_affine=False))
        _replace(model, norm, new)
    return model


def fuse_norms(model: nn.Module) -> int:
    """Swap every ``torch.nn.LayerNorm``, ``torch.nn.RMSNorm`` and HF Llama/Qwen2-style RMSNorm
    in ``model`` for ``FusedLayerNorm`` / ``FusedRMSNorm`` (weights shared by copy). In place;
    returns the number of modules swapped."""
    swaps = []
    for name, m in model.named_modules():
        for child_name, child in m.named_children():
            if isinstance(child, (FusedLayerNorm, FusedRMSNorm)):
                continue
            if is_layer_norm(child) or is_rms_norm(child):
                swaps.append((m, child_name, child))
    for parent, child_name, child in swaps:
        setattr(parent, child_name, fused_norm_from(child))
    return len(swaps)
