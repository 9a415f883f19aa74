"""Python face of the fused norm ops (``torch.ops.layerpress.{rms_norm, add_rms_norm, layer_norm,
add_layer_norm}`` and their ``*_backward`` ops): fake (meta) implementations so ``torch.compile``
traces them, autograd (input, weight and bias gradients; the fused variants pass the gradient of
``h`` through), and typed wrappers that return only what callers need.

Schemas live in cpp/ops/norm_registration.cpp; kernels in cpp/kernels/norm_cpu_*.cpp and
cuda/kernels/norm_cuda.cu. ``mean``/``rstd`` are float32 (float64 for float64 inputs) of shape
``x.shape[:-1]``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .._errors import typed_errors
from .quant import call_below_autograd_if_no_grad as _below, register_no_gradient

_ops = torch.ops.layerpress

__all__ = ["rms_norm", "add_rms_norm", "layer_norm", "add_layer_norm"]


def _stat(x: torch.Tensor) -> torch.Tensor:
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.new_empty(x.shape[:-1], dtype=dt)


def _empty_grad(x: torch.Tensor, want: bool) -> torch.Tensor:
    return x.new_empty((x.shape[-1] if want else 0,))


# ---- fakes ---------------------------------------------------------------------------------------

@torch.library.register_fake("layerpress::rms_norm")
def _(x, weight, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format), _stat(x)


@torch.library.register_fake("layerpress::add_rms_norm")
def _(x, residual, weight, eps):
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    return y, torch.empty_like(y), _stat(x)


@torch.library.register_fake("layerpress::layer_norm")
def _(x, weight, bias, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format), _stat(x), _stat(x)


@torch.library.register_fake("layerpress::add_layer_norm")
def _(x, residual, weight, bias, eps):
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    return y, torch.empty_like(y), _stat(x), _stat(x)


@torch.library.register_fake("layerpress::rms_norm_backward")
def _(grad_y, x, weight, rstd, grad_h, weight_grad):
    return torch.empty_like(x, memory_format=torch.contiguous_format), _empty_grad(x, weight_grad)


@torch.library.register_fake("layerpress::layer_norm_backward")
def _(grad_y, x, weight, mean, rstd, grad_h, weight_grad, bias_grad):
    return (torch.empty_like(x, memory_format=torch.contiguous_format), _empty_grad(x, weight_grad),
            _empty_grad(x, bias_grad))


# ---- autograd ------------------------------------------------------------------------------------
# The statistics outputs (mean, rstd) are not differentiable; their incoming gradients are
# ignored. For the fused variants the gradient of h (the residual stream) is added to the
# normalisation's input gradient inside the backward kernel; x and residual get the same gradient.

def _rms_setup(ctx, inputs, output):
    x, weight, eps = inputs
    y, rstd = output
    ctx.mark_non_differentiable(rstd)
    ctx.save_for_backward(x, weight, rstd)


def _rms_backward(ctx, grad_y, grad_rstd):
    x, weight, rstd = ctx.saved_tensors
    wg = weight is not None and ctx.needs_input_grad[1]
    gx, gw = _ops.rms_norm_backward(grad_y, x, weight, rstd, None, wg)
    return (gx if ctx.needs_input_grad[0] else None), (gw if wg else None), None


torch.library.register_autograd("layerpress::rms_norm", _rms_backward, setup_context=_rms_setup)


def _add_rms_setup(ctx, inputs, output):
    x, residual, weight, eps = inputs
    y, h, rstd = output
    ctx.mark_non_differentiable(rstd)
    ctx.save_for_backward(h, weight, rstd)


def _add_rms_backward(ctx, grad_y, grad_h, grad_rstd):
    h, weight, rstd = ctx.saved_tensors
    wg = weight is not None and ctx.needs_input_grad[2]
    gx, gw = _ops.rms_norm_backward(grad_y, h, weight, rstd, grad_h, wg)
    return (gx if ctx.needs_input_grad[0] else None), (gx if ctx.needs_input_grad[1] else None), \
        (gw if wg else None), None


torch.library.register_autograd("layerpress::add_rms_norm", _add_rms_backward,
                                setup_context=_add_rms_setup)


def _ln_setup(ctx, inputs, output):
    x, weight, bias, eps = inputs
    y, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.has_bias = bias is not None


def _ln_backward(ctx, grad_y, grad_mean, grad_rstd):
    x, weight, mean, rstd = ctx.saved_tensors
    wg = weight is not None and ctx.needs_input_grad[1]
    bg = ctx.has_bias and ctx.needs_input_grad[2]
    gx, gw, gb = _ops.layer_norm_backward(grad_y, x, weight, mean, rstd, None, wg, bg)
    return (gx if ctx.needs_input_grad[0] else None), (gw if wg else None), (gb if bg else None), None


torch.library.register_autograd("layerpress::layer_norm", _ln_backward, setup_context=_ln_setup)


def _add_ln_setup(ctx, inputs, output):
    x, residual, weight, bias, eps = inputs
    y, h, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(h, weight, mean, rstd)
    ctx.has_bias = bias is not None


def _add_ln_backward(ctx, grad_y, grad_h, grad_mean, grad_rstd):
    h, weight, mean, rstd = ctx.saved_tensors
    wg = weight is not None and ctx.needs_input_grad[2]
    bg = ctx.has_bias and ctx.needs_input_grad[3]
    gx, gw, gb = _ops.layer_norm_backward(grad_y, h, weight, mean, rstd, grad_h, wg, bg)
    return (gx if ctx.needs_input_grad[0] else None), (gx if ctx.needs_input_grad[1] else None), \
        (gw if wg else None), (gb if bg else None), None


torch.library.register_autograd("layerpress::add_layer_norm", _add_ln_backward,
                                setup_context=_add_ln_setup)


# ---- typed wrappers ------------------------------------------------------------------------------

@typed_errors
def rms_norm(x: torch.Tensor, weight: Optional[torch.Tensor] = None, eps: float = 1e-6) -> torch.Tensor:
    """``x / sqrt(mean(x², -1) + eps) · weight`` over the last dimension (fp32 accumulation)."""
    return _below(_ops.rms_norm, (x, weight), x, weight, float(eps))[0]


@typed_errors
def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: Optional[torch.Tensor] = None,
                 eps: float = 1e-6) -> Tuple[torch.Tensor, torch.Tensor]:
    """``h = x + residual; y = rms_norm(h)``; returns ``(y, h)``."""
    y, h, _ = _below(_ops.add_rms_norm, (x, residual, weight), x, residual, weight, float(eps))
    return y, h


@typed_errors
def layer_norm(x: torch.Tensor, weight: Optional[torch.Tensor] = None,
               bias: Optional[torch.Tensor] = None, eps: float = 1e-5) -> torch.Tensor:
    """``(x − mean) / sqrt(var + eps) · weight + bias`` over the last dimension."""
    return _below(_ops.layer_norm, (x, weight, bias), x, weight, bias, float(eps))[0]


@typed_errors
def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: Optional[torch.Tensor] = None,
                   bias: Optional[torch.Tensor] = None, eps: float = 1e-5) -> Tuple[torch.Tensor, torch.Tensor]:
    """``h = x + residual; y = layer_norm(h)``; returns ``(y, h)``."""
    y, h, _, _ = _below(_ops.add_layer_norm, (x, residual, weight, bias), x, residual, weight, bias, float(eps))
    return y, h


for _name in ("rms_norm_backward", "layer_norm_backward"):  # no double backward
    register_no_gradient(f"layerpress::{_name}")
