"""Save and load quantised models: safetensors + JSON, never pickle.

A saved directory holds

* ``model.safetensors`` -- the model's ``state_dict`` (``QuantLinear`` layers in the canonical
  layout of docs/format.md; tensors sharing storage, e.g. tied embeddings, stored once). A
  sharded ``save_pretrained`` directory (``model-0000i-of-0000n.safetensors`` and
  ``model.safetensors.index.json``) loads too;
* ``config.json`` -- the model's Hugging Face config plus ``quantization_config``:
  ``{"quant_method": "layerpress", "format_version": 2, "model_class": ..., "layers": {name:
  {"in_features", "out_features", "bias", "conv1d", "spec": QuantSpec.to_dict()}},
  "aliases": {dropped key: stored key}}``. A layer with side paths (outliers, LoRC; docs/format.md
  §8) adds ``"outliers": nnz, "lorc_rank": r, "side_dtype": "float16"``; the tensors must match
  them exactly. Format 2 adds rotated layers (a spec with ``rotation``, ``rotation_block``,
  ``rotation_seed`` and the signs as the tensor ``<layer>.rot_signs``); format-1 files (no
  rotation) load unchanged.

Writing is atomic: everything goes to a temporary directory beside the target, which is then
renamed into place. :func:`load_quantized` rebuilds the original model class from the saved
config (or takes a model you built, e.g. from the original checkpoint directory), swaps the
listed linears for ``QuantLinear`` with their specs and loads the tensors strictly.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Optional, Union

import torch
from torch import nn

from ..nn import SIDE_DTYPES, QuantLinear
from ..spec import QuantSpec
from .models import get_submodule, is_conv1d

__all__ = ["save_quantized", "load_quantized", "quantization_config", "layer_entry",
           "swap_in_quantlinears", "FORMAT_VERSION", "READ_FORMAT_VERSIONS"]

FORMAT_VERSION = 2  # 2: rotated layers (QuantSpec.rotation, <layer>.rot_signs)
READ_FORMAT_VERSIONS = (1, 2)  # what load_quantized reads
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"  # sharded save_pretrained output
CONFIG = "config.json"


def layer_entry(m: QuantLinear) -> dict:
    """The config entry of one ``QuantLinear`` (what :func:`swap_in_quantlinears` rebuilds)."""
    entry = {"in_features": m.in_features, "out_features": m.out_features,
             "bias": m.bias is not None, "conv1d": bool(getattr(m, "_lp_conv1d", False)),
             "spec": m.spec.to_dict()}
    entry.update(m.side_config())
    return entry


def quantization_config(model: nn.Module) -> dict:
    """The ``quantization_config`` entry describing every ``QuantLinear`` of ``model``."""
    layers = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            layers[name] = layer_entry(m)
    if not layers:
        raise ValueError("the model has no QuantLinear layers: quantise it first")
    return {"quant_method": "layerpress", "format_version": FORMAT_VERSION,
            "model_class": type(model).__name__, "layers": layers}


def _dedupe(sd: dict):
    """Contiguous copies with storage shared between keys stored once: (tensors, aliases)."""
    seen, out, aliases = {}, {}, {}
    for k, t in sd.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and key in seen:
            aliases[k] = seen[key]
            continue
        seen[key] = k
        out[k] = t.detach().to("cpu").contiguous()
    return out, aliases


def save_quantized(model: nn.Module, path: Union[str, Path], overwrite: bool = False,
                   extra: Optional[dict] = None) -> Path:
    """Writes ``model`` (with its ``QuantLinear`` layers) to the directory ``path`` atomically.
    ``extra`` (JSON-serialisable, e.g. a report) is stored under ``quantization_config.extra``."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists (pass overwrite=True to replace it)")
    qcfg = quantization_config(model)
    tensors, aliases = _dedupe(model.state_dict())
    qcfg["aliases"] = aliases
    if extra is not None:
        qcfg["extra"] = extra
    cfg = model.config.to_dict() if hasattr(model, "config") else {}
    if cfg.get("dtype") is None and cfg.get("torch_dtype") is None:
        # config-built models carry no dtype; without one, transformers' dtype="auto" would take
        # the first float tensor it meets (a layer's fp16 scales) as the model's dtype
        floats = [p.dtype for p in model.parameters() if p.is_floating_point()]
        if floats:
            cfg["dtype"] = str(floats[0]).replace("torch.", "")
    cfg["quantization_config"] = qcfg
    return write_checkpoint(path, tensors, cfg, overwrite=overwrite,
                            metadata={"format": "pt", "layerpress": str(FORMAT_VERSION)})


def write_checkpoint(path: Union[str, Path], tensors: Dict[str, torch.Tensor], config: dict,
                     extra_json: Optional[Dict[str, dict]] = None, overwrite: bool = False,
                     metadata: Optional[Dict[str, str]] = None) -> Path:
    """Writes ``model.safetensors`` + ``config.json`` (+ extra JSON files) to the directory
    ``path`` atomically: everything goes to a temporary directory beside it, which is then
    renamed into place, so an interrupted write never leaves a complete-looking checkpoint."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists (pass overwrite=True to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS),
                  metadata=metadata or {"format": "pt"})
        for name, obj in {CONFIG: config, **(extra_json or {})}.items():
            with open(tmp / name, "w", encoding="utf-8") as f:
                json.dump(obj, f, indent=2, sort_keys=True, default=str)
                f.flush()
                os.fsync(f.fileno())
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / "x")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_json(path: Path) -> dict:
    """A JSON object from ``path``; ValueError naming the file if it is not one."""
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return d


def _read_config(path: Path) -> dict:
    if not path.is_dir():
        raise FileNotFoundError(f"no saved layerpress model at {path} (not a directory)")
    cfg_path = path / CONFIG
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} is missing: not a saved layerpress model")
    cfg = read_json(cfg_path)
    q = cfg.get("quantization_config")
    if not isinstance(q, dict) or q.get("quant_method") != "layerpress":
        raise ValueError(f"{cfg_path}: no layerpress quantization_config")
    if q.get("format_version") not in READ_FORMAT_VERSIONS:
        raise ValueError(f"{cfg_path}: format_version {q.get('format_version')!r} is not supported "
                         f"(this layerpress reads {', '.join(map(str, READ_FORMAT_VERSIONS))})")
    if not isinstance(q.get("layers"), dict) or not q["layers"]:
        raise ValueError(f"{cfg_path}: quantization_config.layers is missing or empty")
    return cfg


def _build_model(cfg: dict) -> nn.Module:
    import transformers

    q = cfg["quantization_config"]
    cls_name = q.get("model_class")
    cls = getattr(transformers, str(cls_name), None)
    if cls is None:
        raise ValueError(f"unknown model class {cls_name!r}: pass model= (built from the original "
                         "checkpoint) to load_quantized")
    hf = {k: v for k, v in cfg.items() if k != "quantization_config"}
    config = transformers.AutoConfig.for_model(**hf)
    return cls(config)


def _side_args(name: str, info: dict) -> dict:
    """QuantLinear constructor arguments for the side paths recorded in a layer entry."""
    try:
        outliers, rank = int(info.get("outliers", 0)), int(info.get("lorc_rank", 0))
        dt = getattr(torch, str(info.get("side_dtype", "float16")))
    except (TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"quantization_config.layers[{name!r}]: invalid side paths: {e}") from None
    if dt not in SIDE_DTYPES:
        raise ValueError(f"quantization_config.layers[{name!r}]: side_dtype {info.get('side_dtype')!r} "
                         f"is not one of {[str(d).replace('torch.', '') for d in SIDE_DTYPES]}")
    return {"outliers": outliers, "lorc_rank": rank, "side_dtype": dt}


def swap_in_quantlinears(model: nn.Module, layers: dict) -> None:
    """Replaces the linears named in ``layers`` (config entries, :func:`layer_entry`) by empty
    ``QuantLinear`` modules of those specs and side-path sizes, ready for ``load_state_dict``."""
    _swap_in(model, layers)


def _swap_in(model: nn.Module, layers: dict) -> None:
    for name, info in layers.items():
        try:
            spec = QuantSpec.from_dict(info["spec"])
            k, n, bias = int(info["in_features"]), int(info["out_features"]), bool(info["bias"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"quantization_config.layers[{name!r}] is invalid: {e}") from None
        side = _side_args(name, info)
        try:
            old = get_submodule(model, name)
        except AttributeError:
            raise ValueError(f"quantization_config names layer {name!r}, which the model does not "
                             "have") from None
        if isinstance(old, QuantLinear):
            if (old.spec != spec or (old.in_features, old.out_features) != (k, n)
                    or (old.outlier_count, old.lorc_rank) != (side["outliers"], side["lorc_rank"])):
                raise ValueError(f"{name}: already a QuantLinear with a different spec/shape/side paths")
            continue
        if not (isinstance(old, nn.Linear) or is_conv1d(old)):
            raise ValueError(f"{name}: expected a linear, found {type(old).__name__}")
        w = old.weight
        ok_, on_ = (w.shape[1], w.shape[0]) if isinstance(old, nn.Linear) else (w.shape[0], w.shape[1])
        if (ok_, on_) != (k, n):
            raise ValueError(f"{name}: config says [{n}, {k}] but the model's layer is [{on_}, {ok_}]")
        try:
            new = QuantLinear(k, n, spec, bias=bias, device=w.device, dtype=w.dtype, **side)
        except ValueError as e:
            raise ValueError(f"quantization_config.layers[{name!r}]: {e}") from None
        new._lp_conv1d = is_conv1d(old)
        parent, _, child = name.rpartition(".")
        setattr(get_submodule(model, parent), child, new)


def _load_safetensors(file: Path) -> Dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{file}: unreadable safetensors file (truncated or corrupt?): {e}") from None


def _read_tensors(path: Path):
    """The saved tensors: ``model.safetensors``, or the shards that
    ``model.safetensors.index.json`` lists (``save_pretrained`` of a large model). Returns
    ``(state_dict, what was read)``; every indexed key must be in the shard the index names."""
    single, index = path / WEIGHTS, path / WEIGHTS_INDEX
    if single.is_file():
        return _load_safetensors(single), single
    if not index.is_file():
        raise FileNotFoundError(f"{single} is missing (and there is no {WEIGHTS_INDEX})")
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError("weight_map must map tensor names to file names")
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
    sd: Dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        if Path(shard).name != shard:
            raise ValueError(f"{index}: shard {shard!r} is not a file name in {path}")
        file = path / shard
        if not file.is_file():
            raise FileNotFoundError(f"{file} is missing (listed in {index})")
        part = _load_safetensors(file)
        for key in (k for k, v in weight_map.items() if v == shard):
            if key not in part:
                raise ValueError(f"{file}: {key!r} is missing (listed in {index})")
            sd[key] = part[key]
    return sd, index


def load_quantized(path: Union[str, Path], model: Optional[nn.Module] = None) -> nn.Module:
    """Loads a directory written by :func:`save_quantized`. Without ``model``, rebuilds the
    original model class from the saved config; with ``model`` (the original architecture,
    e.g. ``AutoModel.from_pretrained(original_dir)``), fills that one in place. Reads
    ``model.safetensors`` or, as ``save_pretrained`` writes for large models, the shards listed in
    ``model.safetensors.index.json``. Returns the model in eval mode. Raises FileNotFoundError /
    ValueError with the reason on bad input."""
    path = Path(path)
    cfg = _read_config(path)
    q = cfg["quantization_config"]
    sd, wpath = _read_tensors(path)
    if model is None:
        model = _build_model(cfg)
    elif q.get("model_class") and type(model).__name__ != q["model_class"]:
        raise ValueError(f"saved from a {q['model_class']}, got a {type(model).__name__}")
    _swap_in(model, q["layers"])
    for dropped, kept in (q.get("aliases") or {}).items():
        if kept not in sd:
            raise ValueError(f"{wpath}: alias {dropped!r} -> {kept!r}, but {kept!r} is not stored")
        sd[dropped] = sd[kept]
    try:
        result = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:
        raise ValueError(f"{path}: the tensors do not match the config: {e}") from None
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if missing or unexpected:
        raise ValueError(f"{path}: the tensors do not match the config: missing "
                         f"{missing[:8]}{' …' if len(missing) > 8 else ''}, unexpected "
                         f"{unexpected[:8]}{' …' if len(unexpected) > 8 else ''}")
    model.eval()
    return model
