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
  them exactly. ``"digests"`` records a digest per stored tensor (flows/integrity.py), checked
  on load.
  them exactly. Format 2 adds rotated layers (a spec with ``rotation``, ``rotation_block``,
  ``rotation_seed`` and the signs as the tensor ``<layer>.rot_signs``); format-1 files (no
  rotation) load unchanged. Format 3 (written only when the model has fused projections,
  nn/fused.py) adds fused layers: the entry of ``<parent>.fused_q_k_v`` carries ``"fused":
  {"parts": ["q_proj", "k_proj", "v_proj"], "part_sizes": [N_q, N_k, N_v]}`` (the parts are
  children of the same parent and have no entries of their own); its tensors are the parts'
  concatenated along N. Format-1/2 files load unchanged.

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
from typing import Callable, Dict, Iterable, List, Optional, Union

import torch
from torch import nn

from ..nn import SIDE_DTYPES, QuantLinear
from ..nn.fused import FusedQuantLinear, FusedSlice, install_fused
from ..spec import QuantSpec
from .integrity import (DIGEST_ALGORITHM, check_digests, digest_tensors, digests_entry, recorded_digests,
                        tensor_digest)
from .models import get_submodule, is_conv1d

__all__ = ["save_quantized", "load_quantized", "quantization_config", "layer_entry",
           "swap_in_quantlinears", "FORMAT_VERSION", "READ_FORMAT_VERSIONS", "verify_directory",
           "ShardedWriter"]

FORMAT_VERSION = 2  # 2: rotated layers (QuantSpec.rotation, <layer>.rot_signs)
FUSED_FORMAT_VERSION = 3  # 3: fused projections (a layer entry's "fused"); written only when used
READ_FORMAT_VERSIONS = (1, 2, 3)  # what load_quantized reads
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"  # sharded save_pretrained output
CONFIG = "config.json"


def layer_entry(m: QuantLinear) -> dict:
    """The config entry of one ``QuantLinear`` (what :func:`swap_in_quantlinears` rebuilds)."""
    entry = {"in_features": m.in_features, "out_features": m.out_features,
             "bias": m.bias is not None, "conv1d": bool(getattr(m, "_lp_conv1d", False)),
             "spec": m.spec.to_dict()}
    entry.update(m.side_config())
    if isinstance(m, FusedQuantLinear):
        entry["fused"] = {"parts": list(m.parts), "part_sizes": list(m.part_sizes)}
    return entry


def quantization_config(model: nn.Module) -> dict:
    """The ``quantization_config`` entry describing every ``QuantLinear`` of ``model``."""
    layers = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            layers[name] = layer_entry(m)
    return quantization_config_of(layers, type(model).__name__)


def quantization_config_of(layers: dict, model_class: str) -> dict:
    """The ``quantization_config`` entry for the layer entries ``layers`` of a ``model_class``."""
    if not layers:
        raise ValueError("the model has no QuantLinear layers: quantise it first")
    fused = any("fused" in e for e in layers.values())
    return {"quant_method": "layerpress", "format_version": FUSED_FORMAT_VERSION if fused else FORMAT_VERSION,
            "model_class": model_class, "layers": layers}


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
    cfg = saved_config(model, qcfg)
    return write_checkpoint(path, tensors, cfg, overwrite=overwrite,
                            metadata={"format": "pt", "layerpress": str(qcfg["format_version"])})


def saved_config(model: nn.Module, qcfg: dict) -> dict:
    """``config.json`` of a saved quantised model: its Hugging Face config with ``qcfg`` as
    ``quantization_config``."""
    cfg = model.config.to_dict() if hasattr(model, "config") else {}
    if cfg.get("dtype") is None and cfg.get("torch_dtype") is None:
        # config-built models carry no dtype; without one, transformers' dtype="auto" would take
        # the first float tensor it meets (a layer's fp16 scales) as the model's dtype
        floats = [p.dtype for p in model.parameters() if p.is_floating_point()]
        if floats:
            cfg["dtype"] = str(floats[0]).replace("torch.", "")
    cfg["quantization_config"] = qcfg
    return cfg


def write_checkpoint(path: Union[str, Path], tensors: Dict[str, torch.Tensor], config: dict,
                     extra_json: Optional[Dict[str, dict]] = None, overwrite: bool = False,
                     metadata: Optional[Dict[str, str]] = None) -> Path:
    """Writes ``model.safetensors`` + ``config.json`` (+ extra JSON files) to the directory
    ``path`` atomically: everything goes to a temporary directory beside it, which is then
    renamed into place, so an interrupted write never leaves a complete-looking checkpoint.
    A layerpress ``quantization_config`` in ``config`` gets the tensors' digests."""
    from safetensors.torch import save_file

    path = Path(path)
    qcfg = config.get("quantization_config")
    if isinstance(qcfg, dict) and qcfg.get("quant_method") == "layerpress":
        config = {**config, "quantization_config": {**qcfg, "digests": digests_entry(tensors)}}
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists (pass overwrite=True to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS),
                  metadata=metadata or {"format": "pt"})
        for name, obj in {CONFIG: config, **(extra_json or {})}.items():
            _write_json(tmp / name, obj)
        _move_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """``write(tmp_path)`` then fsync and rename onto ``path``; the temp file never survives."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _move_into_place(tmp: Path, path: Path) -> None:
    """Renames the finished directory ``tmp`` onto ``path`` (replacing what is there)."""
    if path.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
        os.replace(path, old / "x")
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


def _write_json(file: Path, obj) -> None:
    with open(file, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())


class ShardedWriter:
    """Writes a sharded checkpoint directory (``model-0000i-of-0000n.safetensors``,
    ``model.safetensors.index.json``, ``config.json``: what :func:`load_quantized` and
    ``from_pretrained`` read) one shard at a time, for a model that is never whole in memory.

    Shards go into a staging directory: a fresh hidden one beside ``path`` (removed by
    :meth:`abort`), or ``staging`` (kept across an interrupted run so that a resumed run reuses
    the shards already written). Each shard is written under a temporary name, flushed and
    renamed; :meth:`commit` writes the index and the config and only then renames the staging
    directory onto ``path``, so ``path`` never holds a partial checkpoint."""

    def __init__(self, path: Union[str, Path], overwrite: bool = False, staging=None):
        self.path = Path(path)
        if self.path.exists() and not overwrite:
            raise FileExistsError(f"{self.path} exists (pass overwrite=True to replace it)")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.keep_staging = staging is not None
        if staging is None:
            self.staging = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.tmp-", dir=self.path.parent))
        else:
            self.staging = Path(staging)
            self.staging.mkdir(parents=True, exist_ok=True)
            for stale in self.staging.glob(".*.tmp-*"):  # a shard write that was interrupted
                stale.unlink(missing_ok=True)

    def write_shard(self, name: str, tensors: Dict[str, torch.Tensor]) -> Path:
        """Writes the shard file ``name`` (in the staging directory) atomically."""
        from safetensors.torch import save_file

        if Path(name).name != name or not name.endswith(".safetensors"):
            raise ValueError(f"shard name must be a plain *.safetensors file name, got {name!r}")
        flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        file = self.staging / name
        atomic_write(file, lambda tmp: save_file(
            flat, tmp, metadata={"format": "pt", "layerpress": str(FORMAT_VERSION)}))
        return file

    def commit(self, shards, config: dict) -> Path:
        """Writes the index of the shard files ``shards`` (names, all written) and
        ``config.json``, then moves the directory into place. Returns ``path``. A layerpress
        ``quantization_config`` gets the digests of the tensors as the shards hold them (read
        back one shard at a time, so shards of an interrupted run are covered too)."""
        from safetensors import safe_open

        weight_map, total, digests = {}, 0, {}
        for name in shards:
            file = self.staging / name
            if not file.is_file():
                raise FileNotFoundError(f"{file}: shard missing at commit")
            with safe_open(str(file), framework="pt") as h:
                for key in h.keys():
                    if key in weight_map:
                        raise ValueError(f"{key!r} is in two shards ({weight_map[key]}, {name})")
                    weight_map[key] = name
                    digests[key] = tensor_digest(h.get_tensor(key))
            total += file.stat().st_size
        qcfg = config.get("quantization_config")
        if isinstance(qcfg, dict) and qcfg.get("quant_method") == "layerpress":
            config = {**config, "quantization_config": {
                **qcfg, "digests": {"algorithm": DIGEST_ALGORITHM, "tensors": digests}}}
        unlisted = sorted(f.name for f in self.staging.glob("*.safetensors") if f.name not in set(shards))
        for name in unlisted:  # e.g. shards of an earlier layout of an interrupted run
            (self.staging / name).unlink()
        _write_json(self.staging / WEIGHTS_INDEX, {"metadata": {"total_size": total},
                                                   "weight_map": dict(sorted(weight_map.items()))})
        _write_json(self.staging / CONFIG, config)
        try:
            _move_into_place(self.staging, self.path)
        except OSError:  # the staging directory is on another file system
            tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.tmp-", dir=self.path.parent))
            try:
                shutil.copytree(self.staging, tmp, dirs_exist_ok=True)
                _move_into_place(tmp, self.path)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            shutil.rmtree(self.staging, ignore_errors=True)
        return self.path

    def abort(self) -> None:
        """Removes a fresh staging directory (a kept one stays for the resume)."""
        if not self.keep_staging:
            shutil.rmtree(self.staging, ignore_errors=True)


def read_json(path: Path) -> dict:
    """A JSON object from ``path``; ValueError naming the file if it is not one."""
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:  # found by the fuzz suite: bad UTF-8
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


def _fused_parts(name: str, info: dict, n: int):
    """(parts, part_sizes) of a fused layer entry, checked."""
    f = info["fused"]
    try:
        parts, sizes = [str(p) for p in f["parts"]], [int(x) for x in f["part_sizes"]]
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"quantization_config.layers[{name!r}].fused is invalid: {e}") from None
    if (len(parts) < 2 or len(parts) != len(sizes) or sum(sizes) != n
            or any("." in p or not p for p in parts) or len(set(parts)) != len(parts)):
        raise ValueError(f"quantization_config.layers[{name!r}].fused: expected >= 2 distinct "
                         f"child names with sizes summing to out_features={n}, got parts {parts}, "
                         f"part_sizes {sizes}")
    if info.get("outliers") or info.get("lorc_rank"):
        raise ValueError(f"quantization_config.layers[{name!r}]: a fused layer has no side paths")
    return parts, sizes


def _swap_in_fused(model: nn.Module, name: str, info: dict, spec, k: int, n: int, bias: bool) -> None:
    """Builds the fused layer ``name`` (an empty FusedQuantLinear at ``<parent>.<attr>``) and a
    slice for each of its parts, which must be linears of the model of the recorded shapes."""
    parts, sizes = _fused_parts(name, info, n)
    pname, _, attr = name.rpartition(".")
    try:
        parent = get_submodule(model, pname)
    except AttributeError:
        raise ValueError(f"quantization_config names fused layer {name!r}, whose parent the model "
                         "does not have") from None
    current = getattr(parent, attr, None)
    if isinstance(current, FusedQuantLinear):
        if (current.spec != spec or current.in_features != k or list(current.part_sizes) != sizes
                or list(current.parts) != parts):
            raise ValueError(f"{name}: already a fused layer with a different spec/shape/parts")
        return
    if current is not None:
        raise ValueError(f"{name}: the model already has a {type(current).__name__} there")
    device = dtype = None
    conv1d = False
    for p, np_ in zip(parts, sizes):
        old = getattr(parent, p, None)
        if old is None:
            raise ValueError(f"quantization_config: fused layer {name!r} has part {p!r}, which "
                             f"{pname or 'the model'} does not have")
        if isinstance(old, FusedSlice):
            raise ValueError(f"{pname}.{p}: already part of another fused layer")
        if not (isinstance(old, nn.Linear) or is_conv1d(old)):
            raise ValueError(f"{pname}.{p}: expected a linear, found {type(old).__name__}")
        w = old.weight
        ok_, on_ = (w.shape[1], w.shape[0]) if isinstance(old, nn.Linear) else (w.shape[0], w.shape[1])
        if (ok_, on_) != (k, np_):
            raise ValueError(f"{pname}.{p}: config says [{np_}, {k}] (part of {name}) but the "
                             f"model's layer is [{on_}, {ok_}]")
        device, dtype, conv1d = w.device, w.dtype, is_conv1d(old)
    try:
        new = FusedQuantLinear(k, sizes, parts, spec, bias=bias, device=device, dtype=dtype)
    except ValueError as e:
        raise ValueError(f"quantization_config.layers[{name!r}]: {e}") from None
    new._lp_conv1d = conv1d
    install_fused(parent, attr, new)


def _swap_in(model: nn.Module, layers: dict) -> None:
    for name, info in layers.items():
        try:
            spec = QuantSpec.from_dict(info["spec"])
            k, n, bias = int(info["in_features"]), int(info["out_features"]), bool(info["bias"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"quantization_config.layers[{name!r}] is invalid: {e}") from None
        if "fused" in info:
            _swap_in_fused(model, name, info, spec, k, n, bias)
            continue
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


def load_quantized(path: Union[str, Path], model: Optional[nn.Module] = None,
                   verify: bool = True) -> nn.Module:
    """Loads a directory written by :func:`save_quantized`. Without ``model``, rebuilds the
    original model class from the saved config; with ``model`` (the original architecture,
    e.g. ``AutoModel.from_pretrained(original_dir)``), fills that one in place. Reads
    ``model.safetensors`` or, as ``save_pretrained`` writes for large models, the shards listed in
    ``model.safetensors.index.json``. Returns the model in eval mode. Raises FileNotFoundError /
    ValueError with the reason on bad input. ``verify`` (default): every stored tensor must match
    the digest recorded at save time (flows/integrity.py; an IntegrityError names the tensor and
    file); a directory saved without digests loads with a notice."""
    path = Path(path)
    cfg = _read_config(path)
    q = cfg["quantization_config"]
    sd, wpath = _read_tensors(path)
    if verify:
        check_digests(q, digest_tensors(sd), _tensor_files(path, sd), path)
    if model is None:
        try:
            model = _build_model(cfg)
        except Exception as e:  # noqa: BLE001  (transformers' config validation has its own error types)
            if isinstance(e, ValueError) and str(e).startswith("unknown model class"):
                raise
            raise ValueError(f"{path / CONFIG}: not a usable transformers config: "
                             f"{type(e).__name__}: {e}") from None
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


# ---- integrity: which file holds which tensor, and the check of a whole directory -------------

def _tensor_files(path: Path, keys: Iterable[str]) -> Dict[str, str]:
    """``{key: file name}`` for the loaded ``keys``: ``model.safetensors``, or the shard the
    index names (the loader has already checked the index)."""
    path = Path(path)
    if (path / WEIGHTS).is_file() or not (path / WEIGHTS_INDEX).is_file():
        return {k: WEIGHTS for k in keys}
    try:
        weight_map = json.loads((path / WEIGHTS_INDEX).read_text(encoding="utf-8"))["weight_map"]
        return {str(k): str(v) for k, v in weight_map.items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        return {}


def _stored_files(path: Path) -> List[str]:
    if (path / WEIGHTS).is_file():
        return [WEIGHTS]
    files = sorted(set(_tensor_files(path, ()).values())) if (path / WEIGHTS_INDEX).is_file() else []
    return files or sorted(p.name for p in path.glob("*.safetensors"))


def verify_directory(path) -> List[dict]:
    """Checks every safetensors file of a saved model against its recorded digests. Returns one
    result per file, ``{"file", "ok", "tensors" (checked), "error" (the first, or None)}``, plus a final
    ``{"file": "config.json", ...}`` entry for recorded tensors no file holds. Raises
    FileNotFoundError / ValueError when ``path`` is not a saved model with digests."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not (path / CONFIG).is_file():
        raise FileNotFoundError(f"{path / CONFIG} is missing: not a saved layerpress model")
    qcfg = read_json(path / CONFIG).get("quantization_config")
    if not isinstance(qcfg, dict) or qcfg.get("quant_method") != "layerpress":
        raise ValueError(f"{path / CONFIG}: no layerpress quantization_config")
    recorded = recorded_digests(qcfg, str(path / CONFIG))
    if recorded is None:
        raise ValueError(f"{path}: saved without tensor digests (an older layerpress): nothing to verify")
    results, seen = [], set()
    for name in _stored_files(path):
        file = path / name
        bad = []
        res = {"file": name, "ok": True, "tensors": 0, "error": None}
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    seen.add(key)
                    res["tensors"] += 1
                    if key not in recorded:
                        bad.append(f"tensor {key!r} has no recorded digest")
                    elif tensor_digest(f.get_tensor(key)) != recorded[key]:
                        bad.append(f"tensor {key!r} does not match its recorded digest")
        except (SafetensorError, OSError, ValueError) as e:
            bad.insert(0, f"unreadable safetensors file: {e}")
        if bad:
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            res.update(ok=False, error=bad[0] + more)
        results.append(res)
    missing = sorted(set(recorded) - seen)
    if missing:
        results.append({"file": CONFIG, "ok": False, "tensors": 0,
                        "error": f"{len(missing)} recorded tensor(s) in no file, e.g. {missing[0]!r}"})
    return results

