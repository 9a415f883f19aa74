"""Calibration data and block-by-block input capture for the compression flows.

Text comes from files (one passage per line, ``#`` comments skipped) or the built-in sets of
original English sentences shipped with the package (``calibration`` for calibration,
``heldout`` for evaluation, no sentence in both). It is tokenised into a fixed number of
sequences of a fixed length (windows of the concatenated token stream, wrapped in the
tokenizer's special tokens, e.g. ``[CLS] … [SEP]`` for BERT).

:func:`capture_block_inputs` runs the model up to its first block once per batch and keeps what
the first block receives (hidden states and keyword arguments such as the attention mask or
the rotary embeddings); :func:`run_block` then runs one block on those inputs, so a flow keeps
only the current block on the compute device and feeds each block's outputs to the next.
"""
from __future__ import annotations

import importlib.resources
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, List, Optional, Sequence, Union

import torch
from torch import nn

from .models import ModelAdapter, adapter_for

__all__ = ["load_texts", "default_texts", "tokenize_texts", "default_calibration_shape",
           "BlockInputs", "capture_block_inputs",
           "run_block", "to_device"]


def _read_lines(text: str) -> List[str]:
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def default_texts(which: str = "calibration") -> List[str]:
    """The built-in English sentences: ``"calibration"`` or ``"heldout"`` (evaluation)."""
    files = {"calibration": "calibration_en.txt", "heldout": "heldout_en.txt"}
    if which not in files:
        raise ValueError(f"default_texts: which must be 'calibration' or 'heldout', got {which!r}")
    res = importlib.resources.files("layerpress.flows").joinpath("data", files[which])
    return _read_lines(res.read_text(encoding="utf-8"))


def load_texts(paths: Union[str, Path, Sequence[Union[str, Path]]]) -> List[str]:
    """Lines of UTF-8 text files (blank lines and ``#`` comments skipped)."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    out = []
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise FileNotFoundError(f"calibration text file not found: {p}")
        out += _read_lines(p.read_text(encoding="utf-8"))
    if not out:
        raise ValueError(f"no text in {[str(p) for p in paths]}")
    return out


def _special_tokens(tokenizer):
    """(prefix, suffix) ids the tokenizer wraps a single sequence in (e.g. [CLS] / [SEP])."""
    bare = tokenizer("hello", add_special_tokens=False)["input_ids"]
    full = tokenizer("hello", add_special_tokens=True)["input_ids"]
    for i in range(len(full) - len(bare) + 1):
        if full[i:i + len(bare)] == bare:
            return list(full[:i]), list(full[i + len(bare):])
    return [], []


def tokenize_texts(tokenizer, texts: Optional[Iterable[str]] = None, n_samples: int = 32,
                   seq_len: int = 64, seed: int = 0, align: bool = False) -> torch.Tensor:
    """``n_samples`` sequences of exactly ``seq_len`` token ids (``LongTensor [n, seq_len]``):
    windows of the concatenated token stream of ``texts`` (default: the built-in calibration
    set), each wrapped in the tokenizer's special tokens. The windows start at seeded random
    offsets, or with ``align`` at the starts of texts (lines), in a seeded random order that
    visits every text once before any repeats -- so short sequences look like the sentences an
    encoder is used on."""
    texts = list(default_texts("calibration") if texts is None else texts)
    if n_samples < 1 or seq_len < 4:
        raise ValueError(f"need n_samples >= 1 and seq_len >= 4, got {n_samples}, {seq_len}")
    stream: List[int] = []
    text_starts: List[int] = []
    for t in texts:
        text_starts.append(len(stream))
        stream += tokenizer(t, add_special_tokens=False)["input_ids"]
    prefix, suffix = _special_tokens(tokenizer)
    body = seq_len - len(prefix) - len(suffix)
    if len(stream) < body:
        raise ValueError(f"calibration text too short: {len(stream)} tokens, need at least {body} "
                         f"for one sequence of {seq_len}")
    gen = torch.Generator().manual_seed(seed)
    if align:
        usable = [s for s in text_starts if s + body <= len(stream)] or [len(stream) - body]
        starts = []
        while len(starts) < n_samples:
            order = torch.randperm(len(usable), generator=gen).tolist()
            starts += [usable[i] for i in order[:n_samples - len(starts)]]
    else:
        starts = torch.randint(0, len(stream) - body + 1, (n_samples,), generator=gen).tolist()
    seqs = [prefix + stream[s:s + body] + suffix for s in starts]
    ids = torch.tensor(seqs, dtype=torch.long)
    assert ids.shape == (n_samples, seq_len), ids.shape
    return ids


#: calibration defaults per model kind: (n_samples, seq_len, align). Encoders embed sentences, so
#: they are calibrated on sentence-shaped sequences (one sentence each, from its start, with the
#: special tokens an encoder sees around it): on all-MiniLM-L6-v2 this matters more than any
#: quantiser detail (W4 GPTQ mean cosine 0.983 with 32 random 64-token windows, 0.991 with 256
#: sentence-aligned 16-token ones). Causal LMs see long running text.
CALIBRATION_DEFAULTS = {"encoder": (256, 16, True), "causal": (32, 64, False)}


def default_calibration_shape(kind: str, n_samples: Optional[int] = None,
                              seq_len: Optional[int] = None, align: Optional[bool] = None):
    """``(n_samples, seq_len, align)`` with the unset ones (None) taken from
    :data:`CALIBRATION_DEFAULTS` for the model ``kind`` (``"encoder"`` or ``"causal"``)."""
    if kind not in CALIBRATION_DEFAULTS:
        raise ValueError(f"kind must be one of {tuple(CALIBRATION_DEFAULTS)}, got {kind!r}")
    n0, l0, a0 = CALIBRATION_DEFAULTS[kind]
    return (n0 if n_samples is None else n_samples, l0 if seq_len is None else seq_len,
            a0 if align is None else bool(align))


def to_device(obj: Any, device) -> Any:
    """Moves tensors inside nested tuples/lists/dicts to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


@dataclass
class BlockInputs:
    """What a block receives for each calibration batch: the hidden states (kept on the
    storage device, CPU by default) and the other positional/keyword arguments."""
    hidden: List[torch.Tensor]
    args: List[tuple]
    kwargs: List[dict]

    def __len__(self):
        return len(self.hidden)


class _Stop(Exception):
    pass


def _split_batches(input_ids: torch.Tensor, batch_size: int) -> List[torch.Tensor]:
    if input_ids.dim() != 2:
        raise ValueError(f"calibration input_ids must be [n, seq_len], got {list(input_ids.shape)}")
    return list(input_ids.split(batch_size))


def _move_outside(model: nn.Module, blocks: nn.Module, device) -> None:
    inside = {id(t) for t in list(blocks.parameters()) + list(blocks.buffers())}
    for p in model.parameters():
        if id(p) not in inside and not p.is_meta:  # meta: not loaded (out-of-core skeleton)
            p.data = p.data.to(device)
    for mod in model.modules():
        for k, b in list(mod._buffers.items()):
            if b is not None and id(b) not in inside and not b.is_meta:
                mod._buffers[k] = b.to(device)


@torch.no_grad()
def capture_block_inputs(model: nn.Module, input_ids: torch.Tensor, adapter: Optional[ModelAdapter] = None,
                         batch_size: int = 8, device=None, storage="cpu") -> BlockInputs:
    """Runs the model on each batch of ``input_ids`` until its first block and returns what the
    block receives. The modules before the first block (embeddings etc.) are moved to ``device``
    for this (and back); the blocks themselves stay where they are."""
    adapter = adapter or adapter_for(model)
    blocks = adapter.blocks()
    first = blocks[0]
    # where the model lives (parameters still on meta -- the out-of-core skeleton -- are not)
    home = next((p.device for p in model.parameters() if not p.is_meta), torch.device("cpu"))
    device = torch.device(device) if device is not None else home
    if device != home:  # only the non-block tensors: the blocks are not run here
        _move_outside(model, blocks, device)
    hidden, args, kwargs = [], [], []

    def pre_hook(mod, a, kw):
        a = list(a)
        if a:
            h = a.pop(0)
        else:
            h = kw.pop("hidden_states")
        hidden.append(h.detach().to(storage))
        args.append(to_device(tuple(a), storage))
        kw = {k: v for k, v in kw.items() if k not in ("past_key_values", "past_key_value", "use_cache")}
        kwargs.append(to_device(kw, storage))
        raise _Stop

    handle = first.register_forward_pre_hook(pre_hook, with_kwargs=True)
    was_training = model.training
    model.eval()
    try:
        for ids in _split_batches(input_ids, batch_size):
            try:
                model(input_ids=ids.to(device), use_cache=False) if adapter.kind == "causal" \
                    else model(input_ids=ids.to(device))
            except _Stop:
                pass
    finally:
        handle.remove()
        model.train(was_training)
        if device != home:
            _move_outside(model, blocks, home)
    if not hidden:
        raise RuntimeError("the first block was never called: no calibration inputs captured")
    return BlockInputs(hidden, args, kwargs)


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def run_block(block: nn.Module, inputs: BlockInputs, device=None, storage="cpu") -> List[torch.Tensor]:
    """The block's output hidden states for every captured batch (stored on ``storage``)."""
    device = device or next(block.parameters()).device
    outs = []
    for h, a, kw in zip(inputs.hidden, inputs.args, inputs.kwargs):
        y = _first(block(h.to(device), *to_device(a, device), **to_device(kw, device)))
        outs.append(y.detach().to(storage))
    return outs
