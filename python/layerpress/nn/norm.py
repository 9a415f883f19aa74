"""Fused RMSNorm / LayerNorm modules on ``torch.ops.layerpress`` norm kernels.

Drop-in replacements for ``torch.nn.RMSNorm``, ``torch.nn.LayerNorm`` and Hugging Face
Llama/Qwen2/Mistral-style RMSNorm (``weight`` + ``variance_epsilon``): same parameter names, so
their state dicts load as they are, and ``from_module`` copies one. ``forward(x, residual=None)``
also runs the fused residual add: with a residual it returns ``(y, h)`` where ``h = x + residual``
and ``y = norm(h)``.

Numerics: statistics and the affine step in fp32 (fp64 for fp64 inputs), one rounding to the
input dtype at the end. The output has the dtype of ``x``; a weight of another dtype (e.g. fp32
weights with bf16 activations) is cast to ``x``'s dtype first. (HF's RMSNorm rounds the
normalised value to the input dtype before multiplying by the weight, and returns the weight's
dtype; outputs agree within one or two roundings of the input dtype.)
"""
from __future__ import annotations

import numbers
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..ops import norm as norm_ops

_Shape = Union[int, Sequence[int], torch.Size]

__all__ = ["FusedRMSNorm", "FusedLayerNorm", "is_rms_norm", "is_layer_norm", "fused_norm_from"]


def _shape(normalized_shape: _Shape) -> Tuple[int, ...]:
    if isinstance(normalized_shape, numbers.Integral):
        return (int(normalized_shape),)
    return tuple(int(s) for s in normalized_shape)


class _FusedNorm(nn.Module):
    def __init__(self, normalized_shape: _Shape, eps, elementwise_affine: bool, device, dtype):
        super().__init__()
        self.normalized_shape = _shape(normalized_shape)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(self.normalized_shape, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        nd = len(self.normalized_shape)
        if tuple(x.shape[x.dim() - nd:]) != self.normalized_shape or x.dim() < nd:
            raise ValueError(f"{type(self).__name__}: input of shape {tuple(x.shape)} does not end "
                             f"with normalized_shape {self.normalized_shape}")
        return x if nd == 1 else x.reshape(*x.shape[:x.dim() - nd], -1)

    @staticmethod
    def _param(p: Optional[torch.Tensor], x: torch.Tensor) -> Optional[torch.Tensor]:
        if p is None:
            return None
        p = p.reshape(-1)
        return p if p.dtype == x.dtype else p.to(x.dtype)


class FusedRMSNorm(_FusedNorm):
    """``y = x / sqrt(mean(x²) + eps) · weight`` over the trailing ``normalized_shape``.

    Same constructor as ``torch.nn.RMSNorm``; ``eps=None`` means ``torch.finfo(x.dtype).eps``
    like there. ``variance_epsilon`` is an alias of ``eps`` (the Hugging Face name).
    """

    def __init__(self, normalized_shape: _Shape, eps: Optional[float] = None,
                 elementwise_affine: bool = True, device=None, dtype=None):
        super().__init__(normalized_shape, eps, elementwise_affine, device, dtype)

    @property
    def variance_epsilon(self) -> Optional[float]:
        return self.eps

    @variance_epsilon.setter
    def variance_epsilon(self, v: float) -> None:
        self.eps = v

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)

    def _eps(self, x: torch.Tensor) -> float:
        return float(self.eps) if self.eps is not None else float(torch.finfo(x.dtype).eps)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None):
        shape = x.shape
        xf = self._flat(x)
        w = self._param(self.weight, x)
        if residual is None:
            return norm_ops.rms_norm(xf, w, self._eps(x)).reshape(shape)
        y, h = norm_ops.add_rms_norm(xf, residual.reshape(xf.shape), w, self._eps(x))
        return y.reshape(shape), h.reshape(shape)

    @classmethod
    def from_module(cls, m: nn.Module) -> "FusedRMSNorm":
        """From ``torch.nn.RMSNorm`` or an HF Llama/Qwen2-style RMSNorm (weights copied)."""
        if not is_rms_norm(m):
            raise TypeError(f"FusedRMSNorm.from_module: {type(m).__name__} is not a supported RMSNorm "
                            "(torch.nn.RMSNorm or an HF RMSNorm with weight and variance_epsilon)")
        w = getattr(m, "weight", None)
        shape = tuple(m.normalized_shape) if isinstance(m, nn.RMSNorm) else tuple(w.shape)
        eps = m.eps if isinstance(m, nn.RMSNorm) else m.variance_epsilon
        new = cls(shape, eps=eps, elementwise_affine=w is not None,
                  device=w.device if w is not None else None, dtype=w.dtype if w is not None else None)
        if w is not None:
            new.weight.data.copy_(w.detach())
            new.weight.requires_grad_(w.requires_grad)
        return new

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"


class FusedLayerNorm(_FusedNorm):
    """``y = (x − mean) / sqrt(var + eps) · weight + bias`` over the trailing ``normalized_shape``.
    Same constructor and state dict as ``torch.nn.LayerNorm``."""

    def __init__(self, normalized_shape: _Shape, eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, device=None, dtype=None):
        super().__init__(normalized_shape, eps, elementwise_affine, device, dtype)
        if elementwise_affine and bias:
            self.bias = nn.Parameter(torch.zeros(self.normalized_shape, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None):
        shape = x.shape
        xf = self._flat(x)
        w, b = self._param(self.weight, x), self._param(self.bias, x)
        if residual is None:
            return norm_ops.layer_norm(xf, w, b, float(self.eps)).reshape(shape)
        y, h = norm_ops.add_layer_norm(xf, residual.reshape(xf.shape), w, b, float(self.eps))
        return y.reshape(shape), h.reshape(shape)

    @classmethod
    def from_module(cls, m: nn.Module) -> "FusedLayerNorm":
        """From ``torch.nn.LayerNorm`` (weights copied)."""
        if not isinstance(m, nn.LayerNorm):
            raise TypeError(f"FusedLayerNorm.from_module expects an nn.LayerNorm, got {type(m).__name__}")
        w, b = m.weight, m.bias
        ref = w if w is not None else None
        new = cls(m.normalized_shape, eps=m.eps, elementwise_affine=m.elementwise_affine,
                  bias=b is not None, device=ref.device if ref is not None else None,
                  dtype=ref.dtype if ref is not None else None)
        if w is not None:
            new.weight.data.copy_(w.detach())
            new.weight.requires_grad_(w.requires_grad)
        if b is not None:
            new.bias.data.copy_(b.detach())
            new.bias.requires_grad_(b.requires_grad)
        return new

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"


def is_rms_norm(m: nn.Module) -> bool:
    """torch.nn.RMSNorm, FusedRMSNorm, or an HF RMSNorm computing ``weight · x/rms(x)``
    (Llama, Mistral, Qwen2, ...: a ``weight`` [hidden] and ``variance_epsilon``). Gemma-style
    ``(1 + weight)`` norms are not matched."""
    if isinstance(m, (nn.RMSNorm, FusedRMSNorm)):
        return True
    name = type(m).__name__
    return (name.endswith("RMSNorm") and "Gemma" not in name and hasattr(m, "variance_epsilon")
            and isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 1)


def is_layer_norm(m: nn.Module) -> bool:
    return isinstance(m, (nn.LayerNorm, FusedLayerNorm))


def fused_norm_from(m: nn.Module) -> Optional[nn.Module]:
    """The fused equivalent of a norm module (already-fused modules are returned as they are),
    or None when ``m`` is not a supported norm."""
    if isinstance(m, (FusedRMSNorm, FusedLayerNorm)):
        return m
    if isinstance(m, nn.LayerNorm):
        return FusedLayerNorm.from_module(m)
    if is_rms_norm(m):
        return FusedRMSNorm.from_module(m)
    return None
