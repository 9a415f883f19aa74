"""GPTQ (AutoGPTQ / GPTQModel / transformers layout, v1 and v2 zero points) <-> QuantLinear.

Layout of one linear ``W [N, K]`` with ``bits`` ∈ {2, 3, 4, 8} and groups of ``G`` input
channels (SPEC §4, docs/interop.md):

* ``qweight`` int32 ``[K·bits/32, N]``: column ``n`` is the little-endian bit stream of the codes
  ``W[n, 0..K)`` (lowest bits first; 3-bit codes straddle words, 32 codes per 3 words) -- the
  transpose of our canonical ``qweight``;
* ``qzeros`` int32 ``[ceil(K/G), N·bits/32]``: zero points, each row a bit stream along N;
  checkpoint format v1 (``checkpoint_format: "gptq"``) stores ``z − 1``, v2 (``"gptq_v2"``) ``z``;
* ``scales`` float16 ``[ceil(K/G), N]``; ``g_idx`` int32 ``[K]``: the group of each input
  channel (``k // G`` unless act-order reordered them); ``w = (q − z)·s``; optional ``bias``.

An act-order ``g_idx`` becomes an input permutation: the input channels are sorted by group
(stable), the weight is stored in that order, and the QuantLinear gathers ``x[..., in_perm]``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from .. import ops
from ..nn import QuantLinear
from ..spec import BITS, QuantSpec
from . import _common as C

__all__ = ["gptq_to_quantlinear", "quantlinear_to_gptq", "load_gptq", "export_gptq",
           "check_gptq_config", "CHECKPOINT_FORMATS"]

#: checkpoint_format -> zero-point convention (1: stores z − 1, 2: stores z)
CHECKPOINT_FORMATS = {"gptq": 1, "gptq_v2": 2}


def _perm_from_g_idx(g_idx: torch.Tensor, k: int, gf: int, name: str) -> Optional[torch.Tensor]:
    """The input permutation that makes ``g_idx``'s groups contiguous (None: already are).
    Raises when a group does not have exactly ``G`` members (the last: the remainder of K)."""
    want = torch.arange(k, device=g_idx.device) // gf
    if torch.equal(g_idx, want):
        return None
    ngroups = (k + gf - 1) // gf
    if int(g_idx.min()) < 0 or int(g_idx.max()) >= ngroups:
        raise ValueError(f"{name}.g_idx: values must lie in [0, {ngroups}), got "
                         f"[{int(g_idx.min())}, {int(g_idx.max())}]")
    counts = torch.bincount(g_idx, minlength=ngroups)
    expected = torch.bincount(want, minlength=ngroups)
    bad = (counts != expected).nonzero()
    if bad.numel():
        j = int(bad[0])
        raise ValueError(f"{name}.g_idx: group {j} has {int(counts[j])} input channels, expected "
                         f"{int(expected[j])}; layerpress stores contiguous groups of equal size, so "
                         "this g_idx cannot be represented exactly")
    return torch.sort(g_idx, stable=True).indices


def gptq_to_quantlinear(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                        g_idx: Optional[torch.Tensor], bits: int, group_size: int, version: int = 1,
                        sym: bool = False, bias: Optional[torch.Tensor] = None,
                        name: str = "layer") -> QuantLinear:
    """One GPTQ layer as a :class:`QuantLinear` with exactly the same weights (per-OC, the
    scales' dtype). ``version`` 1 or 2 is the zero-point convention; with ``sym`` and every zero
    point ``2^(bits−1)`` the layer is symmetric (no zeros tensor), else asymmetric. ``g_idx``
    None means ``k // G``; a non-monotonic (act-order) one gives the layer an ``in_perm``."""
    if isinstance(bits, bool) or bits not in BITS:
        raise ValueError(f"{name}: GPTQ bits={bits!r} is not supported (expected one of {BITS})")
    if version not in (1, 2):
        raise ValueError(f"{name}: version must be 1 or 2, got {version!r}")
    if qweight.dtype != torch.int32 or qweight.dim() != 2 or qweight.shape[0] * 32 % bits:
        raise ValueError(f"{name}.qweight: expected int32 [K*{bits}/32, N], got "
                         f"{str(qweight.dtype).replace('torch.', '')} {list(qweight.shape)}")
    k, n = qweight.shape[0] * 32 // bits, qweight.shape[1]
    gf = C.file_group(group_size, k)
    ngroups = (k + gf - 1) // gf
    if n * bits % 32:
        raise ValueError(f"{name}: GPTQ packs zero points along N, out_features {n} x {bits} bits is "
                         "not a multiple of 32")
    C.check_tensor(qzeros, f"{name}.qzeros", torch.int32, (ngroups, n * bits // 32))
    if scales.dim() != 2 or tuple(scales.shape) != (ngroups, n):
        raise ValueError(f"{name}.scales: expected [{ngroups}, {n}], got {list(scales.shape)}")
    sdt = C.scale_dtype_of(scales, name)
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"{name}.bias: expected [{n}], got {list(bias.shape)}")
    if g_idx is not None:
        if g_idx.dtype not in (torch.int32, torch.int64) or tuple(g_idx.shape) != (k,):
            raise ValueError(f"{name}.g_idx: expected int32 [{k}], got "
                             f"{str(g_idx.dtype).replace('torch.', '')} {list(g_idx.shape)}")
        perm = _perm_from_g_idx(g_idx.to(torch.int64), k, gf, name)
    else:
        perm = None
    g = C.our_group_size(group_size, k, name)
    QuantSpec(bits=bits, group_size=g, scale_dtype=sdt).check_shape(n, k)

    qmax = 2 ** bits - 1
    z = C.unpack_bits(qzeros, bits, n) + (1 if version == 1 else 0)  # [ngroups, N]
    if int(z.max()) > qmax:
        grp, col = (z > qmax).nonzero()[0].tolist()
        raise ValueError(f"{name}.qzeros: zero point {int(z[grp, col])} (group {grp}, output "
                         f"{col}) exceeds {qmax}: a v1 checkpoint stores z − 1, so a stored {qmax} "
                         "means z = 2^bits (AutoGPTQ writes that for z = 0, which v1 cannot hold); "
                         "it cannot be represented")
    symmetric = bool(sym) and bool((z == 2 ** (bits - 1)).all())
    spec = QuantSpec(bits=bits, group_size=g, axis="oc", symmetric=symmetric, scale_dtype=sdt)
    q = qweight.t().contiguous()  # the canonical layout already
    if perm is not None:
        q = ops.pack(ops.unpack(q, bits)[:, perm].contiguous(), bits)
    zeros = None if symmetric else C.expand_groups(z, gf, g, k).to(torch.uint8)
    s = C.expand_groups(scales, gf, g, k)
    return QuantLinear.from_quantized(q, s, zeros, spec, bias=bias, in_perm=perm)


def quantlinear_to_gptq(layer: QuantLinear, version: int = 1, name: str = "layer") -> dict:
    """The GPTQ tensors (``qweight``, ``qzeros``, ``scales`` float16, ``g_idx``, ``bias`` if any)
    of a per-OC :class:`QuantLinear`; an ``in_perm`` becomes an act-order ``g_idx``."""
    spec = layer.spec
    if spec.axis != "oc":
        raise ValueError(f"{name}: per-IC (axis='ic') layers cannot be stored as GPTQ")
    if version not in (1, 2):
        raise ValueError(f"export_gptq: version must be 1 or 2, got {version!r}")
    n, k, bits = layer.out_features, layer.in_features, spec.bits
    if n * bits % 32:
        raise ValueError(f"{name}: GPTQ packs zero points along N, out_features {n} x {bits} bits is "
                         "not a multiple of 32")
    q, s, z = layer.canonical()
    perm = layer.in_perm
    if perm is not None:
        codes = ops.unpack(q, bits)
        q = ops.pack(torch.empty_like(codes).index_copy_(1, perm, codes), bits)
    gf = k if spec.group_size == -1 else spec.group_size
    g_idx = (torch.arange(k, device=q.device) // gf).to(torch.int32)
    if perm is not None:
        g_idx = torch.empty_like(g_idx).index_copy_(0, perm, g_idx)
    if z is None:
        z = torch.full(tuple(s.shape), 2 ** (bits - 1), dtype=torch.uint8, device=s.device)
    stored = z.t().to(torch.int64)
    if version == 1:
        if bool((stored == 0).any()):
            raise ValueError(f"{name}: has zero points 0, which GPTQ v1 cannot store (it stores z − 1); "
                             "export with version=2")
        stored = stored - 1
    out = {"qweight": q.t().contiguous(), "qzeros": C.pack_bits(stored, bits),
           "scales": C.to_fp16_exactly(s, name).t().contiguous(), "g_idx": g_idx}
    if layer.bias is not None:
        out["bias"] = layer.bias.detach()
    return out


def check_gptq_config(q: dict, where: str) -> dict:
    """Validates a GPTQ ``quantization_config``: ``{"bits", "group_size", "sym", "desc_act",
    "version"}``."""
    bits = q.get("bits")
    if isinstance(bits, bool) or bits not in BITS:
        raise ValueError(f"{where}: GPTQ bits={bits!r} is not supported (expected one of {BITS})")
    group = q.get("group_size", -1)
    if isinstance(group, bool) or not isinstance(group, int) or not (group == -1 or group > 0):
        raise ValueError(f"{where}: GPTQ group_size {group!r} is invalid (expected -1 or a positive int)")
    fmt = q.get("checkpoint_format", q.get("format", "gptq"))
    if fmt not in CHECKPOINT_FORMATS:
        raise ValueError(f"{where}: GPTQ checkpoint_format {fmt!r} is not supported (expected one of "
                         f"{sorted(CHECKPOINT_FORMATS)}; 'marlin'/'bitblas' repack the weights)")
    return {"bits": bits, "group_size": group, "sym": bool(q.get("sym", True)),
            "desc_act": bool(q.get("desc_act", False)), "version": CHECKPOINT_FORMATS[fmt]}


def load_gptq(model_dir: Union[str, Path], model: Optional[nn.Module] = None,
              dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Loads a GPTQ checkpoint directory (``quantization_config`` ``quant_method: "gptq"`` in
    ``config.json``, or AutoGPTQ's ``quantize_config.json``; v1 ``"gptq"`` or ``"gptq_v2"``
    ``checkpoint_format``). Builds the model named by ``architectures`` with empty (meta)
    weights unless ``model`` is given, replaces every layer that has a ``<name>.qweight`` with a
    :class:`QuantLinear` and loads the remaining tensors. ``dtype`` casts the non-quantised
    floating tensors (default: as stored). Returns the model in eval mode."""
    model_dir = Path(model_dir)
    q, where = C.checkpoint_config(model_dir, "gptq")
    c = check_gptq_config(q, where)
    bits = c["bits"]

    def layer(name, tensors, k, n):
        (qw, qz, sc), keys = C.packed_layer_tensors(tensors, name, model_dir)
        if tuple(qw.shape) != (k * bits // 32, n) or k * bits % 32:
            raise ValueError(f"{model_dir}: {name}.qweight has shape {list(qw.shape)}, but the model's "
                             f"layer is [out {n}, in {k}] (GPTQ {bits}-bit expects [{k * bits // 32}, {n}])")
        g_idx = C.optional_tensor(tensors, f"{name}.g_idx")
        if g_idx is None and c["desc_act"]:
            raise ValueError(f"{model_dir}: {name}.g_idx is missing, but desc_act is true")
        bias = C.optional_tensor(tensors, f"{name}.bias")
        ql = gptq_to_quantlinear(qw, qz, sc, g_idx, bits, c["group_size"], c["version"], c["sym"],
                                 bias, name)
        used = keys + [f"{name}.{t}" for t in ("g_idx", "bias") if f"{name}.{t}" in tensors]
        return ql, used

    return C.import_model(model_dir, model, dtype, layer)


@C.exports_unfused
def export_gptq(model: nn.Module, path: Union[str, Path], version: int = 1,
                overwrite: bool = False) -> Path:
    """Writes a model whose quantised linears are per-OC :class:`QuantLinear` layers (one bit
    width and group size for all; 2, 3, 4 or 8 bits) as a GPTQ checkpoint: ``model.safetensors``,
    ``config.json`` with ``quantization_config`` ``{"quant_method": "gptq", "bits",
    "group_size", "sym", "desc_act", "checkpoint_format": "gptq" (version 1, stores z − 1) or
    "gptq_v2"}`` and the same settings in AutoGPTQ's ``quantize_config.json``. Layers with an
    ``in_perm`` get an act-order ``g_idx`` (``desc_act`` true). Written atomically."""
    if version not in (1, 2):
        raise ValueError(f"export_gptq: version must be 1 or 2, got {version!r}")
    layers = C.quant_layers(model, "gptq")
    bits = C.common_setting(layers, "gptq", "bit width", lambda m: m.spec.bits)
    group = C.common_setting(layers, "gptq", "group_size", lambda m: m.spec.group_size)
    tensors = C.float_tensors(model, layers)
    for name, m in layers.items():
        for key, t in quantlinear_to_gptq(m, version, name).items():
            tensors[f"{name}.{key}"] = t.detach().cpu()
    fmt = {1: "gptq", 2: "gptq_v2"}[version]
    qcfg = {"quant_method": "gptq", "bits": bits, "group_size": group,
            "sym": all(m.spec.symmetric for m in layers.values()),
            "desc_act": any(m.in_perm is not None for m in layers.values()),
            "checkpoint_format": fmt, "static_groups": False, "true_sequential": True,
            "damp_percent": 0.01}
    return C.write_checkpoint(path, tensors, C.hf_config(model, qcfg),
                              extra_json={"quantize_config.json": qcfg}, overwrite=overwrite)
