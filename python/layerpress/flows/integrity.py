"""Per-tensor digests of a saved model: recorded at save time, checked at load time.

safetensors checks that a file's header is consistent (offsets, sizes) but not what the payload
holds: one flipped bit in a tensor loads silently as a different model. Every layerpress
checkpoint (``save_quantized``, the interop converters, ``save_pretrained`` through the
quantisation method) therefore records in ``quantization_config.digests``

    {"algorithm": "blake2b-128", "tensors": {key: hex digest}}

where a tensor's digest covers its dtype, its shape and its bytes as stored (so a header edit
that re-types or re-shapes a tensor of the same byte size is caught too). Loading checks every
stored tensor against it by default (``verify=False`` skips that); directories saved before
digests existed load with a one-line notice. ``layerpress verify DIR`` checks a directory file by
file (:func:`verify_directory`).
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional

import torch

__all__ = ["DIGEST_ALGORITHM", "IntegrityError", "tensor_digest", "digest_tensors", "digests_entry",
           "check_digests", "tensor_files", "verify_directory"]

DIGEST_ALGORITHM = "blake2b-128"
_DIGEST_BYTES = 16


class IntegrityError(ValueError):
    """A stored tensor does not match the digest its checkpoint recorded."""


def tensor_digest(t: torch.Tensor) -> str:
    """blake2b-128 of ``t``'s dtype, shape and bytes (contiguous, as safetensors stores them)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    t = t.contiguous()
    h = hashlib.blake2b(digest_size=_DIGEST_BYTES)
    h.update(f"{str(t.dtype).replace('torch.', '')}{list(t.shape)}".encode())
    if t.numel():
        # hashlib releases the GIL on large buffers: digest_tensors hashes in threads
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def digest_tensors(tensors: Mapping[str, torch.Tensor]) -> Dict[str, str]:
    """``{key: tensor_digest}``, hashed on up to 4 threads."""
    keys = list(tensors)
    workers = max(1, min(4, os.cpu_count() or 1, len(keys)))
    if workers == 1:
        return {k: tensor_digest(tensors[k]) for k in keys}
    with ThreadPoolExecutor(workers) as pool:
        return dict(zip(keys, pool.map(lambda k: tensor_digest(tensors[k]), keys)))


def digests_entry(tensors: Mapping[str, torch.Tensor]) -> dict:
    """The ``quantization_config.digests`` entry for the tensors about to be written."""
    return {"algorithm": DIGEST_ALGORITHM, "tensors": digest_tensors(tensors)}


def _recorded(qcfg: dict, where: str) -> Optional[Dict[str, str]]:
    """The recorded ``{key: digest}``, None if the checkpoint has none; ValueError if malformed."""
    entry = qcfg.get("digests")
    if entry is None:
        return None
    if (not isinstance(entry, dict) or entry.get("algorithm") != DIGEST_ALGORITHM
            or not isinstance(entry.get("tensors"), dict)
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in entry["tensors"].items())):
        algo = entry.get("algorithm") if isinstance(entry, dict) else None
        raise ValueError(f"{where}: quantization_config.digests is malformed (expected "
                         f"{{'algorithm': {DIGEST_ALGORITHM!r}, 'tensors': {{name: hex}}}}, "
                         f"algorithm {algo!r})")
    return entry["tensors"]


def _notice_no_digests(where) -> None:
    warnings.warn(f"{where}: saved without tensor digests (an older layerpress); loaded unverified",
                  UserWarning, stacklevel=3)


def check_digests(qcfg: dict, digests: Mapping[str, str], file_of: Mapping[str, str],
                  where) -> bool:
    """Checks the ``digests`` of the tensors read from the files (:func:`digest_tensors`)
    against those ``qcfg`` records. Raises :class:`IntegrityError` naming the first tensor that
    differs and its file. Returns False (after a one-line notice) when the checkpoint records
    none."""
    recorded = _recorded(qcfg, str(where))
    if recorded is None:
        _notice_no_digests(where)
        return False
    for key, want in recorded.items():
        # a missing tensor is the loader's to report (it knows what the model needs)
        if key in digests and digests[key] != want:
            raise IntegrityError(f"{Path(where) / file_of.get(key, '?')}: tensor {key!r} does not "
                                 f"match its recorded digest (the file is corrupt or was modified); "
                                 f"pass verify=False (--no-verify) to load it anyway")
    return True


def tensor_files(path: Path, keys: Iterable[str]) -> Dict[str, str]:
    """``{key: file name}`` for the loaded ``keys``: ``model.safetensors``, or the shard the
    index names (the loader has already checked the index)."""
    from .io import WEIGHTS, WEIGHTS_INDEX
    path = Path(path)
    if (path / WEIGHTS).is_file() or not (path / WEIGHTS_INDEX).is_file():
        return {k: WEIGHTS for k in keys}
    try:
        weight_map = json.loads((path / WEIGHTS_INDEX).read_text(encoding="utf-8"))["weight_map"]
        return {str(k): str(v) for k, v in weight_map.items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        return {}


def _stored_files(path: Path) -> List[str]:
    from .io import WEIGHTS, WEIGHTS_INDEX
    if (path / WEIGHTS).is_file():
        return [WEIGHTS]
    files = sorted(set(tensor_files(path, ()).values())) if (path / WEIGHTS_INDEX).is_file() else []
    return files or sorted(p.name for p in path.glob("*.safetensors"))


def verify_directory(path) -> List[dict]:
    """Checks every safetensors file of a saved model against its recorded digests. Returns one
    result per file, ``{"file", "ok", "tensors" (checked), "error" (the first, or None)}``, plus a final
    ``{"file": "config.json", ...}`` entry for recorded tensors no file holds. Raises
    FileNotFoundError / ValueError when ``path`` is not a saved model with digests."""
    from safetensors import SafetensorError, safe_open

    from .io import CONFIG, read_json
    path = Path(path)
    if not (path / CONFIG).is_file():
        raise FileNotFoundError(f"{path / CONFIG} is missing: not a saved layerpress model")
    qcfg = read_json(path / CONFIG).get("quantization_config")
    if not isinstance(qcfg, dict) or qcfg.get("quant_method") != "layerpress":
        raise ValueError(f"{path / CONFIG}: no layerpress quantization_config")
    recorded = _recorded(qcfg, str(path / CONFIG))
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

