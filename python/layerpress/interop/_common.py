"""Pieces shared by the AWQ and GPTQ importers/exporters: bit streams, group-size mapping,
reading a checkpoint directory, building a model with empty weights, atomic writing."""
from __future__ import annotations

import contextlib
import functools
import re
from pathlib import Path
from typing import Callable, Dict, Iterable, Optional

import torch
from torch import nn

from ..nn import QuantLinear
from ..spec import GROUP_SIZES, SCALE_DTYPES
from ..flows.io import read_json, write_checkpoint  # noqa: F401  (write_checkpoint: used by awq/gptq)
from ..flows.models import get_submodule, is_conv1d

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"

_MASK32 = 0xFFFFFFFF


# ---- little-endian bit streams along the last dimension ------------------------------------------

def unpack_bits(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Codes ``int64 [..., count]`` from int32 words ``[..., W]`` read as one little-endian bit
    stream per row (code ``i`` in stream bits ``[i·bits, (i+1)·bits)``, possibly straddling two
    words) -- the packing of docs/format.md §3, and GPTQ's along either axis."""
    w = words.to(torch.int64) & _MASK32
    pos = torch.arange(count, device=words.device) * bits
    lo_idx, shift = pos // 32, pos % 32
    hi_idx = torch.clamp(lo_idx + 1, max=words.shape[-1] - 1)
    # The high word only contributes when the code straddles; otherwise its bits land at or above
    # ``bits`` and the mask drops them (shift 0 moves it entirely above bit 31).
    val = (w[..., lo_idx] >> shift) | (w[..., hi_idx] << (32 - shift))
    return val & ((1 << bits) - 1)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`unpack_bits`: int32 words ``[..., C·bits/32]`` from codes ``[..., C]``
    (each ``< 2^bits``; ``C·bits`` a multiple of 32)."""
    c = codes.to(torch.int64)
    n = c.shape[-1]
    assert n * bits % 32 == 0, (n, bits)
    nwords = n * bits // 32
    pos = torch.arange(n, device=codes.device) * bits
    idx, shift = pos // 32, pos % 32
    placed = c << shift  # up to 39 bits: the part above bit 31 belongs to the next word
    out = torch.zeros(c.shape[:-1] + (nwords,), dtype=torch.int64, device=codes.device)
    out.index_add_(-1, idx, placed & _MASK32)  # fields are disjoint, so adding is OR-ing
    out.index_add_(-1, torch.clamp(idx + 1, max=nwords - 1), placed >> 32)
    return torch.where(out >= 2 ** 31, out - 2 ** 32, out).to(torch.int32)


# ---- group sizes --------------------------------------------------------------------------------

def file_group(group_size: int, k: int) -> int:
    """The effective group length along K of a checkpoint's ``group_size`` (-1 or >= K: all K)."""
    return k if group_size == -1 or group_size >= k else group_size


def our_group_size(group_size: int, k: int, where: str) -> int:
    """The layerpress group size that represents a checkpoint's groups of ``group_size`` input
    channels exactly: the same size when it is one of ours, ``-1`` for a whole row, else the
    largest of 256/128/64/32 dividing both it and K (each checkpoint group then spans several of
    ours, which repeat its scale and zero point)."""
    gf = file_group(group_size, k)
    if gf == k:
        return -1
    if gf in GROUP_SIZES and k % gf == 0:
        return gf
    for g in (256, 128, 64, 32):
        if gf % g == 0 and k % g == 0:
            return g
    raise ValueError(f"{where}: group_size {group_size} with in_features {k} cannot be represented "
                     "(layerpress groups are 32, 64, 128 or 256 input channels or a whole row, and "
                     "must tile both the checkpoint's groups and K)")


def expand_groups(t: torch.Tensor, gf: int, g: int, k: int) -> torch.Tensor:
    """Checkpoint per-group tensor ``[ceil(K/gf), N]`` -> our per-OC ``[N, K/g]`` (g = -1: one)."""
    ng = 1 if g == -1 else k // g
    src = (torch.arange(ng, device=t.device) * (k if g == -1 else g)) // gf
    return t[src].t().contiguous()


def scale_dtype_of(scales: torch.Tensor, where: str) -> torch.dtype:
    if scales.dtype not in SCALE_DTYPES:
        raise ValueError(f"{where}.scales: dtype {scales.dtype} is not supported (expected float16, "
                         "bfloat16 or float32)")
    return scales.dtype


def check_tensor(t: torch.Tensor, name: str, dtype: torch.dtype, shape) -> None:
    if t.dtype != dtype or tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected {str(dtype).replace('torch.', '')} {list(shape)}, got "
                         f"{str(t.dtype).replace('torch.', '')} {list(t.shape)}")


def to_fp16_exactly(scales: torch.Tensor, where: str) -> torch.Tensor:
    """The scales as float16 (what AWQ/GPTQ engines read), refusing any that would change."""
    if scales.dtype == torch.float16:
        return scales
    h = scales.to(torch.float16)
    if not torch.equal(h.to(scales.dtype), scales):
        raise ValueError(f"{where}: its {str(scales.dtype).replace('torch.', '')} scales are not all "
                         "representable in float16, which AWQ/GPTQ checkpoints store; quantise with "
                         "scale_dtype=torch.float16")
    return h


# ---- checkpoint directories ---------------------------------------------------------------------

def read_config(model_dir: Path) -> dict:
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir} is not a directory")
    path = model_dir / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: not a Hugging Face checkpoint directory")
    return read_json(path)


def quant_config(model_dir: Path, cfg: dict) -> dict:
    """``config.json``'s ``quantization_config``, or the older side files AutoGPTQ
    (``quantize_config.json``) and AutoAWQ (``quant_config.json``) wrote."""
    q = cfg.get("quantization_config")
    if isinstance(q, dict):
        return q
    for name, method in (("quantize_config.json", "gptq"), ("quant_config.json", "awq")):
        p = model_dir / name
        if p.is_file():
            q = read_json(p)
            q.setdefault("quant_method", method)
            return q
    raise ValueError(f"{model_dir / CONFIG}: no quantization_config (and no quantize_config.json or "
                     "quant_config.json): not a quantised checkpoint")


def checkpoint_config(model_dir: Path, method: str):
    """``(quantization config, where)`` of a checkpoint that must declare
    ``quant_method == method``; ``where`` names the config file for error messages."""
    q = quant_config(model_dir, read_config(model_dir))
    where = str(model_dir / CONFIG)
    if str(q.get("quant_method", "")).lower() != method:
        raise ValueError(f"{where}: quant_method is {q.get('quant_method')!r}, not {method!r}")
    return q, where


class TensorFile:
    """The tensors of a checkpoint directory (``model.safetensors`` or shards listed in
    ``model.safetensors.index.json``), read one at a time."""

    def __init__(self, model_dir: Path):
        from safetensors import safe_open

        self._open = safe_open
        self._handles = {}
        index = model_dir / WEIGHTS_INDEX
        single = model_dir / WEIGHTS
        if index.is_file():
            wm = read_json(index).get("weight_map")
            if not isinstance(wm, dict) or not wm:
                raise ValueError(f"{index}: no weight_map")
            files = {f: model_dir / f for f in set(wm.values())}
            self._where = {k: files[f] for k, f in wm.items()}
        elif single.is_file():
            self._where = None
            files = {WEIGHTS: single}
        else:
            raise FileNotFoundError(f"{model_dir}: no {WEIGHTS} or {WEIGHTS_INDEX}")
        keys = {}
        for path in files.values():
            h = self._handle(path)
            for k in h.keys():
                keys[k] = path
        if self._where is None:
            self._where = keys
        else:
            lost = [k for k, p in self._where.items() if keys.get(k) != p]
            if lost:
                raise ValueError(f"{index} lists tensors its shards do not hold: {lost[:8]}")

    def _handle(self, path: Path):
        from safetensors import SafetensorError

        if path not in self._handles:
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing")
            try:
                self._handles[path] = self._open(str(path), framework="pt")
            except (SafetensorError, OSError, ValueError) as e:
                raise ValueError(f"{path}: unreadable safetensors file (truncated or corrupt?): "
                                 f"{e}") from None
        return self._handles[path]

    def keys(self):
        return self._where.keys()

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def get(self, key: str) -> torch.Tensor:
        from safetensors import SafetensorError

        path = self._where[key]
        try:
            return self._handle(path).get_tensor(key)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise ValueError(f"{path}: cannot read tensor {key!r} (truncated or corrupt?): {e}") from None


def packed_layer_tensors(tensors: TensorFile, name: str, model_dir: Path):
    """A packed layer's ``(qweight, qzeros, scales)`` and their keys, with one error naming every
    missing one."""
    keys = [f"{name}.{t}" for t in ("qweight", "qzeros", "scales")]
    lost = [key for key in keys if key not in tensors]
    if lost:
        raise ValueError(f"{model_dir}: missing tensors {lost}")
    return tuple(tensors.get(key) for key in keys), keys


def optional_tensor(tensors: TensorFile, key: str) -> Optional[torch.Tensor]:
    return tensors.get(key) if key in tensors else None


def quantised_layer_names(tensors: TensorFile, marker: str = ".qweight") -> list:
    return sorted(k[: -len(marker)] for k in tensors.keys() if k.endswith(marker))


# ---- building the model -------------------------------------------------------------------------

@contextlib.contextmanager
def parameters_on_meta():
    """Modules built inside get their parameters on the meta device (no memory, no init cost);
    buffers stay real, because non-persistent ones (e.g. rotary ``inv_freq``) are computed at
    construction and never stored in checkpoints."""
    register = nn.Module.register_parameter

    def on_meta(self, name, param):
        register(self, name, param)
        if param is not None and param.device.type != "meta":
            p = self._parameters[name]
            self._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def build_model(cfg: dict, model_dir: Path) -> nn.Module:
    """The Hugging Face model named by ``config.json``'s ``architectures``, with meta parameters."""
    import transformers

    archs = cfg.get("architectures") or []
    cls = getattr(transformers, str(archs[0]), None) if archs else None
    if cls is None:
        raise ValueError(f"{model_dir / CONFIG}: architectures {archs!r} names no transformers model "
                         "class; build the model yourself and pass model=")
    hf = {k: v for k, v in cfg.items() if k != "quantization_config"}
    try:
        config = transformers.AutoConfig.for_model(**hf)
        with parameters_on_meta():
            return cls(config)
    except Exception as e:  # noqa: BLE001  (transformers' config validation has its own error types)
        raise ValueError(f"{model_dir / CONFIG}: not a usable transformers config: "
                         f"{type(e).__name__}: {e}") from None


def swap_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(get_submodule(model, parent), child, new)


def linear_shape(model: nn.Module, name: str, where: str):
    """(module, K, N) of the linear ``name`` (``nn.Linear`` or GPT-2's ``Conv1D``)."""
    try:
        m = get_submodule(model, name)
    except AttributeError:
        raise ValueError(f"{where}: the checkpoint holds a quantised layer {name!r}, which the model "
                         "does not have") from None
    if isinstance(m, nn.Linear):
        return m, m.in_features, m.out_features
    if is_conv1d(m):
        return m, m.weight.shape[0], m.weight.shape[1]
    raise ValueError(f"{where}: {name} is a {type(m).__name__}, not a linear layer")


def _unstored_buffer_tails(model: nn.Module) -> set:
    """``"<module>.<buffer>"`` of every buffer the model does not save (non-persistent)."""
    tails = set()
    for mname, m in model.named_modules():
        if isinstance(m, QuantLinear):  # its weight buffers are saved, through its own hooks
            continue
        for b in m._non_persistent_buffers_set:
            tails.add(".".join(f"{mname}.{b}".split(".")[-2:]))
    return tails


def _ignorable(model: nn.Module, key: str, unstored: set) -> bool:
    """A stored tensor the model computes itself: one its class lists in
    ``_keys_to_ignore_on_load_unexpected``, or a buffer it does not save (e.g. the per-layer
    ``rotary_emb.inv_freq`` of older Llama checkpoints; transformers ignores those too)."""
    for pattern in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ():
        if re.search(pattern, key):
            return True
    return ".".join(key.split(".")[-2:]) in unstored


def import_model(model_dir, model: Optional[nn.Module], dtype: Optional[torch.dtype],
                 layer_importer: Callable[[str, TensorFile, int, int], tuple],
                 marker: str = ".qweight", fmt: str = "AWQ/GPTQ") -> nn.Module:
    """The model-level import shared by AWQ, GPTQ and compressed-tensors: build (or take) the
    model, turn every layer with a ``<name><marker>`` tensor into a QuantLinear through
    ``layer_importer(name, tensors, K, N)`` (returns the QuantLinear and the tensor keys it
    consumed), load everything else."""
    model_dir = Path(model_dir)
    cfg = read_config(model_dir)
    tensors = TensorFile(model_dir)
    names = quantised_layer_names(tensors, marker)
    if not names:
        raise ValueError(f"{model_dir}: no '<layer>{marker}' tensors: not a {fmt} checkpoint")
    if model is None:
        model = build_model(cfg, model_dir)
    used = set()
    for name in names:
        old, k, n = linear_shape(model, name, str(model_dir))
        ql, keys = layer_importer(name, tensors, k, n)
        if hasattr(old, "bias") and old.bias is not None and ql.bias is None:
            raise ValueError(f"{model_dir}: {name}.bias is missing (the model's layer has a bias)")
        if is_conv1d(old):
            ql._lp_conv1d = True  # flows.io records it when the model is saved again
        swap_module(model, name, ql)
        used.update(keys)
    rest = {k: tensors.get(k) for k in tensors.keys() if k not in used}
    try:
        result = model.load_state_dict(rest, strict=False, assign=True)
    except RuntimeError as e:  # e.g. a tensor of another shape than the config gives
        raise ValueError(f"{model_dir}: the tensors do not match the config: {e}") from None
    unstored = _unstored_buffer_tails(model) if result.unexpected_keys else set()
    u = [key for key in result.unexpected_keys if not _ignorable(model, key, unstored)]
    if u:
        raise ValueError(f"{model_dir}: tensors the model does not have: "
                         f"{u[:8]}{' …' if len(u) > 8 else ''}")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    still = [k for k, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if still:
        raise ValueError(f"{model_dir}: the checkpoint lacks tensors the model needs: "
                         f"{still[:8]}{' …' if len(still) > 8 else ''}")
    if dtype is not None:
        model.to(dtype)  # QuantLinear keeps its scales' dtype
    return model.eval()


# ---- exporting ----------------------------------------------------------------------------------

def exports_unfused(export):
    """Decorator of an ``export_*(model, ...)``: it runs on the model with its fused projections
    (nn/fused.py) split back into their separate layers, exactly, so the exported checkpoint is
    the one the unfused model gives; the model is fused again afterwards."""
    from ..nn.fused import unfused

    @functools.wraps(export)
    def wrapper(model, *args, **kwargs):
        with unfused(model):
            return export(model, *args, **kwargs)
    return wrapper


def quant_layers(model: nn.Module, fmt: str) -> Dict[str, QuantLinear]:
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not layers:
        raise ValueError(f"export_{fmt}: the model has no QuantLinear layers: quantise it first")
    for name, m in layers.items():
        if m.spec.axis != "oc":
            raise ValueError(f"export_{fmt}: layer {name!r} is quantised per input channel (axis='ic'), "
                             f"which {fmt.upper()} cannot store (its groups run along K); quantise "
                             "it per output channel")
        if m.spec.rotated:
            raise ValueError(f"export_{fmt}: layer {name!r} is rotated (rotation={m.spec.rotation!r}, "
                             f"block {m.spec.rotation_block}): its stored weight is W·R, which "
                             f"{fmt.upper()} kernels would run without the input rotation; quantise "
                             "it with rotate='none' to export")
        for side in ("outlier_idx", "lorc_a"):
            if getattr(m, side, None) is not None:
                raise ValueError(f"export_{fmt}: layer {name!r} has a 16-bit side path ({side}), "
                                 f"which {fmt.upper()} cannot store")
    return layers


def common_setting(layers: Dict[str, QuantLinear], fmt: str, what: str, value_of) -> object:
    values = {}
    for name, m in layers.items():
        values.setdefault(value_of(m), []).append(name)
    if len(values) > 1:
        listing = "; ".join(f"{v!r}: {names[:3]}" for v, names in values.items())
        raise ValueError(f"export_{fmt}: {fmt.upper()} checkpoints have one {what} for all layers, "
                         f"these layers differ ({listing})")
    return next(iter(values))


def float_tensors(model: nn.Module, layers: Iterable[str]) -> Dict[str, torch.Tensor]:
    """The model's state dict without the QuantLinear weights (their biases stay), contiguous
    CPU copies; a tensor sharing storage with an earlier one (tied embeddings) is dropped when
    the config ties them (loaders re-tie) and copied otherwise."""
    from ..flows.io import _dedupe

    prefixes = tuple(f"{n}." for n in layers)
    weight_keys = ("qweight", "scales", "zeros", "in_perm", "outlier_idx", "outlier_val", "lorc_a",
                   "lorc_b", "rot_signs")
    sd = {k: v for k, v in model.state_dict().items()
          if not (k.startswith(prefixes) and k.rpartition(".")[2] in weight_keys)}
    out, aliases = _dedupe(sd)
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    for dropped, kept in aliases.items():
        if not tied:
            out[dropped] = out[kept].clone()
    return out


def hf_config(model: nn.Module, qcfg: dict) -> dict:
    cfg = model.config.to_dict() if hasattr(model, "config") else {}
    # as save_pretrained does, so loaders know the class (a config-built model has none yet)
    cfg["architectures"] = [type(model).__name__]
    cfg["quantization_config"] = qcfg
    return cfg


# ---- what the per-OC group formats cannot hold: refuse, or requantise on request ----------------

def unrepresentable(m: QuantLinear) -> list:
    """Why a layer has no counterpart in the per-OC group formats (compressed-tensors, GGUF):
    per-input-channel groups, a rotation, 16-bit side paths (empty list: none of these)."""
    why = []
    if m.spec.axis != "oc":
        why.append("per-input-channel groups (axis='ic'; these formats group along K)")
    # rotations (QuantSpec.rotation "none"/"hadamard" and the layer's rot_signs, once they
    # exist): checked by attribute, so this works with and without them
    if getattr(m.spec, "rotation", None) not in (None, "none") or getattr(m, "rot_signs", None) is not None:
        why.append("a rotation")
    for side in ("outlier_idx", "lorc_a"):
        if getattr(m, side, None) is not None:
            why.append(f"a 16-bit side path ({side})")
    return why


def weight_error(approx: torch.Tensor, exact: torch.Tensor) -> dict:
    """``max_abs_error`` and ``rel_error`` (Frobenius, relative to ``exact``) of a weight."""
    d = (approx.double() - exact.double())
    norm = float(exact.double().norm())
    return {"max_abs_error": float(d.abs().max()) if d.numel() else 0.0,
            "rel_error": float(d.norm()) / norm if norm > 0 else float(d.norm())}


def requantize_layer(m: QuantLinear, spec: QuantSpec) -> tuple:
    """``(new layer, error)``: the layer's effective weight (what it multiplies its input by:
    dequantised codes plus any side paths, any rotation undone, input channels in the input's
    order) quantised again, round-to-nearest, with ``spec``; ``error`` compares the new weight
    with that effective weight."""
    from ..nn import quantize_linear

    w = m.effective_weight(torch.float32)
    lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
    with torch.no_grad():
        lin.weight.copy_(w)
        if m.bias is not None:
            lin.bias.copy_(m.bias.detach().float())
    new = quantize_linear(lin, spec)
    if m.bias is not None:
        new.bias = nn.Parameter(m.bias.detach().clone(), requires_grad=False)
    return new, weight_error(new.dequantized_weight(torch.float32), w)


def refuse_unrepresentable(layers: Dict[str, QuantLinear], fmt: str, requantize: bool) -> Dict[str, list]:
    """``{name: reasons}`` of the layers the format cannot hold; raises (naming them and why)
    unless ``requantize``, in which case the caller converts them."""
    bad = {name: why for name, m in layers.items() if (why := unrepresentable(m))}
    if bad and not requantize:
        listing = "; ".join(f"{name}: {', '.join(why)}" for name, why in list(bad.items())[:8])
        more = f" (and {len(bad) - 8} more)" if len(bad) > 8 else ""
        raise ValueError(f"export_{fmt}: {len(bad)} layer(s) have features {fmt} cannot store: "
                         f"{listing}{more}. Pass requantize=True (CLI: --requantize) to convert them "
                         "to the format's per-output-channel groups; the added error is reported "
                         "per layer")
    return bad
