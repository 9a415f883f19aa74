"""Per-block checkpoints of a long quantisation run, and resuming an interrupted one.

``quantize_model(..., checkpoint_dir=DIR)`` writes, after each block ``i``:

* ``block_{i:05d}.safetensors`` -- the quantised block's whole ``state_dict`` (``QuantLinear``
  tensors in the canonical layout, side paths, and whatever else the flow changed in the block,
  e.g. folded norm weights);
* ``inputs_{i+1:05d}.safetensors`` -- the hidden states the next block receives (one tensor per
  calibration batch; the other block arguments, masks and rotary embeddings, are recomputed from
  the model, which is cheap and deterministic). Only the two newest inputs files are kept;
* ``manifest.json`` -- the commit point: the run's arguments, fingerprints of the model and of
  the calibration data, the bit allocation, and per completed block its file's size and SHA-256,
  its ``QuantLinear`` config entries and its report rows.

Every file is written under a temporary name, flushed to disk and renamed, and the manifest is
rewritten (the same way) only after the block's files are in place, so a crash at any moment
leaves a consistent checkpoint. ``resume=True`` re-checks every listed file (size, hash,
readable), restores the blocks up to the last intact one into the fresh model and continues from
there with the saved inputs; a run with different arguments, another model or other calibration
data is refused with the differences named.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from ..nn import QuantLinear
from .io import atomic_write as _atomic_write

__all__ = ["BlockCheckpoints", "CheckpointError", "MANIFEST", "model_fingerprint", "run_arguments"]

MANIFEST = "manifest.json"
FORMAT = "layerpress-block-checkpoints"
VERSION = 1
KEEP_INPUTS = 2

# quantize_model arguments that do not change the result (or are checked otherwise)
_NOT_RECORDED = ("model", "calib", "tokenizer", "adapter", "device", "verbose", "threads",
                 "checkpoint_dir", "resume", "on_block_done", "progress",
                 "fuse_projections")  # fusion runs after the last block: checkpoints hold the parts


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be used (other run, corrupt manifest, ...)."""


def _jsonable(v):
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, torch.dtype):
        return str(v).replace("torch.", "")
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in sorted(v.items())}
    if isinstance(v, Path):
        return str(v)
    return f"<{type(v).__name__}>"


def run_arguments(args: dict) -> dict:
    """The result-relevant arguments of a ``quantize_model`` call, JSON-normalised."""
    return {k: _jsonable(v) for k, v in sorted(args.items()) if k not in _NOT_RECORDED}


def _hash_tensor(h, name: str, t: torch.Tensor) -> None:
    t = t.detach().to("cpu").contiguous()
    h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 over the class, the config and every tensor of the state dict (names, dtypes,
    shapes, bytes): a resume must start from the very same full-precision model."""
    h = hashlib.sha256(type(model).__name__.encode())
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "to_dict"):
        h.update(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode())
    for name, t in model.state_dict().items():
        _hash_tensor(h, name, t)
    return h.hexdigest()


def _tensor_fingerprint(t: torch.Tensor) -> str:
    h = hashlib.sha256()
    _hash_tensor(h, "ids", t)
    return h.hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _save_tensors(path: Path, tensors: Dict[str, torch.Tensor]) -> dict:
    from safetensors.torch import save_file

    flat = {k: t.detach().to("cpu").contiguous() for k, t in tensors.items()}
    _atomic_write(path, lambda tmp: save_file(flat, tmp, metadata={"format": "pt"}))
    return {"file": path.name, "size": path.stat().st_size, "sha256": _file_sha256(path)}


class BlockCheckpoints:
    """The checkpoint directory of one run (see the module doc)."""

    def __init__(self, directory, run: dict, model_fp: str, ids_fp: str, n_blocks: int,
                 block_bits: List[int]):
        self.dir = Path(directory)
        self.run = run
        self.header = {"format": FORMAT, "version": VERSION, "run": run, "model": model_fp,
                       "calibration": ids_fp, "n_blocks": n_blocks, "block_bits": list(block_bits)}
        self.blocks: List[dict] = []
        self.inputs: List[dict] = []
        self.complete = False

    # ---- manifest ----------------------------------------------------------------------------------
    def _write_manifest(self) -> None:
        doc = dict(self.header, blocks=self.blocks, inputs=self.inputs, complete=self.complete)
        text = json.dumps(doc, indent=1, sort_keys=True)

        def write(tmp):
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
        _atomic_write(self.dir / MANIFEST, write)

    def _read_manifest(self) -> Optional[dict]:
        path = self.dir / MANIFEST
        if not path.is_file():
            return None
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: unreadable checkpoint manifest ({e}); delete the "
                                  "directory to start over") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise CheckpointError(f"{path}: not a layerpress block-checkpoint manifest")
        if doc.get("version") != VERSION:
            raise CheckpointError(f"{path}: checkpoint version {doc.get('version')!r} is not "
                                  f"supported (this layerpress writes {VERSION})")
        return doc

    def _check_same_run(self, doc: dict) -> None:
        diffs = []
        old_run, new_run = doc.get("run", {}), self.run
        for k in sorted(set(old_run) | set(new_run)):
            if old_run.get(k, "<absent>") != new_run.get(k, "<absent>"):
                diffs.append(f"{k}: checkpoint {old_run.get(k, '<absent>')!r}, now {new_run.get(k, '<absent>')!r}")
        for key, what in (("model", "the model's weights/config"), ("calibration", "the calibration data"),
                          ("n_blocks", "the number of blocks"), ("block_bits", "the bit allocation")):
            if doc.get(key) != self.header[key]:
                diffs.append(f"{what} differ")
        if diffs:
            raise CheckpointError(f"{self.dir}: the checkpoint belongs to a different run, refusing to "
                                  f"resume ({'; '.join(diffs)}); use another --checkpoint-dir or "
                                  "delete this one")

    def _verify(self, entry: dict) -> bool:
        path = self.dir / str(entry.get("file", ""))
        try:
            return (path.is_file() and path.stat().st_size == entry.get("size")
                    and _file_sha256(path) == entry.get("sha256"))
        except OSError:
            return False

    # ---- run ---------------------------------------------------------------------------------------
    def begin(self, resume: bool) -> Tuple[int, Optional[List[torch.Tensor]], List[dict]]:
        """Opens the directory. Returns ``(start, hidden, blocks)``: the first block to
        quantise, the saved inputs of that block (None when starting at 0) and the manifest
        entries of the blocks to restore (:meth:`restore_block`)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for stale in self.dir.glob(".*.tmp-*"):  # leftovers of a write that was interrupted
            stale.unlink(missing_ok=True)
        doc = self._read_manifest()
        if doc is None:
            if any(self.dir.iterdir()):
                raise CheckpointError(f"{self.dir} is not empty and holds no checkpoint manifest: "
                                      "choose an empty or new --checkpoint-dir")
            self._write_manifest()
            return 0, None, []
        if not resume:
            raise CheckpointError(f"{self.dir} already holds the checkpoints of a run: pass "
                                  "resume=True (--resume) to continue it, or use another directory")
        self._check_same_run(doc)
        blocks = list(doc.get("blocks", []))
        inputs = {int(e["block"]): e for e in doc.get("inputs", [])}
        good = 0  # blocks 0..good-1 intact
        while good < len(blocks) and blocks[good].get("block") == good and self._verify(blocks[good]):
            good += 1
        start = good
        n_blocks = self.header["n_blocks"]
        while 0 < start < n_blocks and not (start in inputs and self._verify(inputs[start])):
            start -= 1  # no intact inputs for that block: go back to one that has them
        hidden = None
        if 0 < start < n_blocks:
            hidden = self._load_inputs(inputs[start])
        self.blocks = blocks[:start]
        self.inputs = [inputs[start]] if 0 < start < n_blocks else []
        self._write_manifest()
        return start, hidden, self.blocks

    def _load_inputs(self, entry: dict) -> List[torch.Tensor]:
        sd = self._load_file(entry)
        n = len(sd)
        try:
            return [sd[f"hidden.{j}"] for j in range(n)]
        except KeyError:
            raise CheckpointError(f"{self.dir / entry['file']}: not an inputs checkpoint") from None

    def _load_file(self, entry: dict) -> Dict[str, torch.Tensor]:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = self.dir / entry["file"]
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: unreadable checkpoint file (truncated or corrupt?): {e}") from None

    def restore_block(self, block: nn.Module, entry: dict) -> None:
        """Puts a saved quantised block back into ``block`` (the fresh full-precision one)."""
        from .io import swap_in_quantlinears

        try:
            swap_in_quantlinears(block, entry["layers"])
        except ValueError as e:
            raise CheckpointError(f"{self.dir / entry['file']}: cannot rebuild block {entry['block']}: {e}") from None
        sd = self._load_file(entry)
        try:
            block.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"{self.dir / entry['file']}: the saved block {entry['block']} does "
                                  f"not fit the model's block (was it changed by a step the resume "
                                  f"cannot replay?): {e}") from None

    def save_block(self, index: int, block: nn.Module, reports: List[dict], extra: dict,
                   next_hidden: Optional[List[torch.Tensor]], stored: Optional[dict] = None) -> None:
        """Commits block ``index`` (quantised, in ``block``) and the inputs of the next block.
        ``stored``: ``{"file": path relative to the checkpoint directory}`` of a file already
        holding the block (the out-of-core flow's output shard), recorded (size, SHA-256)
        instead of writing a second copy."""
        from .io import layer_entry

        layers = {name: layer_entry(m) for name, m in block.named_modules() if isinstance(m, QuantLinear)}
        if stored is None:
            entry = _save_tensors(self.dir / f"block_{index:05d}.safetensors", block.state_dict())
        else:
            path = self.dir / stored["file"]
            entry = {"file": stored["file"], "size": path.stat().st_size, "sha256": _file_sha256(path)}
        entry.update(block=index, layers=layers, reports=reports, extra=extra)
        new_inputs = list(self.inputs)
        if next_hidden is not None:
            ie = _save_tensors(self.dir / f"inputs_{index + 1:05d}.safetensors",
                               {f"hidden.{j}": h for j, h in enumerate(next_hidden)})
            ie["block"] = index + 1
            new_inputs = (new_inputs + [ie])[-KEEP_INPUTS:]
        self.blocks = self.blocks[:index] + [entry]
        dropped = [e for e in self.inputs if e not in new_inputs]
        self.inputs = new_inputs
        self._write_manifest()  # the commit point
        for e in dropped:
            (self.dir / e["file"]).unlink(missing_ok=True)

    def finish(self) -> None:
        self.complete = True
        self._write_manifest()
