"""AWQ ("gemm" packing, as AutoAWQ and transformers write it) <-> QuantLinear.

Layout of one linear ``W [N, K]`` with groups of ``G`` input channels (SPEC §4, docs/interop.md):

* ``qweight`` int32 ``[K, N/8]``: row ``k`` holds the 4-bit codes of ``W[:, k]``, eight output
  channels per word; nibble ``i`` (bits ``4i..4i+3``) of word ``j`` holds channel
  ``8j + AWQ_ORDER[i]``;
* ``qzeros`` int32 ``[K/G, N/8]``: the zero points, packed the same way;
* ``scales`` float16 ``[K/G, N]``; ``w = (q − z)·s``; optional ``bias`` ``[N]``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from .. import ops
from ..nn import QuantLinear
from ..spec import QuantSpec
from . import _common as C

__all__ = ["AWQ_ORDER", "awq_to_quantlinear", "quantlinear_to_awq", "load_awq", "export_awq",
           "check_awq_config"]

#: nibble i of an AWQ word holds output channel 8j + AWQ_ORDER[i]
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_AWQ_UNORDER = tuple(AWQ_ORDER.index(c) for c in range(8))  # channel c -> its nibble
BITS = 4


def _unpack_awq(words: torch.Tensor) -> torch.Tensor:
    """int32 ``[R, N/8]`` -> codes int64 ``[R, N]`` in channel order."""
    r, w = words.shape
    nibbles = C.unpack_bits(words, BITS, 8 * w).view(r, w, 8)
    return nibbles[..., list(_AWQ_UNORDER)].reshape(r, 8 * w)


def _pack_awq(codes: torch.Tensor) -> torch.Tensor:
    """codes ``[R, N]`` (N % 8 == 0) -> int32 ``[R, N/8]``."""
    r, n = codes.shape
    return C.pack_bits(codes.view(r, n // 8, 8)[..., list(AWQ_ORDER)].reshape(r, n), BITS)


def awq_to_quantlinear(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                       group_size: int, bias: Optional[torch.Tensor] = None,
                       name: str = "layer") -> QuantLinear:
    """One AWQ "gemm" layer as a :class:`QuantLinear` with exactly the same weights (per-OC,
    asymmetric, the scales' dtype). ``group_size`` -1 means one group per row; a group size
    that is not one of layerpress's (e.g. 512) is split into equal groups sharing its scale."""
    if qweight.dtype != torch.int32 or qweight.dim() != 2:
        raise ValueError(f"{name}.qweight: expected int32 [K, N/8], got "
                         f"{str(qweight.dtype).replace('torch.', '')} {list(qweight.shape)}")
    k, n = qweight.shape[0], qweight.shape[1] * 8
    gf = C.file_group(group_size, k)
    if k % gf:
        raise ValueError(f"{name}: in_features {k} is not a multiple of group_size {group_size}")
    ngroups = k // gf
    C.check_tensor(qzeros, f"{name}.qzeros", torch.int32, (ngroups, n // 8))
    if scales.dim() != 2 or tuple(scales.shape) != (ngroups, n):
        raise ValueError(f"{name}.scales: expected [{ngroups}, {n}], got {list(scales.shape)}")
    sdt = C.scale_dtype_of(scales, name)
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"{name}.bias: expected [{n}], got {list(bias.shape)}")
    g = C.our_group_size(group_size, k, name)
    spec = QuantSpec(bits=BITS, group_size=g, axis="oc", symmetric=False, scale_dtype=sdt)
    spec.check_shape(n, k)
    codes = _unpack_awq(qweight).t().to(torch.uint8).contiguous()  # [N, K]
    zeros = C.expand_groups(_unpack_awq(qzeros), gf, g, k).to(torch.uint8)
    s = C.expand_groups(scales, gf, g, k)
    return QuantLinear.from_quantized(ops.pack(codes, BITS), s, zeros, spec, bias=bias)


def quantlinear_to_awq(layer: QuantLinear, name: str = "layer") -> dict:
    """The AWQ tensors (``qweight``, ``qzeros``, ``scales`` float16, ``bias`` if any) of a
    4-bit per-OC :class:`QuantLinear`; a symmetric layer gets explicit zero points 8."""
    spec = layer.spec
    if spec.axis != "oc":
        raise ValueError(f"{name}: per-IC (axis='ic') layers cannot be stored as AWQ")
    if spec.bits != BITS:
        raise ValueError(f"{name}: AWQ 'gemm' checkpoints are 4-bit, this layer has bits={spec.bits}")
    if layer.in_perm is not None:
        raise ValueError(f"{name}: has an input permutation (in_perm, e.g. from GPTQ act-order), "
                         "which AWQ cannot store; export it as GPTQ")
    n, k = layer.out_features, layer.in_features
    if n % 8:
        raise ValueError(f"{name}: AWQ packs 8 output channels per word, out_features {n} is not a "
                         "multiple of 8")
    q, s, z = layer.canonical()
    codes = ops.unpack(q, BITS).t()  # [K, N]
    if z is None:
        z = torch.full(tuple(s.shape), 2 ** (BITS - 1), dtype=torch.uint8, device=s.device)
    out = {"qweight": _pack_awq(codes), "qzeros": _pack_awq(z.t()),
           "scales": C.to_fp16_exactly(s, name).t().contiguous()}
    if layer.bias is not None:
        out["bias"] = layer.bias.detach()
    return out


def check_awq_config(q: dict, where: str) -> int:
    """Validates an AWQ ``quantization_config``; returns its group size."""
    version = str(q.get("version", "gemm")).lower()
    if version != "gemm":
        raise ValueError(f"{where}: AWQ version {q.get('version')!r} is not supported (only 'gemm' "
                         "packing; 'gemv'/'gemv_fast'/'marlin'/'exllama' use other layouts)")
    bits = q.get("bits", q.get("w_bit"))
    if bits != BITS:
        raise ValueError(f"{where}: AWQ bits={bits!r} is not supported (AWQ 'gemm' is 4-bit)")
    if not q.get("zero_point", True):
        raise ValueError(f"{where}: AWQ zero_point=false is not supported ('gemm' checkpoints "
                         "always carry zero points)")
    group = q.get("group_size", q.get("q_group_size"))
    if isinstance(group, bool) or not isinstance(group, int) or not (group == -1 or group > 0):
        raise ValueError(f"{where}: AWQ group_size {group!r} is invalid (expected -1 or a positive int)")
    return group


def load_awq(model_dir: Union[str, Path], model: Optional[nn.Module] = None,
             dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Loads an AWQ "gemm" checkpoint directory (``config.json`` with ``quantization_config``
    ``quant_method: "awq"`` + safetensors). Builds the model named by ``architectures`` with
    empty (meta) weights unless ``model`` is given, replaces every layer that has a
    ``<name>.qweight`` with a :class:`QuantLinear` and loads the remaining tensors. ``dtype``
    casts the non-quantised floating tensors (default: as stored). Returns the model in eval mode."""
    model_dir = Path(model_dir)
    q, where = C.checkpoint_config(model_dir, "awq")
    group = check_awq_config(q, where)

    def layer(name, tensors, k, n):
        (qw, qz, sc), keys = C.packed_layer_tensors(tensors, name, model_dir)
        bias = C.optional_tensor(tensors, f"{name}.bias")
        if tuple(qw.shape) != (k, n // 8) or n % 8:
            raise ValueError(f"{model_dir}: {name}.qweight has shape {list(qw.shape)}, but the model's "
                             f"layer is [out {n}, in {k}] (AWQ expects [{k}, {n // 8}])")
        ql = awq_to_quantlinear(qw, qz, sc, group, bias, name)
        return ql, keys + ([f"{name}.bias"] if bias is not None else [])

    return C.import_model(model_dir, model, dtype, layer)


@C.exports_unfused
def export_awq(model: nn.Module, path: Union[str, Path], overwrite: bool = False) -> Path:
    """Writes a model whose quantised linears are 4-bit per-OC :class:`QuantLinear` layers (one
    group size for all) as an AWQ "gemm" checkpoint: ``model.safetensors`` + ``config.json``
    with ``quantization_config`` ``{"quant_method": "awq", "bits": 4, "group_size", "zero_point":
    true, "version": "gemm", "modules_to_not_convert"}``. Written atomically."""
    layers = C.quant_layers(model, "awq")
    C.common_setting(layers, "awq", "bit width", lambda m: m.spec.bits)
    group = C.common_setting(layers, "awq", "group_size", lambda m: m.spec.group_size)
    tensors = C.float_tensors(model, layers)
    for name, m in layers.items():
        for key, t in quantlinear_to_awq(m, name).items():
            tensors[f"{name}.{key}"] = t.detach().cpu()
    plain = sorted(name for name, m in model.named_modules() if isinstance(m, nn.Linear))
    qcfg = {"quant_method": "awq", "bits": BITS, "group_size": group, "zero_point": True,
            "version": "gemm", "modules_to_not_convert": plain or None}
    return C.write_checkpoint(path, tensors, C.hf_config(model, qcfg), overwrite=overwrite)
