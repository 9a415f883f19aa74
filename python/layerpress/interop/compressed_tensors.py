"""compressed-tensors ``pack-quantized`` checkpoints (llm-compressor's format, which vLLM loads
natively) <-> QuantLinear.

Layout of one linear ``W [N, K]`` with ``num_bits`` b ∈ {2, 3, 4, 8} and groups of ``G`` input
channels (read from compressed-tensors 0.20's ``PackedQuantizationCompressor`` and
``pack_to_int32``; docs/interop.md):

* ``weight_packed`` int32 ``[N, ceil(K·b/32)]``: row ``n`` is the little-endian bit stream of
  the codes ``W[n, 0..K)`` stored offset by ``2^(b−1)`` (the package keeps signed codes
  ``q − 2^(b−1)`` and adds the offset when packing) -- exactly our canonical ``qweight``;
* ``weight_scale`` ``[N, K/G]`` (strategy ``"group"``) or ``[N, 1]`` (``"channel"``), in the
  scales' dtype;
* ``weight_zero_point`` int32 ``[ceil(N·b/32), K/G]`` (asymmetric only): zero points packed
  along N (dim 0), also offset by ``2^(b−1)`` -- so the stored field is our unsigned ``z``;
* ``weight_shape`` int64 ``[2]`` = ``[N, K]``; optional ``weight_g_idx`` int32 ``[K]``
  (activation ordering); ``bias``.

``w = (q_signed − z_signed)·s = (q − z)·s``: the same weights bit for bit. Symmetric schemes have
no zero point (the implicit ``2^(b−1)``, ours too).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, Optional, Union

import torch
from torch import nn

from .. import ops
from ..nn import QuantLinear
from ..spec import BITS, QuantSpec
from . import _common as C
from .gptq import _perm_from_g_idx

__all__ = ["quantlinear_to_compressed_tensors", "compressed_tensors_to_quantlinear",
           "export_compressed_tensors", "load_compressed_tensors", "FORMAT"]

FORMAT = "pack-quantized"
QUANT_METHOD = "compressed-tensors"


def _pack_along_n(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Zero points ``[N, G']`` -> int32 ``[ceil(N·bits/32), G']``, each column a bit stream along N
    (the package pads N to a multiple of 32 and keeps the words it needs)."""
    n = z.shape[0]
    pad = (-n) % 32
    zt = torch.nn.functional.pad(z.t().to(torch.int64), (0, pad))
    words = C.pack_bits(zt, bits)[:, : (n * bits + 31) // 32]
    return words.t().contiguous()


def _unpack_along_n(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`_pack_along_n`: int64 ``[N, G']``."""
    return C.unpack_bits(words.t().contiguous(), bits, n).t()


def _weights_args(spec: QuantSpec) -> dict:
    """The scheme's ``weights`` QuantizationArgs for a per-OC spec."""
    channel = spec.group_size == -1
    return {"num_bits": spec.bits, "type": "int", "symmetric": spec.symmetric,
            "strategy": "channel" if channel else "group",
            "group_size": None if channel else spec.group_size,
            "dynamic": False}


def quantlinear_to_compressed_tensors(layer: QuantLinear, name: str = "layer") -> dict:
    """The ``pack-quantized`` tensors (``weight_packed``, ``weight_scale``, ``weight_shape``,
    ``weight_zero_point`` when asymmetric, ``bias`` if any) of a per-OC :class:`QuantLinear`
    without an ``in_perm`` or side paths."""
    spec = layer.spec
    if spec.axis != "oc":
        raise ValueError(f"{name}: per-IC (axis='ic') layers cannot be stored as compressed-tensors")
    if layer.in_perm is not None:
        raise ValueError(f"{name}: has an input permutation (in_perm), which pack-quantized cannot "
                         "store")
    q, s, z = layer.canonical()
    out = {"weight_packed": q.contiguous(), "weight_scale": s.contiguous(),
           "weight_shape": torch.tensor([layer.out_features, layer.in_features], dtype=torch.int64)}
    if z is not None:
        out["weight_zero_point"] = _pack_along_n(z, spec.bits)
    if layer.bias is not None:
        out["bias"] = layer.bias.detach()
    return out


def compressed_tensors_to_quantlinear(weight_packed: torch.Tensor, weight_scale: torch.Tensor,
                                      weights_args: dict, weight_shape=None,
                                      weight_zero_point: Optional[torch.Tensor] = None,
                                      weight_g_idx: Optional[torch.Tensor] = None,
                                      bias: Optional[torch.Tensor] = None,
                                      name: str = "layer") -> QuantLinear:
    """One ``pack-quantized`` layer as a :class:`QuantLinear` with exactly the same weights.
    ``weights_args``: the scheme's ``weights`` (``num_bits``, ``symmetric``, ``strategy``
    ``"group"`` or ``"channel"``, ``group_size``)."""
    bits = weights_args.get("num_bits")
    if isinstance(bits, bool) or bits not in BITS:
        raise ValueError(f"{name}: compressed-tensors num_bits={bits!r} is not supported by "
                         f"layerpress (expected one of {BITS})")
    if weights_args.get("type", "int") != "int":
        raise ValueError(f"{name}: weights type {weights_args.get('type')!r} is not supported "
                         "(expected 'int')")
    strategy = weights_args.get("strategy")
    if weight_packed.dtype != torch.int32 or weight_packed.dim() != 2:
        raise ValueError(f"{name}.weight_packed: expected int32 [N, K*{bits}/32], got "
                         f"{str(weight_packed.dtype).replace('torch.', '')} {list(weight_packed.shape)}")
    n = weight_packed.shape[0]
    if weight_shape is not None:
        shape = [int(v) for v in torch.as_tensor(weight_shape).reshape(-1).tolist()]
        if len(shape) != 2 or shape[0] != n:
            raise ValueError(f"{name}.weight_shape: {shape} does not match weight_packed "
                             f"{list(weight_packed.shape)}")
        k = shape[1]
    else:
        k = weight_packed.shape[1] * 32 // bits
    if k % 32 or weight_packed.shape[1] != k * bits // 32:
        raise ValueError(f"{name}: in_features {k} with {bits}-bit codes needs weight_packed "
                         f"[{n}, {k * bits // 32}] and K a multiple of 32, got "
                         f"{list(weight_packed.shape)}")
    if strategy == "channel":
        gf = k
    elif strategy == "group":
        gf = weights_args.get("group_size")
        if isinstance(gf, bool) or not isinstance(gf, int) or gf <= 0 or k % gf:
            raise ValueError(f"{name}: group_size {gf!r} must be a positive divisor of in_features {k}")
    else:
        raise ValueError(f"{name}: weights strategy {strategy!r} is not supported (expected 'group' "
                         "or 'channel')")
    ngroups = k // gf
    if weight_scale.dim() == 1:
        weight_scale = weight_scale[:, None]
    if tuple(weight_scale.shape) != (n, ngroups):
        raise ValueError(f"{name}.weight_scale: expected [{n}, {ngroups}], got {list(weight_scale.shape)}")
    sdt = C.scale_dtype_of(weight_scale, name)
    g = C.our_group_size(gf, k, name)
    symmetric = bool(weights_args.get("symmetric", True))
    z = None
    if not symmetric:
        if weight_zero_point is None:
            raise ValueError(f"{name}.weight_zero_point is missing (the scheme is asymmetric)")
        if weight_zero_point.dim() == 1:
            weight_zero_point = weight_zero_point[:, None]
        C.check_tensor(weight_zero_point, f"{name}.weight_zero_point", torch.int32,
                       ((n * bits + 31) // 32, ngroups))
        z = _unpack_along_n(weight_zero_point, bits, n)  # [N, ngroups], unsigned
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"{name}.bias: expected [{n}], got {list(bias.shape)}")
    perm = None
    if weight_g_idx is not None:
        if weight_g_idx.dtype not in (torch.int32, torch.int64) or tuple(weight_g_idx.shape) != (k,):
            raise ValueError(f"{name}.weight_g_idx: expected int32 [{k}], got "
                             f"{str(weight_g_idx.dtype).replace('torch.', '')} {list(weight_g_idx.shape)}")
        perm = _perm_from_g_idx(weight_g_idx.to(torch.int64), k, gf, f"{name}.weight")
    spec = QuantSpec(bits=bits, group_size=g, axis="oc", symmetric=symmetric, scale_dtype=sdt)
    spec.check_shape(n, k)
    q = weight_packed.contiguous()
    if perm is not None:
        q = ops.pack(ops.unpack(q, bits)[:, perm].contiguous(), bits)
    # [N, ngroups] per checkpoint group -> [N, K/g] per layerpress group (repeats when g < gf)
    s = C.expand_groups(weight_scale.t(), gf, g, k)
    zeros = None if z is None else C.expand_groups(z.t(), gf, g, k).to(torch.uint8)
    return QuantLinear.from_quantized(q, s, zeros, spec, bias=bias, in_perm=perm)


# ---- config_groups ------------------------------------------------------------------------------

def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, (nn.Linear, QuantLinear))


def _matches(name: str, module: Optional[nn.Module], target: str) -> bool:
    """compressed-tensors' target rule: ``re:<pattern>`` matched at the start of the name, an
    exact layer name, or a class name (``"Linear"`` matches any linear)."""
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    if target == name:
        return True
    if module is None:
        return False
    if target == "Linear" and _is_linear(module):
        return True
    return any(c.__name__ == target for c in type(module).__mro__)


def scheme_for(name: str, module: Optional[nn.Module], qcfg: dict) -> Optional[tuple]:
    """``(group name, weights args)`` of the config group whose targets match the layer and whose
    ``ignore`` does not; None when no group applies."""
    ignore = qcfg.get("ignore") or []
    if any(_matches(name, module, t) for t in ignore):
        return None
    for gname, scheme in (qcfg.get("config_groups") or {}).items():
        if not isinstance(scheme, dict):
            continue
        if any(_matches(name, module, t) for t in scheme.get("targets") or []):
            return gname, scheme.get("weights")
    return None


def _check_config(q: dict, where: str) -> dict:
    fmt = q.get("format", FORMAT)
    groups = q.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise ValueError(f"{where}: compressed-tensors quantization_config has no config_groups")
    for gname, scheme in groups.items():
        if not isinstance(scheme, dict) or not isinstance(scheme.get("weights"), dict):
            raise ValueError(f"{where}: config_groups.{gname} has no weights scheme (preset names "
                             "and activation-only schemes are not supported)")
        gfmt = scheme.get("format") or fmt
        if gfmt != FORMAT:
            raise ValueError(f"{where}: config_groups.{gname} has format {gfmt!r}; layerpress reads "
                             f"{FORMAT!r} only")
        if scheme.get("input_activations") or scheme.get("output_activations"):
            raise ValueError(f"{where}: config_groups.{gname} quantises activations, which "
                             "layerpress does not do")
    if str(q.get("quantization_status", "compressed")) != "compressed":
        raise ValueError(f"{where}: quantization_status is {q.get('quantization_status')!r}, not "
                         "'compressed': the weights are not packed")
    return q


def load_compressed_tensors(model_dir: Union[str, Path], model: Optional[nn.Module] = None,
                            dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Loads a compressed-tensors ``pack-quantized`` checkpoint directory (``quantization_config``
    ``quant_method: "compressed-tensors"``; int weights, 2/3/4/8 bits, group or channel
    strategy, symmetric or asymmetric, with or without ``weight_g_idx``). Each layer with a
    ``<name>.weight_packed`` becomes a :class:`QuantLinear` under the config group that targets
    it; everything else is loaded as stored (``dtype`` casts it)."""
    model_dir = Path(model_dir)
    q, where = C.checkpoint_config(model_dir, QUANT_METHOD)
    _check_config(q, where)
    if model is None:
        model = C.build_model(C.read_config(model_dir), model_dir)

    def layer(name, tensors, k, n):
        m = C.get_submodule(model, name)
        found = scheme_for(name, m, q)
        if found is None:
            raise ValueError(f"{where}: {name}.weight_packed is stored, but no config group targets "
                             f"{name} (or it is in ignore)")
        gname, args = found
        keys = [f"{name}.{t}" for t in ("weight_packed", "weight_scale", "weight_shape",
                                        "weight_zero_point", "weight_g_idx", "bias")]
        got = {key.rpartition(".")[2]: C.optional_tensor(tensors, key) for key in keys}
        if got["weight_scale"] is None:
            raise ValueError(f"{model_dir}: missing tensor {name}.weight_scale")
        ql = compressed_tensors_to_quantlinear(got["weight_packed"], got["weight_scale"], args,
                                               got["weight_shape"], got["weight_zero_point"],
                                               got["weight_g_idx"], got["bias"], name)
        if (ql.out_features, ql.in_features) != (n, k):
            raise ValueError(f"{model_dir}: {name} is stored as [out {ql.out_features}, in "
                             f"{ql.in_features}], but the model's layer is [out {n}, in {k}]")
        return ql, [key for key in keys if key in tensors]

    return C.import_model(model_dir, model, dtype, layer, marker=".weight_packed",
                          fmt="compressed-tensors")


# ---- export -------------------------------------------------------------------------------------

def _requant_spec(m: QuantLinear) -> QuantSpec:
    """The per-OC spec a refused layer is requantised to: same bits and symmetry, groups of the
    same size along K when they tile it (else 128, else whole rows), fp16 scales."""
    k = m.in_features
    g = m.spec.group_size
    if g == -1 or k % g:
        g = 128 if k % 128 == 0 else -1
    return QuantSpec(bits=m.spec.bits, group_size=g, axis="oc", symmetric=m.spec.symmetric,
                     scale_dtype=torch.float16)


@C.exports_unfused
def export_compressed_tensors(model: nn.Module, path: Union[str, Path], requantize: bool = False,
                              overwrite: bool = False) -> dict:
    """Writes a model with :class:`QuantLinear` layers as a compressed-tensors ``pack-quantized``
    checkpoint (``model.safetensors`` + ``config.json`` with ``quantization_config``), atomically.

    One config group per distinct (bits, group size, symmetric): a mixed-precision model
    exports as it is (groups target their layers by exact name; a single group targets
    ``"Linear"``). Unquantised linears go in ``ignore``. Per-IC layers, 16-bit side paths and
    input permutations have no counterpart: refused (naming the layers) unless ``requantize``,
    which quantises their effective weight again per output channel (same bits, RTN). Returns ``{"path", "groups", "requantized": {layer: {reason, max_abs_error,
    rel_error}}}``."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not layers:
        raise ValueError("export_compressed_tensors: the model has no QuantLinear layers: quantise "
                         "it first")
    conv1d = [name for name, m in layers.items() if getattr(m, "_lp_conv1d", False)]
    if conv1d:
        raise ValueError(f"export_compressed_tensors: layers {conv1d[:8]} replace GPT-2 Conv1D "
                         "modules, which compressed-tensors does not target (it quantises "
                         "nn.Linear)")
    bad = C.refuse_unrepresentable(layers, "compressed-tensors", requantize)
    permuted = [name for name, m in layers.items() if m.in_perm is not None and name not in bad]
    if permuted and not requantize:
        raise ValueError(f"export_compressed_tensors: layers {permuted[:8]} have an input "
                         "permutation (in_perm), which pack-quantized cannot store; pass "
                         "requantize=True to quantise them again in channel order")
    requantized = {}
    export = dict(layers)
    for name in list(bad) + permuted:
        m = layers[name]
        new, err = C.requantize_layer(m, _requant_spec(m))
        export[name] = new
        requantized[name] = {"reason": ", ".join(bad.get(name) or ["an input permutation"]), **err}
    tensors = C.float_tensors(model, layers)
    schemes: Dict[tuple, list] = {}
    for name, m in export.items():
        for key, t in quantlinear_to_compressed_tensors(m, name).items():
            tensors[f"{name}.{key}"] = t.detach().cpu()
        s = m.spec
        schemes.setdefault((s.bits, s.group_size, s.symmetric), []).append(name)
    groups = {}
    for i, ((bits, g, sym), names) in enumerate(sorted(schemes.items())):
        spec = QuantSpec(bits=bits, group_size=g, symmetric=sym)
        groups[f"group_{i}"] = {"targets": ["Linear"] if len(schemes) == 1 else sorted(names),
                                "weights": _weights_args(spec), "input_activations": None,
                                "output_activations": None, "format": FORMAT}
    ignore = sorted(name for name, m in model.named_modules()
                    if isinstance(m, nn.Linear) and name not in layers)
    qcfg = {"quant_method": QUANT_METHOD, "format": FORMAT, "quantization_status": "compressed",
            "config_groups": groups, "ignore": ignore, "kv_cache_scheme": None,
            "global_compression_ratio": None, "sparsity_config": {}, "transform_config": {}}
    out = C.write_checkpoint(path, tensors, C.hf_config(model, qcfg), overwrite=overwrite)
    return {"path": str(out), "groups": {g: v["weights"] | {"layers": len(schemes[k])}
                                         for (g, v), k in zip(groups.items(), sorted(schemes))},
            "requantized": requantized}
