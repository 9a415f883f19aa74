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

__all__ = ["ROTATE_CHOICES", "rotation_block_for", "layer_seed", "rotated_spec", "quantise_rotated"]

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
