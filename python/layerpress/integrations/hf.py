"""Hugging Face transformers integration: the ``layerpress`` quantisation method.

Once registered (``import layerpress`` arranges it, see :mod:`layerpress.integrations`),

* ``AutoModelForCausalLM.from_pretrained(dir)`` / ``AutoModel.from_pretrained(dir)`` load a
  directory written by :func:`layerpress.flows.save_quantized` (or by ``save_pretrained`` of such
  a model): the listed linears become :class:`~layerpress.QuantLinear` on the meta device before
  the weights are read, the canonical ``qweight``/``scales``/``zeros`` are loaded by transformers,
  and each layer is then repacked into its device's kernel layout;
* ``model.save_pretrained(dir)`` writes the same format back (canonical tensors, tied weights
  stored once with ``quantization_config.aliases``), readable by both ``from_pretrained`` and
  :func:`layerpress.flows.load_quantized`, with a digest per tensor (flows/integrity.py) that
  ``from_pretrained`` checks before loading (``LAYERPRESS_VERIFY=0`` in the environment skips it).

The checkpoint must already be quantised (``layerpress.flows.quantize_model`` + ``save_quantized``):
passing a :class:`LayerpressConfig` to ``from_pretrained`` of a float model is refused.
"""
from __future__ import annotations

import os
import warnings
from typing import Dict

import torch
from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                          register_quantization_config, register_quantizer)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..flows.integrity import check_digests, digests_entry, tensor_digest
from ..flows.io import FORMAT_VERSION, READ_FORMAT_VERSIONS, _dedupe, quantization_config, swap_in_quantlinears
from ..flows.models import get_submodule
from ..nn import QuantLinear
from ..spec import QuantSpec

__all__ = ["QUANT_METHOD", "LayerpressConfig", "LayerpressHfQuantizer", "compile_decode", "register"]

QUANT_METHOD = "layerpress"


class LayerpressConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a layerpress checkpoint (docs/flows.md, flows/io.py):
    ``format_version``, ``model_class``, ``layers`` (per quantised linear: ``in_features``,
    ``out_features``, ``bias``, ``conv1d``, ``spec``) and ``aliases`` (tied keys stored once).
    Fields this version does not know (e.g. ``extra``) are kept and written back unchanged."""

    def __init__(self, layers: Dict[str, dict] = None, format_version: int = FORMAT_VERSION,
                 model_class: str = None, aliases: Dict[str, str] = None, **kwargs):
        method = kwargs.pop("quant_method", QUANT_METHOD)
        if method != QUANT_METHOD:
            raise ValueError(f"quant_method: expected {QUANT_METHOD!r}, got {method!r}")
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.model_class = model_class
        self.layers = dict(layers or {})
        self.aliases = dict(aliases or {})
        for key, value in kwargs.items():
            setattr(self, key, value)
        self.post_init()

    def post_init(self):
        if self.format_version not in READ_FORMAT_VERSIONS:
            raise ValueError(f"quantization_config.format_version {self.format_version!r} is not "
                             f"supported (this layerpress reads {', '.join(map(str, READ_FORMAT_VERSIONS))})")
        if not self.layers:
            raise ValueError("quantization_config.layers is missing or empty: a layerpress config "
                             "describes the quantised layers of a saved model")
        for name, info in self.layers.items():
            try:
                QuantSpec.from_dict(info["spec"])
                int(info["in_features"]), int(info["out_features"]), bool(info["bias"])
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"quantization_config.layers[{name!r}] is invalid: {e}") from None


def _layers_for(model: torch.nn.Module, layers: Dict[str, dict]) -> Dict[str, tuple]:
    """``{name in model: (saved name, layer entry)}``: renames the saved layer names for ``model``, which may be the saved model's base model
    (``AutoModel`` of a ``...ForCausalLM`` checkpoint: drop the ``base_model_prefix`` and the
    head's layers) or a model with a head around the saved base model (add the prefix)."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    is_base = not prefix or not hasattr(model, prefix)

    def has_module(name):
        try:
            get_submodule(model, name)
            return True
        except AttributeError:
            return False

    out = {}
    for name, info in layers.items():
        # a fused layer (nn/fused.py) does not exist before the swap: its first part does
        fused = info.get("fused") if isinstance(info, dict) else None
        parts = fused.get("parts") if isinstance(fused, dict) else None
        if isinstance(parts, (list, tuple)) and parts:  # anything else: the loader names the field
            def has(n, _p=str(parts[0])):
                return has_module(f"{n.rpartition('.')[0]}.{_p}".lstrip("."))
        else:
            has = has_module
        if has(name):
            out[name] = (name, info)
        elif is_base and name.startswith(prefix + ".") and has(name[len(prefix) + 1:]):
            out[name[len(prefix) + 1:]] = (name, info)
        elif not is_base and has(f"{prefix}.{name}"):
            out[f"{prefix}.{name}"] = (name, info)
        elif is_base and prefix and not name.startswith(prefix + "."):
            continue  # a layer of the head this base model does not have (e.g. lm_head)
        else:
            out[name] = (name, info)  # swap_in_quantlinears names it in its error
    return out


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
              "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
              "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
_ABSENT = object()
_SIDE_FIELDS = ("outliers", "lorc_rank", "side_dtype")  # layer-entry fields of the side paths


def _checkpoint_tensors(files) -> Dict[str, tuple]:
    """key -> (shape, dtype) of every tensor in the checkpoint's safetensors files (headers only)."""
    out = {}
    for f in files or ():
        if str(f).endswith(".safetensors"):
            with _open_safetensors(f) as h:
                for key in h.keys():
                    sl = h.get_slice(key)
                    dtype = _ST_DTYPES.get(sl.get_dtype())
                    if dtype is not None:
                        out[key] = (tuple(sl.get_shape()), dtype)
    return out


def _open_safetensors(file):
    """``safe_open`` of a checkpoint file; a corrupt one is a ValueError naming it (safetensors'
    own error names no file)."""
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(file), framework="pt")
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{file}: unreadable safetensors file (truncated or corrupt?): {e}") from None


def _verify_checkpoint(qcfg: dict, files) -> None:
    """Checks every tensor of the checkpoint's safetensors files against the recorded digests
    (before transformers reads them; the files are then in the page cache)."""
    from pathlib import Path

    from safetensors import SafetensorError

    files = [f for f in files or () if str(f).endswith(".safetensors")]
    if not files:
        return
    digests, file_of = {}, {}
    for f in files:
        with _open_safetensors(f) as h:
            for key in h.keys():  # one tensor in memory at a time
                try:
                    t = h.get_tensor(key)
                except (SafetensorError, OSError) as e:
                    raise ValueError(f"{f}: {key}: unreadable tensor (truncated or corrupt?): {e}") from None
                digests[key], file_of[key] = tensor_digest(t), Path(f).name
    check_digests(qcfg, digests, file_of, Path(files[0]).parent)


def _expose_for_loading(m: QuantLinear, saved_name: str, stored: Dict[str, tuple]) -> None:
    """Makes every tensor of ``m``'s state dict a persistent buffer or parameter on the meta
    model, so that transformers loads it. QuantLinear keeps its tensors as non-persistent buffers
    (its state_dict writes them itself, in the canonical layout), and transformers (a) loads only
    the keys of the meta model's state_dict, by setattr, and (b) afterwards refills every
    non-persistent buffer with torch.empty_like. Optional tensors the checkpoint holds but the
    freshly built layer does not (e.g. ``in_perm``) get a meta placeholder of the stored shape.
    :func:`_finish_loading` undoes all of it and loads the layer through its own
    ``load_state_dict``."""
    keys = set(m.state_dict(keep_vars=True))
    added = {}
    prefix = saved_name + "."
    for key, (shape, dtype) in stored.items():
        attr = key[len(prefix):] if key.startswith(prefix) else ""
        if not attr or "." in attr or attr in keys or attr in m._parameters or attr in m._modules:
            continue
        added[attr] = m._buffers.get(attr, _ABSENT)
        m._buffers[attr] = torch.empty(shape, dtype=dtype, device="meta")
        keys.add(attr)
    exposed = {k for k in keys if k in m._non_persistent_buffers_set}
    m._non_persistent_buffers_set.difference_update(keys)
    m._lp_hf_loading = (sorted(keys), added, exposed)


def _finish_loading(m: QuantLinear, name: str) -> None:
    keys, added, exposed = m._lp_hf_loading
    del m._lp_hf_loading
    state = {}
    for key in keys:
        t = getattr(m, key)
        # transformers flags every tensor it read from the checkpoint
        if t is None or t.is_meta or not getattr(t, "_is_hf_initialized", False):
            raise ValueError(f"{name}.{key}: missing from the checkpoint (or stored with another "
                             "shape than the config gives)")
        state[key] = t
    for key, original in added.items():
        if original is _ABSENT:
            del m._buffers[key]  # the layer's loader takes it from the state dict
        # else: an optional tensor the layer registers empty (e.g. a side path the config did not
        # size); it keeps the stored shape, which the layer's loader then checks and adopts
    m._non_persistent_buffers_set.update(exposed)
    try:
        # the layer's own loading: validation, repacking for the device's kernel, side paths
        m.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"{name}: {e}") from None



class LayerpressHfQuantizer(HfQuantizer):
    """Loads and saves pre-quantised layerpress checkpoints inside ``from_pretrained`` /
    ``save_pretrained``."""

    requires_calibration = True

    def __init__(self, quantization_config: LayerpressConfig, **kwargs):
        if not kwargs.get("pre_quantized", True):
            raise ValueError("the layerpress quantisation method loads checkpoints that layerpress "
                             "already quantised: quantise with layerpress.flows.quantize_model "
                             "and save with save_quantized or save_pretrained first")
        super().__init__(quantization_config, **kwargs)

    def update_attn_implementation(self, config):
        # Runs before from_pretrained resolves dtype="auto". Without a dtype in the config,
        # transformers takes the dtype of the checkpoint's first floating tensor, which in a
        # layerpress checkpoint may be a layer's fp16 scales (e.g. "lm_head.scales" sorts first),
        # turning a float32 model into a float16 one. A config without a dtype comes from a model
        # built from its config (from_pretrained and save_pretrained both record one), i.e. in
        # the default dtype. An explicit from_pretrained(dtype=...) still wins.
        if getattr(config, "dtype", None) is None:
            config.dtype = torch.get_default_dtype()
        return config

    def _process_model_before_weight_loading(self, model, **kwargs):
        renamed = _layers_for(model, self.quantization_config.layers)
        # Side paths (outliers, LoRC) are not sized here: a QuantLinear cannot build them on the
        # meta device (their checks read values). _expose_for_loading gives them placeholders of
        # the stored shapes instead, and _finish_loading checks them against the config.
        swap_in_quantlinears(model, {n: {k: v for k, v in info.items() if k not in _SIDE_FIELDS}
                                     for n, (_, info) in renamed.items()})
        self._side_sizes = {n: {k: info[k] for k in ("outliers", "lorc_rank") if k in info}
                            for n, (_, info) in renamed.items()}
        saved_name = {n: saved for n, (saved, _) in renamed.items()}
        stored = _checkpoint_tensors(kwargs.get("checkpoint_files"))
        if os.environ.get("LAYERPRESS_VERIFY", "1") != "0":
            _verify_checkpoint(self.quantization_config.to_dict(), kwargs.get("checkpoint_files"))
        for name, m in model.named_modules():
            if isinstance(m, QuantLinear):
                _expose_for_loading(m, saved_name.get(name, name), stored)
        # A family's _init_weights may reach from a parent into a child it assumes is a float
        # linear (GPT-2 rescales attn.c_proj.weight). The checkpoint holds every tensor of a
        # quantised model, so the parents of our layers need no initialisation; children are
        # still visited one by one.
        for m in model.modules():
            if any(isinstance(c, QuantLinear) for c in m.children()):
                m._is_hf_initialized = True
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        for name, m in model.named_modules():
            if isinstance(m, QuantLinear) and hasattr(m, "_lp_hf_loading"):
                _finish_loading(m, name)
                for field, want in getattr(self, "_side_sizes", {}).get(name, {}).items():
                    got = getattr(m, {"outliers": "outlier_count"}.get(field, field), 0)
                    if int(want) != got:
                        raise ValueError(f"{name}: the config says {field}={want}, the checkpoint "
                                         f"holds {got}")
        return model

    def get_state_dict_and_metadata(self, model):
        # The canonical state dict with tensors that share storage (tied embeddings) stored once,
        # and a quantization_config describing this model: the same file save_quantized writes,
        # so load_quantized reads it too. (transformers writes config.json after this call.)
        tensors, aliases = _dedupe(model.state_dict())
        cfg = self.quantization_config
        fresh = quantization_config(model)
        cfg.layers, cfg.model_class, cfg.format_version = fresh["layers"], fresh["model_class"], fresh["format_version"]
        cfg.aliases = aliases
        cfg.digests = digests_entry(tensors)
        return tensors, {"layerpress": str(cfg.format_version)}

    def _dequantize(self, model, dtype=None):
        """``model.dequantize()``: every QuantLinear back to a float ``nn.Linear`` (GPT-2:
        ``Conv1D``) holding the weight the layer computes with (dequantised, plus side paths)."""
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        from ..nn.fused import unfuse
        unfuse(model)  # fused projections (nn/fused.py) back to their parts, then each to a linear
        for name, m in list(model.named_modules()):
            if not isinstance(m, QuantLinear):
                continue
            weight_of = getattr(m, "effective_weight", m.dequantized_weight)
            dt = dtype or (m.bias.dtype if m.bias is not None else torch.float32)
            w = weight_of(torch.float32).to(dt)
            if getattr(m, "_lp_conv1d", False):
                from transformers.pytorch_utils import Conv1D

                new = Conv1D(m.out_features, m.in_features).to(device=w.device, dtype=dt)
                new.weight.data.copy_(w.t())
                if m.bias is None:
                    new.bias = None
            else:
                new = torch.nn.Linear(m.in_features, m.out_features, bias=m.bias is not None,
                                      device=w.device, dtype=dt)
                new.weight.data.copy_(w)
            if m.bias is not None:
                new.bias.data.copy_(m.bias.detach())
            parent, _, child = name.rpartition(".")
            setattr(get_submodule(model, parent), child, new)
        return model

    def is_serializable(self, *args, **kwargs):
        return True

    @property
    def is_trainable(self):
        return True  # frozen low-bit weights; gradients flow to the inputs (adapters, LoRA)

    @property
    def is_compileable(self):
        return True  # every layerpress op has a fake implementation


def compile_decode(model, mode: str = "default", dynamic=None):
    """Makes ``model.generate`` run its decode steps as one compiled graph with a static KV cache
    (transformers' ``cache_implementation="static"`` and ``compile_config``), on the CPU too:
    transformers compiles only on accelerators unless asked. The layerpress ops trace as one
    fullgraph (every op has a fake), so the per-module Python and dispatch cost of eager decoding
    is gone. Returns ``model``; its ``generation_config`` is changed in place (pass
    ``disable_compile=True`` to one ``generate`` call to run it eagerly).

    The first ``generate`` compiles (seconds to minutes, growing with the number of layers); a
    call with another cache length (prompt + ``max_new_tokens``) recompiles once with that length
    dynamic, later lengths reuse it. ``mode`` and ``dynamic`` go to ``torch.compile``
    (``"reduce-overhead"`` adds CUDA graphs on a GPU)."""
    from transformers import CompileConfig

    gen = getattr(model, "generation_config", None)
    if gen is None:
        raise TypeError(f"compile_decode: {type(model).__name__} has no generation_config "
                        "(expected a transformers model that can generate)")
    config = CompileConfig(fullgraph=True, mode=mode, dynamic=dynamic)
    config._compile_all_devices = True  # transformers' own switch for compiling on the CPU
    gen.cache_implementation = "static"
    gen.compile_config = config
    return model


def register() -> None:
    """Registers :class:`LayerpressConfig` and :class:`LayerpressHfQuantizer` under
    ``"layerpress"`` (idempotent; leaves someone else's registration alone with a warning)."""
    for mapping, cls, reg in ((AUTO_QUANTIZATION_CONFIG_MAPPING, LayerpressConfig, register_quantization_config),
                              (AUTO_QUANTIZER_MAPPING, LayerpressHfQuantizer, register_quantizer)):
        current = mapping.get(QUANT_METHOD)
        if current is None:
            reg(QUANT_METHOD)(cls)
        elif current.__qualname__ != cls.__qualname__ or current.__module__ != cls.__module__:
            warnings.warn(f"transformers already has a {QUANT_METHOD!r} quantisation method "
                          f"({current.__module__}.{current.__qualname__}); layerpress leaves it",
                          RuntimeWarning)


register()
