"""Python face of ``torch.ops.layerpress.*``: fake (meta) implementations so that
``torch.compile`` traces the ops, autograd for the GEMM, and thin typed wrappers.

Schemas live in cpp/ops/registration.cpp; kernels per dispatch key in C++.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._errors import typed_errors
from ..spec import Layout, QuantSpec

_ops = torch.ops.layerpress

__all__ = ["TILE_ROWS", "register_no_gradient", "call_below_autograd_if_no_grad", "quantize",
           "pack", "unpack", "dequantize", "repack", "unrepack", "gemm", "gemm_t"]

TILE_ROWS = 16  # rows per tile of Layout.CPU_BITPLANE16


def _group(group_size: int, axis: int, n: int, k: int) -> int:
    if group_size != -1:
        return group_size
    return k if axis == 0 else n


def _scale_shape(axis: int, g: int, n: int, k: int):
    return (n, k // g) if axis == 0 else (k, n // g)


def _native_scale_shape(axis: int, g: int, n: int, k: int):
    tiles = (n + TILE_ROWS - 1) // TILE_ROWS
    return (tiles, k // g, TILE_ROWS) if axis == 0 else (n // g, k)


MMA_TILE_K, MMA_TILE_N = 16, 64  # tiles of Layout.CUDA_MMA


def _mma_shapes(axis: int, g: int, bits: int, n: int, k: int):
    strips = (n + MMA_TILE_N - 1) // MMA_TILE_N
    sshape = (strips, k // g, MMA_TILE_N) if axis == 0 else (strips, k, 2 if g == 32 else 1)
    return (strips, k // MMA_TILE_K, 32 * bits), sshape


def _layout_k(qweight, bits: int, layout: int) -> int:
    """in_features of a packed weight in `layout`."""
    if layout == Layout.CANONICAL:
        return qweight.shape[1] * 32 // bits
    if layout == Layout.CUDA_MMA:
        return qweight.shape[1] * MMA_TILE_K
    return qweight.shape[1] * 32


# ---- fakes ---------------------------------------------------------------------------------------

@torch.library.register_fake("layerpress::quantize")
def _(weight, bits, group_size, axis, symmetric, scale_dtype, scales=None, zeros=None):
    n, k = weight.shape
    shape = _scale_shape(axis, _group(group_size, axis, n, k), n, k)
    codes = weight.new_empty((n, k), dtype=torch.uint8)
    s = weight.new_empty(shape, dtype=scale_dtype)
    z = weight.new_empty((0,) if symmetric else shape, dtype=torch.uint8)
    return codes, s, z


@torch.library.register_fake("layerpress::pack")
def _(codes, bits):
    return codes.new_empty((codes.shape[0], codes.shape[1] * bits // 32), dtype=torch.int32)


@torch.library.register_fake("layerpress::unpack")
def _(qweight, bits):
    return qweight.new_empty((qweight.shape[0], qweight.shape[1] * 32 // bits), dtype=torch.uint8)


@torch.library.register_fake("layerpress::dequantize")
def _(qweight, scales, zeros, bits, group_size, axis, out_dtype=None):
    k = qweight.shape[1] * 32 // bits
    return qweight.new_empty((qweight.shape[0], k), dtype=out_dtype or scales.dtype)


@torch.library.register_fake("layerpress::repack")
def _(qweight, scales, zeros, bits, group_size, axis, layout):
    if layout == Layout.CANONICAL:  # a validated copy
        z = qweight.new_empty((0,), dtype=torch.uint8) if zeros is None else torch.empty_like(zeros)
        return torch.empty_like(qweight), torch.empty_like(scales), z
    n = qweight.shape[0]
    k = qweight.shape[1] * 32 // bits
    g = _group(group_size, axis, n, k)
    if layout == Layout.CUDA_MMA:
        qshape, sshape = _mma_shapes(axis, g, bits, n, k)
        z = qweight.new_empty((0,) if zeros is None else sshape, dtype=torch.uint8)
        return qweight.new_empty(qshape), scales.new_empty(sshape), z
    tiles = (n + TILE_ROWS - 1) // TILE_ROWS
    sshape = _native_scale_shape(axis, g, n, k)
    q = qweight.new_empty((tiles, k // 32, bits, TILE_ROWS))
    s = scales.new_empty(sshape)
    z = qweight.new_empty((0,) if zeros is None else sshape, dtype=torch.uint8)
    return q, s, z


@torch.library.register_fake("layerpress::unrepack")
def _(qweight, scales, zeros, bits, group_size, axis, layout, out_features):
    if layout == Layout.CANONICAL:  # a validated copy
        z = qweight.new_empty((0,), dtype=torch.uint8) if zeros is None else torch.empty_like(zeros)
        return torch.empty_like(qweight), torch.empty_like(scales), z
    n, k = out_features, _layout_k(qweight, bits, layout)
    g = _group(group_size, axis, n, k)
    sshape = _scale_shape(axis, g, n, k)
    q = qweight.new_empty((n, k * bits // 32))
    s = scales.new_empty(sshape)
    z = qweight.new_empty((0,) if zeros is None else sshape, dtype=torch.uint8)
    return q, s, z


@torch.library.register_fake("layerpress::gemm")
def _(x, qweight, scales, zeros, bias, bits, group_size, axis, layout, out_features, rot_signs=None,
      rot_block=0):
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.register_fake("layerpress::gemm_t")
def _(grad, qweight, scales, zeros, bits, group_size, axis, layout, out_features, rot_signs=None,
      rot_block=0):
    k = _layout_k(qweight, bits, layout)
    return grad.new_empty((*grad.shape[:-1], k))


# ---- autograd: gradient with respect to the input (and bias); the quantised weight is frozen ----

# The optional input rotation R (rot_signs, rot_block): gemm is x·R·Wᵀ, so its input gradient is
# G·W·Rᵀ, which is gemm_t with the same rotation (it applies Rᵀ to its output rows), and back.
def _gemm_setup_context(ctx, inputs, output):
    x, qweight, scales, zeros, bias, bits, group_size, axis, layout, out_features, *rot = inputs
    rot_signs, rot_block = (rot + [None, 0])[:2]
    ctx.save_for_backward(qweight, scales, zeros, rot_signs)
    ctx.params = (bits, group_size, axis, layout, out_features)
    ctx.rot_block = rot_block
    ctx.has_bias = bias is not None
    ctx.x_requires_grad = x.requires_grad


def _gemm_backward(ctx, grad):
    qweight, scales, zeros, rot_signs = ctx.saved_tensors
    bits, group_size, axis, layout, out_features = ctx.params
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = _ops.gemm_t(grad.contiguous(), qweight, scales, zeros, bits, group_size, axis,
                             layout, out_features, rot_signs, ctx.rot_block)
    if ctx.has_bias and ctx.needs_input_grad[4]:
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
    return grad_x, None, None, None, grad_bias, None, None, None, None, None, None, None


torch.library.register_autograd("layerpress::gemm", _gemm_backward, setup_context=_gemm_setup_context)


def _gemm_t_setup_context(ctx, inputs, output):
    grad, qweight, scales, zeros, bits, group_size, axis, layout, out_features, *rot = inputs
    rot_signs, rot_block = (rot + [None, 0])[:2]
    ctx.save_for_backward(qweight, scales, zeros, rot_signs)
    ctx.params = (bits, group_size, axis, layout, out_features)
    ctx.rot_block = rot_block


def _gemm_t_backward(ctx, g):
    # gemm_t(G) = G · W is linear in G; its adjoint is gemm without bias (double backward of gemm)
    qweight, scales, zeros, rot_signs = ctx.saved_tensors
    grad_in = None
    if ctx.needs_input_grad[0]:
        grad_in = _ops.gemm(g.contiguous(), qweight, scales, zeros, None, *ctx.params, rot_signs, ctx.rot_block)
    return (grad_in,) + (None,) * 10


torch.library.register_autograd("layerpress::gemm_t", _gemm_t_backward,
                                setup_context=_gemm_t_setup_context)


def register_no_gradient(qualname: str) -> None:
    """Autograd for an op that has no gradient (integer codes, packing, backward kernels,
    sampling): a backward through it raises an error naming the op, instead of torch's
    fallback warning and a gradient that is silently missing."""
    def setup_context(ctx, inputs, output):
        pass

    def backward(ctx, *grads):
        raise RuntimeError(f"{qualname} is not differentiable (layerpress registers no gradient "
                           "for it); detach its inputs, or see docs/api.md for the ops that have one")

    torch.library.register_autograd(qualname, backward, setup_context=setup_context)


for _name in ("quantize", "pack", "unpack", "dequantize", "repack", "unrepack"):
    register_no_gradient(f"layerpress::{_name}")


# ---- typed wrappers ------------------------------------------------------------------------------

# The Python autograd kernel that torch.library.register_autograd installs runs on every call,
# under torch.no_grad() too, and costs about 7 us (a tiny gemm: 12 us through it, 5 us below it).
# When no input needs a gradient the wrappers call below the Autograd key directly, which is what
# that kernel would do itself after its checks. Not while torch.compile traces (the graph calls
# the op normally), and only where this torch has the guard.
_BELOW_AUTOGRAD = getattr(torch._C, "_AutoDispatchBelowAutograd", None)


def call_below_autograd_if_no_grad(op, grad_inputs, *args):
    """``op(*args)``, skipping the Autograd key when none of ``grad_inputs`` needs a gradient."""
    if (_BELOW_AUTOGRAD is None or torch.compiler.is_compiling()
            or (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in grad_inputs))):
        return op(*args)
    with _BELOW_AUTOGRAD():
        return op(*args)


@typed_errors
def quantize(weight: torch.Tensor, spec: QuantSpec, scales: Optional[torch.Tensor] = None,
             zeros: Optional[torch.Tensor] = None):
    """Round-to-nearest quantisation of ``weight [N, K]``: min-max scales (the range always
    includes 0), or the given ``scales``/``zeros``. Returns ``(codes uint8 [N, K], scales,
    zeros uint8 or None)``."""
    codes, s, z = _ops.quantize(weight, spec.bits, spec.group_size, spec.axis_id, spec.symmetric,
                                spec.scale_dtype, scales, zeros)
    return codes, s, (None if spec.symmetric else z)


@typed_errors
def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes ``[N, K]`` -> canonical packed int32 ``[N, K*bits/32]``."""
    return _ops.pack(codes, bits)


@typed_errors
def unpack(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """Canonical packed int32 ``[N, K*bits/32]`` -> uint8 codes ``[N, K]``."""
    return _ops.unpack(qweight, bits)


@typed_errors
def dequantize(qweight, scales, zeros, spec: QuantSpec, out_dtype: Optional[torch.dtype] = None):
    """Canonical packed weight -> dense ``[N, K]`` ``(q - z) * s`` (computed in fp32)."""
    return _ops.dequantize(qweight, scales, zeros, spec.bits, spec.group_size, spec.axis_id, out_dtype)


@typed_errors
def repack(qweight, scales, zeros, spec: QuantSpec, layout: int = Layout.CPU_BITPLANE16):
    """Canonical (qweight, scales, zeros) -> a kernel-native layout. Returns the triple
    (zeros None when symmetric)."""
    q, s, z = _ops.repack(qweight, scales, zeros, spec.bits, spec.group_size, spec.axis_id, int(layout))
    return q, s, (None if zeros is None else z)


@typed_errors
def unrepack(qweight, scales, zeros, spec: QuantSpec, out_features: int,
             layout: int = Layout.CPU_BITPLANE16):
    """Inverse of :func:`repack`: a kernel-native triple back to the canonical layout."""
    q, s, z = _ops.unrepack(qweight, scales, zeros, spec.bits, spec.group_size, spec.axis_id,
                            int(layout), out_features)
    return q, s, (None if zeros is None else z)


@typed_errors
def gemm(x, qweight, scales, zeros, bias, spec: QuantSpec, out_features: int,
         layout: int = Layout.CPU_BITPLANE16, rot_signs: Optional[torch.Tensor] = None, rot_block: int = 0):
    """``Y = X · dequant(W)ᵀ (+ bias)`` with the weight in a kernel-native layout. With a rotation
    (``rot_block > 0``; ``rot_signs`` float32 ``[K]`` or None) the stored weight is ``W·R`` and
    ``Y = (X·R) · dequant(W·R)ᵀ``, ``R = diag(rot_signs) · blockdiag(H_rot_block) / sqrt(rot_block)``
    (:func:`layerpress.ops.rotation.hadamard`)."""
    return call_below_autograd_if_no_grad(_ops.gemm, (x, bias), x, qweight, scales, zeros, bias, spec.bits,
                                          spec.group_size, spec.axis_id, int(layout), out_features,
                                          rot_signs, int(rot_block))


@typed_errors
def gemm_t(grad, qweight, scales, zeros, spec: QuantSpec, out_features: int,
           layout: int = Layout.CPU_BITPLANE16, rot_signs: Optional[torch.Tensor] = None, rot_block: int = 0):
    """``G · dequant(W)`` -- the input gradient of :func:`gemm` (with a rotation: ``G · dequant(W·R) · Rᵀ``)."""
    return call_below_autograd_if_no_grad(_ops.gemm_t, (grad,), grad, qweight, scales, zeros, spec.bits,
                                          spec.group_size, spec.axis_id, int(layout), out_features,
                                          rot_signs, int(rot_block))
