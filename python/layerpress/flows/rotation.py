"""Rotated quantisation of one linear (QuIP#/QuaRot-style incoherence, block-diagonal randomised
Walsh–Hadamard as in GSR): quantise ``W·R`` with the Hessian ``Rᵀ H R`` -- GPTQ, RTN and the
clipping search then all work in the rotated basis -- and run the layer as ``(x·R)·Q(W·R)ᵀ``
(``QuantLinear`` with a rotated ``QuantSpec``; the GEMM rotates the activation rows).

``R = diag(s) · blockdiag(H_B) / sqrt(B)`` with random ±1 signs ``s`` drawn from a per-layer
seed (:func:`layer_seed`). ``B`` is the largest power of two <= ``block`` (>= 16) dividing K; a
layer with none keeps no rotation. ``quantize_model(rotate="auto")`` adds the rotated candidates
to AdaDim's axis candidates and keeps whichever gives the lower measured output error.
"""
from __future__ import annotations

import dataclasses
import zlib
from typing import Callable, Optional

import torch

from ..ops.rotation import hadamard, random_signs
from ..spec import QuantSpec

__all__ = ["ROTATE_CHOICES", "rotation_block_for", "layer_seed", "rotated_spec", "quantise_rotated", "fold_rotations"]

ROTATE_CHOICES = ("none", "hadamard", "auto")


def rotation_block_for(k: int, block: int) -> int:
    """The largest power of two ``b`` with 16 <= b <= block dividing ``k``; 0 when there is none."""
    b = 1 << (max(int(block), 1).bit_length() - 1)
    while b >= 16:
        if k % b == 0:
            return b
        b //= 2
    return 0


def layer_seed(seed: int, name: str) -> int:
    """A per-layer seed for the rotation's signs (stable across runs and processes)."""
    return (int(seed) * 1000003 + zlib.crc32(name.encode())) & 0x7FFFFFFF


def rotated_spec(spec: QuantSpec, k: int, block: int, seed: int) -> Optional[QuantSpec]:
    """``spec`` with a Hadamard rotation for a weight with ``k`` input features, or None when no
    block size fits ``k``."""
    b = rotation_block_for(k, block)
    if b == 0:
        return None
    return dataclasses.replace(spec, rotation="hadamard", rotation_block=b, rotation_seed=seed)


def quantise_rotated(W: torch.Tensor, H: torch.Tensor, spec: QuantSpec,
                     quantise: Callable[[torch.Tensor, QuantSpec, torch.Tensor], object]):
    """Quantises ``W [N, K]`` in the basis of ``spec``'s rotation: ``quantise(W·R, spec, RᵀHR)``.
    The result keeps the rotated codes and scales; its ``weight`` is mapped back to the original
    basis (``Q(W·R)·Rᵀ``, what the layer multiplies ``x`` by) and ``rot_signs`` holds the signs."""
    b = spec.rotation_block
    signs = random_signs(W.shape[1], spec.rotation_seed).to(W.device)
    wr = hadamard(W.float().contiguous(), b, signs)
    # RᵀHR: rows of H times R, then (H symmetric) the rows of (HR)ᵀ = RᵀH times R; in fp64
    hr = hadamard(H.double().contiguous(), b, signs)
    hr = hadamard(hr.t().contiguous(), b, signs)
    hr = (0.5 * (hr + hr.t())).to(H.dtype)
    res = quantise(wr, spec, hr)
    res.weight = hadamard(res.weight.float().contiguous(), b, signs, transpose=True)
    res.rot_signs = signs
    return res


# ---- folded rotations (QuaRot): free at run time -------------------------------------------------

def _pow2_block(n: int) -> int:
    """The largest power of two >= 16 dividing n (the whole of n when n is one); 0 if none."""
    return rotation_block_for(n, n)


def _rows_times(w: torch.Tensor, block: int, signs: torch.Tensor) -> torch.Tensor:
    """w (float64, [..., n]) · R along the last dimension."""
    return hadamard(w.contiguous(), block, signs)


def _fold_residual(plan, block: int, signs: torch.Tensor) -> None:
    """h ← h·Q on the residual stream: embeddings E·Q; readers W·Q; writers Qᵀ·W, b·Q."""
    from ..nn.linears import weight_oi
    readers = [lin for _, consumers in plan.norms for lin in consumers]
    for emb in plan.embeddings:
        emb.weight.data.copy_(_rows_times(emb.weight.data.double(), block, signs).to(emb.weight.dtype))
    for lin in readers:
        w = weight_oi(lin)
        w.copy_(_rows_times(w.double(), block, signs).to(w.dtype))
    for lin in plan.writers:
        w = weight_oi(lin)
        w.copy_(_rows_times(w.double().t(), block, signs).t().to(w.dtype))
        if getattr(lin, "bias", None) is not None:
            b = lin.bias.data
            b.copy_(_rows_times(b.double(), block, signs).to(b.dtype))


def _attention_pairs(model, family: str):
    """(v projection, output projection, head_dim) per attention layer, for the families whose
    value and output projections are separate linears."""
    if family in ("llama", "mistral", "qwen2", "qwen3"):
        base = model.model if hasattr(model, "model") else model
        for layer in base.layers:
            a = layer.self_attn
            yield a.v_proj, a.o_proj, a.head_dim
    elif family in ("opt", "opt-no-final-norm"):
        dec = model.model.decoder if hasattr(model, "model") else model.decoder
        for layer in dec.layers:
            a = layer.self_attn
            yield a.v_proj, a.out_proj, a.head_dim


def _fold_heads(model, family: str, seed: int) -> int:
    """Per attention head, v ← v·R_h and the output projection's input columns of that head
    ← ·R_h (one R_h for every head, so grouped-query attention stays consistent). Returns how
    many attention layers were rotated."""
    done = 0
    for v_proj, o_proj, hd in _attention_pairs(model, family):
        if _pow2_block(hd) != hd:
            continue  # head_dim not a power of two >= 16: no per-head Hadamard
        sv = random_signs(hd, seed).double().repeat(v_proj.weight.shape[0] // hd).float()
        so = random_signs(hd, seed).double().repeat(o_proj.weight.shape[1] // hd).float()
        wv = v_proj.weight.data
        wv.copy_(_rows_times(wv.double().t(), hd, sv).t().to(wv.dtype))
        if v_proj.bias is not None:
            v_proj.bias.data.copy_(_rows_times(v_proj.bias.data.double(), hd, sv).to(v_proj.bias.dtype))
        wo = o_proj.weight.data
        wo.copy_(_rows_times(wo.double(), hd, so).to(wo.dtype))
        done += 1
    return done


@torch.no_grad()
def fold_rotations(model, seed: int = 0, heads: bool = True) -> dict:
    """Folds QuaRot's rotations into the weights of a causal LM, exactly (up to float rounding):
    the norms' weights into the linears reading them (Pre-LN GPT-2/OPT: first converted to the
    equivalent Pre-RMSNorm model, flows/norms.py), then a randomised Hadamard rotation ``Q`` of
    the residual stream (embeddings ``E·Q``, linears reading it ``W·Q``, linears writing to it
    ``Qᵀ·W``: RMSNorm without weight commutes with ``Q``) and, with ``heads``, one per attention
    head on the values (``v_proj`` rows, the output projection's columns). Outliers of the
    residual stream and the value heads are spread over their dimensions before quantisation and
    nothing is added at run time. ``Q`` is block-diagonal when the hidden size is not a power of
    two (blocks of its largest power-of-two divisor >= 16). In place; returns what was folded."""
    from .norms import convert_pre_ln_to_rmsnorm, fold_norm_weights, norm_plan
    family = norm_plan(model).family
    if family in ("gpt2", "opt"):
        convert_pre_ln_to_rmsnorm(model)
    elif family == "opt-no-final-norm":
        raise NotImplementedError("fold_rotations: an OPT without a final LayerNorm is not supported")
    else:
        fold_norm_weights(model)
    plan = norm_plan(model)
    if any(lin is None for _, consumers in plan.norms for lin in consumers) or not all(c for _, c in plan.norms):
        raise ValueError("fold_rotations needs every norm to have a linear reading it (a causal LM with its head)")
    d = plan.embeddings[0].weight.shape[1] if plan.embeddings else 0
    block = _pow2_block(d)
    if block == 0:
        raise ValueError(f"fold_rotations: hidden size {d} has no power-of-two divisor >= 16")
    signs = random_signs(d, seed)
    _fold_residual(plan, block, signs)
    head_layers = _fold_heads(model, family, seed + 1) if heads else 0
    return {"family": family, "hidden": d, "residual_block": block, "head_layers": head_layers}
