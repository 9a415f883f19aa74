"""Python face of ``torch.ops.layerpress.hadamard``: the randomised block-diagonal Walsh–Hadamard
transform ``y = x · diag(signs) · blockdiag(H_block) / sqrt(block)`` along the last dimension
(``transpose=True``: ``y = x · blockdiag(H_block) / sqrt(block) · diag(signs)``, the inverse when
the signs are ±1). Its fake (meta) implementation, its autograd (the transform is linear and
``H`` symmetric, so the backward is the same op with ``transpose`` flipped) and typed wrappers.

Schema in cpp/ops/hadamard_registration.cpp; kernels in cpp/kernels/hadamard_cpu_*.cpp and
cuda/kernels/hadamard_cuda.cu. The GEMM takes the same rotation as ``rot_signs``/``rot_block``
(:func:`layerpress.ops.gemm`).
"""
from __future__ import annotations

from typing import Optional

import torch

from .._errors import typed_errors
from .quant import call_below_autograd_if_no_grad as _below

_ops = torch.ops.layerpress

__all__ = ["hadamard", "random_signs"]


@torch.library.register_fake("layerpress::hadamard")
def _(x, block, signs=None, transpose=False):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup(ctx, inputs, output):
    x, block, signs, transpose = inputs
    ctx.save_for_backward(signs)
    ctx.block, ctx.transpose = block, transpose


def _backward(ctx, grad):
    (signs,) = ctx.saved_tensors
    if ctx.needs_input_grad[2]:
        raise RuntimeError("layerpress::hadamard has no gradient with respect to signs (they are a fixed "
                           "rotation); detach them")
    gx = _ops.hadamard(grad.contiguous(), ctx.block, signs, not ctx.transpose) if ctx.needs_input_grad[0] else None
    return gx, None, None, None


torch.library.register_autograd("layerpress::hadamard", _backward, setup_context=_setup)


@typed_errors
def hadamard(x: torch.Tensor, block: int, signs: Optional[torch.Tensor] = None,
             transpose: bool = False) -> torch.Tensor:
    """The randomised Walsh–Hadamard transform of ``x``'s rows (module docstring). ``block``: a
    power of two >= 16 dividing ``x.shape[-1]``; ``signs``: float32 ``[x.shape[-1]]`` or None."""
    return _below(_ops.hadamard, (x,), x, int(block), signs, bool(transpose))


def random_signs(n: int, seed: int) -> torch.Tensor:
    """``n`` random ±1 signs (float32) from ``seed``: the rotation's random diagonal. Saved files
    store the signs themselves, so this generator may change without breaking them."""
    g = torch.Generator().manual_seed(int(seed))
    return (torch.randint(0, 2, (n,), generator=g, dtype=torch.int64) * 2 - 1).to(torch.float32)
