"""Modules that run on the layerpress kernels."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import ops
from .spec import Layout, QuantSpec

_CANONICAL_KEYS = ("qweight", "scales", "zeros")


def layout_for(device: torch.device) -> Layout:
    """The weight layout the GEMM kernels of a device read."""
    return Layout.CPU_BITPLANE16 if torch.device(device).type == "cpu" else Layout.CANONICAL


class QuantLinear(nn.Module):
    """A linear layer with a low-bit weight: ``y = x · dequant(W)ᵀ + b`` through
    ``torch.ops.layerpress.gemm``, with dequantisation fused into the product.

    The weight is held in the layout the current device's kernel reads (``layout``); the
    ``state_dict`` always carries the canonical layout of docs/format.md (``qweight`` int32
    ``[N, K*bits/32]``, ``scales``, ``zeros`` uint8 when asymmetric), so checkpoints do not depend
    on the device. The weight is frozen; gradients flow to the input (and the bias), so the
    layer can sit inside a model being fine-tuned (e.g. under LoRA adapters).
    """

    def __init__(self, in_features: int, out_features: int, spec: QuantSpec = QuantSpec(),
                 bias: bool = True, device=None, dtype: Optional[torch.dtype] = None):
        super().__init__()
        if not isinstance(spec, QuantSpec):
            raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
        spec.check_shape(out_features, in_features)
        self.in_features = in_features
        self.out_features = out_features
        self.spec = spec
        device = torch.device(device) if device is not None else torch.device("cpu")
        shape = spec.scale_shape(out_features, in_features)
        q = torch.zeros(out_features, in_features * spec.bits // 32, dtype=torch.int32, device=device)
        s = torch.ones(shape, dtype=spec.scale_dtype, device=device)
        z = None if spec.symmetric else torch.full(shape, 2 ** (spec.bits - 1), dtype=torch.uint8, device=device)
        self.register_buffer("qweight", None, persistent=False)
        self.register_buffer("scales", None, persistent=False)
        self.register_buffer("zeros", None, persistent=False)
        # Optional input-channel permutation (e.g. a GPTQ act-order g_idx made contiguous):
        # the layer computes x[..., in_perm] · dequant(W)ᵀ; None means the identity.
        self.register_buffer("in_perm", None, persistent=False)
        self.layout = Layout.CANONICAL
        self._set_canonical(q, s, z)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype or torch.float32))
        else:
            self.register_parameter("bias", None)

    # ---- construction ----------------------------------------------------------------------------
    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: QuantSpec = QuantSpec()) -> "QuantLinear":
        """Round-to-nearest quantisation of an ``nn.Linear`` (calibrated quantisers live in the
        compression flows)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        mod = cls(linear.in_features, linear.out_features, spec, bias=linear.bias is not None,
                  device=w.device, dtype=w.dtype if w.is_floating_point() else None)
        codes, s, z = ops.quantize(w.contiguous(), spec)
        mod._set_canonical(ops.pack(codes, spec.bits), s, z)
        if linear.bias is not None:
            mod.bias.data.copy_(linear.bias.detach())
        return mod

    @classmethod
    def from_quantized(cls, qweight, scales, zeros, spec: QuantSpec, bias=None,
                       in_perm=None) -> "QuantLinear":
        """From canonical tensors (e.g. produced by a calibrated quantiser). ``in_perm`` (integer
        ``[K]``, a permutation): the stored weight's input channels are ``x[..., in_perm]``."""
        n = qweight.shape[0]
        k = qweight.shape[1] * 32 // spec.bits
        mod = cls(k, n, spec, bias=bias is not None, device=qweight.device,
                  dtype=bias.dtype if bias is not None else None)
        mod._set_canonical(qweight, scales, zeros)
        mod.set_in_perm(in_perm)
        if bias is not None:
            mod.bias.data.copy_(bias)
        return mod

    def set_in_perm(self, in_perm) -> None:
        """Sets (or, with None, clears) the input permutation; checks it is a permutation of K."""
        if in_perm is not None:
            k = self.in_features
            if (not isinstance(in_perm, torch.Tensor) or in_perm.dtype.is_floating_point
                    or in_perm.dtype == torch.bool or tuple(in_perm.shape) != (k,)):
                got = (f"{in_perm.dtype} {list(in_perm.shape)}" if isinstance(in_perm, torch.Tensor)
                       else type(in_perm).__name__)
                raise ValueError(f"in_perm: expected an integer tensor [{k}], got {got}")
            in_perm = in_perm.to(device=self.qweight.device, dtype=torch.int64)
            if not torch.equal(torch.sort(in_perm).values, torch.arange(k, device=in_perm.device)):
                raise ValueError(f"in_perm: not a permutation of 0..{k - 1}")
        self.in_perm = in_perm

    # ---- layouts ---------------------------------------------------------------------------------
    def _check_canonical(self, q, s, z, where: str):
        n, k, spec = self.out_features, self.in_features, self.spec
        want_q = (n, k * spec.bits // 32)
        if q.dtype != torch.int32 or tuple(q.shape) != want_q:
            raise ValueError(f"{where}qweight: expected int32 {list(want_q)}, got {q.dtype} {list(q.shape)}")
        want_s = spec.scale_shape(n, k)
        if s.dtype != spec.scale_dtype or tuple(s.shape) != want_s:
            raise ValueError(f"{where}scales: expected {spec.scale_dtype} {list(want_s)}, "
                             f"got {s.dtype} {list(s.shape)}")
        if spec.symmetric:
            if z is not None:
                raise ValueError(f"{where}zeros: a symmetric spec has no zeros")
        elif z is None or z.dtype != torch.uint8 or tuple(z.shape) != want_s:
            got = "nothing" if z is None else f"{z.dtype} {list(z.shape)}"
            raise ValueError(f"{where}zeros: expected uint8 {list(want_s)}, got {got}")

    def _set_canonical(self, q, s, z):
        self._check_canonical(q, s, z, "")
        layout = layout_for(q.device)
        if layout != Layout.CANONICAL:
            q, s, z = ops.repack(q.contiguous(), s.contiguous(), None if z is None else z.contiguous(),
                                 self.spec, layout)
        self.qweight, self.scales, self.zeros = q, s, z
        self.layout = layout

    def canonical(self):
        """(qweight, scales, zeros) in the canonical layout."""
        if self.layout == Layout.CANONICAL:
            return self.qweight, self.scales, self.zeros
        return ops.unrepack(self.qweight, self.scales, self.zeros, self.spec, self.out_features, self.layout)

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        """The ``[N, K]`` weight the layer multiplies ``x`` by (input channels in ``x``'s order)."""
        q, s, z = self.canonical()
        w = ops.dequantize(q, s, z, self.spec, dtype)
        if self.in_perm is not None:
            w = torch.empty_like(w).index_copy_(1, self.in_perm, w)
        return w

    def _apply(self, fn, recurse=True):
        device = fn(torch.empty(0, dtype=torch.int32, device=self.qweight.device)).device
        if device != self.qweight.device:
            q, s, z = self.canonical()
            self._set_canonical(q.to(device), s.to(device), None if z is None else z.to(device))
        # The scales keep the spec's dtype whatever fn casts floating tensors to (e.g. .half()).
        scales = self._buffers.pop("scales")
        try:
            super()._apply(fn, recurse)
        finally:
            self._buffers["scales"] = scales
        return self

    # ---- state dict: always canonical ------------------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for key, t in zip(_CANONICAL_KEYS, self.canonical()):
            if t is not None:
                destination[prefix + key] = t if keep_vars else t.detach()
        if self.in_perm is not None:
            destination[prefix + "in_perm"] = self.in_perm

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        for key in _CANONICAL_KEYS + ("in_perm",):
            if prefix + key in unexpected_keys:
                unexpected_keys.remove(prefix + key)
        present = {k: state_dict.get(prefix + k) for k in _CANONICAL_KEYS}
        needed = ["qweight", "scales"] + ([] if self.spec.symmetric else ["zeros"])
        missing = [prefix + k for k in needed if present[k] is None]
        if missing:
            missing_keys.extend(missing)
            return
        if self.spec.symmetric and present["zeros"] is not None:
            unexpected_keys.append(prefix + "zeros")
            return
        device = self.qweight.device
        try:
            q, s = present["qweight"].to(device), present["scales"].to(device)
            z = None if present["zeros"] is None else present["zeros"].to(device)
            self._set_canonical(q, s, z)
            # The permutation is part of the stored weight: the state dict decides (absent = none).
            self.set_in_perm(state_dict.get(prefix + "in_perm"))
        except ValueError as e:
            error_msgs.append(f"{prefix}: {e} (spec {self.spec.to_dict()})")

    # ---- compute ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        if self.in_perm is not None:
            x = x.index_select(-1, self.in_perm)
        return ops.gemm(x, self.qweight, self.scales, self.zeros, bias, self.spec,
                        self.out_features, self.layout)

    def extra_repr(self) -> str:
        s = self.spec
        g = "whole" if s.group_size == -1 else s.group_size
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={s.bits}, "
                f"group_size={g}, axis={s.axis}, symmetric={s.symmetric}, "
                f"scale_dtype={str(s.scale_dtype).replace('torch.', '')}, bias={self.bias is not None}, "
                f"layout={self.layout.name.lower()}"
                + (", in_perm=True" if self.in_perm is not None else ""))


def quantize_linear(linear: nn.Linear, spec: QuantSpec = QuantSpec()) -> QuantLinear:
    """Shorthand for :meth:`QuantLinear.from_linear`."""
    return QuantLinear.from_linear(linear, spec)


from .norms import FusedLayerNorm, FusedRMSNorm  # noqa: E402,F401  (re-exported: layerpress.nn.*)
from .wtacrs import WTACRSLinear, WTACRSConv1D, LoRALinear  # noqa: E402,F401  (re-exported: layerpress.nn.*)
