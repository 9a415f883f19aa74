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
file (:func:`layerpress.flows.io.verify_directory`).
"""
from __future__ import annotations

import hashlib
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, Mapping, Optional

import torch

__all__ = ["DIGEST_ALGORITHM", "IntegrityError", "tensor_digest", "digest_tensors", "digests_entry",
           "recorded_digests", "check_digests"]

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


def recorded_digests(qcfg: dict, where: str) -> Optional[Dict[str, str]]:
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
    recorded = recorded_digests(qcfg, str(where))
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
