"""Quantise a Hugging Face checkpoint that does not fit in memory, one block at a time.

``quantize_checkpoint(model_dir, out, bits=4, ...)`` (``layerpress quantize --out-of-core``):

1. builds the model *skeleton* from ``config.json`` with every parameter on the ``meta`` device
   (buffers, e.g. the rotary frequencies, are small and built for real);
2. reads tensors from the checkpoint's safetensors files (``model.safetensors`` or the shards of
   ``model.safetensors.index.json``) only when needed, one module at a time, each file
   memory-mapped just for that read: the modules before the first block (embeddings) while the
   calibration inputs are captured, then each block;
3. per block: loads it, runs the very block routine of :func:`quantize_model`
   (flows/quantize_model.py ``_quantise_blocks``: AWQ, capture, AdaDim, RTN/GPTQ, side paths,
   pack and swap, the quantised block's outputs for the next block), writes its tensors as one
   output shard (flows/io.py :class:`ShardedWriter`) and drops it. The tensors outside the
   blocks (embeddings, final norm, head) are copied to their own shards at the end;
4. commits the output directory atomically: shards, ``model.safetensors.index.json`` and
   ``config.json`` (with the ``quantization_config``) appear under ``out`` together or not at
   all. ``load_quantized`` and ``from_pretrained`` read it.

Peak memory is about one block in fp32 (twice, while a linear's candidates are compared) plus
the calibration activations, whatever the number of blocks. ``device`` (e.g. ``"cuda"``) holds
only the block being processed (and the embeddings while capturing). ``checkpoint_dir`` makes the
run resumable: the output shards are staged there and recorded in the checkpoint manifest
(flows/checkpoint.py), so ``resume=True`` continues after the last committed block. Under
``torchrun`` the work is shared as in :func:`quantize_model` (flows/distributed.py) and rank 0
writes the output.

Not available out of core (they need the whole model at once): ``allocation="knapsack"`` and
``importance="hessian"``; a fractional ``bits`` with ``importance="lim"`` or ``"zd"`` streams
the blocks once more to score them.
"""
from __future__ import annotations

import contextlib
import copy
import gc
import hashlib
import json
import time
from pathlib import Path
from typing import Dict, List, Optional, Union

import torch
from torch import nn

from .calibration import capture_block_inputs, run_block
from .distributed import check_ranks_agree, local_batches, rank, world_size
from .importance import lim_from_hidden, zd_score
from .io import (CONFIG, WEIGHTS, WEIGHTS_INDEX, ShardedWriter, _dedupe, layer_entry,
                 quantization_config_of, read_json, saved_config)
from .models import ModelAdapter, adapter_for, weight_oi
from .quantize_model import (QuantizeSettings, QuantReport, _allocate_bits,
                             _calibrate, _check_lorc_rank, _open_checkpoints, _quantise_blocks,
                             _report, _score_importance, _Tally)

__all__ = ["quantize_checkpoint", "CheckpointTensors", "meta_skeleton"]

OUTPUT_STAGING = "output.partial"  # the output shards of a resumable run, in its checkpoint_dir


class CheckpointTensors:
    """The tensors of a Hugging Face checkpoint directory (``model.safetensors`` or the shards
    listed in ``model.safetensors.index.json``), read on demand: :meth:`read` memory-maps each
    file only for the duration of one read, so pages of tensors read earlier do not stay
    resident."""

    def __init__(self, directory: Union[str, Path]):
        from safetensors import safe_open

        self.dir = Path(directory)
        single, index = self.dir / WEIGHTS, self.dir / WEIGHTS_INDEX
        weight_map = None
        if single.is_file():
            files = [WEIGHTS]
        elif index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise ValueError(f"{index}: weight_map must map tensor names to file names")
            files = sorted(set(weight_map.values()))
        else:
            raise FileNotFoundError(f"{self.dir}: neither {WEIGHTS} nor {WEIGHTS_INDEX} found "
                                    "(a safetensors checkpoint directory is expected)")
        self.where: Dict[str, str] = {}
        self.headers: Dict[str, dict] = {}
        for name in files:
            file = self.dir / name
            if Path(name).name != name or not file.is_file():
                raise FileNotFoundError(f"{file}: shard missing (listed in {index})")
            try:
                with safe_open(str(file), framework="pt") as h:
                    for key in h.keys():
                        sl = h.get_slice(key)
                        self.where[key] = name
                        self.headers.setdefault(name, {})[key] = (sl.get_dtype(), list(sl.get_shape()))
            except Exception as e:  # safetensors raises its own error types
                raise ValueError(f"{file}: unreadable safetensors file: {e}") from None
        if weight_map is not None:  # the index says which tensors there are, and where
            for key, name in weight_map.items():
                if key not in self.headers[name]:
                    raise ValueError(f"{self.dir / name}: {key!r} is missing (listed in {index})")
            self.where = dict(weight_map)

    def keys(self):
        return self.where.keys()

    def read(self, keys, dtype: Optional[torch.dtype] = None) -> Dict[str, torch.Tensor]:
        """``{key: tensor}`` (floating tensors cast to ``dtype`` when given), each an owned
        CPU copy."""
        from safetensors import safe_open

        missing = [k for k in keys if k not in self.where]
        if missing:
            raise KeyError(f"{self.dir}: the checkpoint has no tensor {missing[0]!r}"
                           + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        by_file: Dict[str, List[str]] = {}
        for k in keys:
            by_file.setdefault(self.where[k], []).append(k)
        out = {}
        for name, ks in by_file.items():
            with safe_open(str(self.dir / name), framework="pt") as h:
                for k in ks:
                    t = h.get_tensor(k)
                    if dtype is not None and t.is_floating_point() and t.dtype != dtype:
                        t = t.to(dtype)
                    out[k] = t
        return out

    def fingerprint(self) -> str:
        """SHA-256 over ``config.json`` and every file's size and safetensors header (names,
        dtypes, shapes): what a resume checks instead of hashing the weights of a model that
        is not in memory."""
        h = hashlib.sha256((self.dir / CONFIG).read_bytes() if (self.dir / CONFIG).is_file() else b"")
        for name in sorted(self.headers):
            h.update(f"{name}|{(self.dir / name).stat().st_size}|".encode())
            h.update(json.dumps(self.headers[name], sort_keys=True).encode())
        return h.hexdigest()


@contextlib.contextmanager
def _parameters_on_meta():
    """Every parameter registered inside goes to the ``meta`` device (buffers stay real): a
    model built here holds no weights."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def meta_skeleton(model_dir: Union[str, Path], dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model of ``model_dir/config.json`` (the class transformers' auto classes pick: a
    causal LM, or the base model of an encoder) with its parameters on ``meta``."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(str(model_dir))
    auto = transformers.AutoModel if config.model_type == "bert" else transformers.AutoModelForCausalLM
    with _parameters_on_meta():
        model = auto.from_config(config, dtype=dtype)
    return model.eval()


def _tensor_keys(module: nn.Module, recurse: bool = True) -> Dict[str, torch.Tensor]:
    """``{state_dict key: tensor}`` of the module's parameters and persistent buffers."""
    return dict(module.state_dict(keep_vars=True)) if recurse else {
        k: v for k, v in module.state_dict(keep_vars=True).items() if "." not in k}


def _load_into(module: nn.Module, prefix: str, tensors: CheckpointTensors, dtype) -> None:
    """Fills the module's own parameters and persistent buffers from the checkpoint keys
    ``prefix + name`` (``assign``: the meta tensors are replaced, not copied into)."""
    keys = _tensor_keys(module)
    sd = tensors.read([prefix + k for k in keys], dtype)
    module.load_state_dict({k: sd[prefix + k] for k in keys}, strict=True, assign=True)


def _to_meta(module: nn.Module, recurse: bool = False) -> None:
    """Drops the module's own parameters back to ``meta`` (frees them)."""
    for m in (module.modules() if recurse else [module]):
        for name, p in list(m._parameters.items()):
            if p is not None and not p.is_meta:
                m._parameters[name] = nn.Parameter(torch.empty_like(p, device="meta"),
                                                   requires_grad=p.requires_grad)


@contextlib.contextmanager
def _outside_blocks_loaded_on_call(model: nn.Module, blocks: nn.ModuleList,
                                   tensors: CheckpointTensors, dtype):
    """While inside, a module outside the blocks loads its own parameters when it is first
    called (so the capture run loads the embeddings and not the head); they are dropped again
    on exit."""
    in_blocks = {id(m) for m in blocks.modules()}
    loaded, handles = [], []
    prefix_of = {id(m): (name + "." if name else "") for name, m in model.named_modules()}

    def load(mod, args):
        if any(p.is_meta for p in mod.parameters(recurse=False)):
            # on the device of the call's inputs (the capture moves them to its device)
            dev = next((a.device for a in args if isinstance(a, torch.Tensor)), torch.device("cpu"))
            own = list(_tensor_keys(mod, recurse=False))
            prefix = prefix_of[id(mod)]
            sd = tensors.read([prefix + k for k in own], dtype)
            mod.load_state_dict({k: sd[prefix + k].to(dev) for k in own}, strict=False, assign=True)
            loaded.append(mod)

    for m in model.modules():
        if id(m) not in in_blocks and any(True for _ in m.parameters(recurse=False)):
            handles.append(m.register_forward_pre_hook(load))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for m in loaded:
            _to_meta(m)


def _return_freed_memory() -> None:
    """Hands freed heap memory back to the OS (glibc ``malloc_trim``): without it the pages of a
    dropped block stay resident in the allocator's arenas and the process grows as if it kept
    them. A no-op where there is no glibc."""
    import ctypes
    import ctypes.util

    global _LIBC
    if _LIBC is None:
        name = ctypes.util.find_library("c")
        try:
            _LIBC = ctypes.CDLL(name) if name else False
            _LIBC = _LIBC if _LIBC and hasattr(_LIBC, "malloc_trim") else False
        except OSError:
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


def _map_large_allocations() -> None:
    """glibc: allocations of 1 MiB and more get their own mapping, returned to the OS when
    freed. Its default threshold adapts upwards to 32 MiB, after which the flow's large
    temporaries (Hessian copies, dequantised candidates) are served from -- and kept in -- the
    heap, growing the process by several blocks' worth over a block (measured: peak 737 MiB
    instead of 569 MiB on 8 hidden-1024 blocks)."""
    _return_freed_memory()  # loads the library
    if _LIBC and hasattr(_LIBC, "mallopt"):
        _LIBC.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD (fixing it also stops the adaptation)


_LIBC = None


class _StreamedBlocks:
    """The block source of :func:`_quantise_blocks` for the out-of-core flow: each block is a
    copy of the skeleton's, loaded from the checkpoint, written to its output shard when
    quantised (rank 0) and then dropped."""

    def __init__(self, blocks: nn.ModuleList, adapter: ModelAdapter, tensors: CheckpointTensors,
                 writer: Optional[ShardedWriter], shard_names: List[str], tally: _Tally,
                 layers: dict, dtype, staging_rel: Optional[str]):
        self.blocks, self.adapter, self.tensors, self.writer = blocks, adapter, tensors, writer
        self.shard_names, self.tally, self.layers, self.dtype = shard_names, tally, layers, dtype
        self.staging_rel = staging_rel
        self.loaded: List[int] = []  # which blocks were materialised (the tests read it)

    def __len__(self):
        return len(self.blocks)

    def load(self, bi: int) -> nn.Module:
        block = copy.deepcopy(self.blocks[bi])  # meta: free to copy
        _load_into(block, self.adapter.block_name(bi) + ".", self.tensors, self.dtype)
        self.loaded.append(bi)
        return block

    def store(self, bi: int, block: nn.Module) -> Optional[dict]:
        from ..nn import QuantLinear

        prefix = self.adapter.block_name(bi) + "."
        for lay in self.tally.layers:  # the model holds no quantised layers to read them from
            if lay.block == bi:
                lay.effective_bits = block.get_submodule(lay.name[len(prefix):]).effective_bits()
        for name, m in block.named_modules():
            if isinstance(m, QuantLinear):
                self.layers[prefix + name] = layer_entry(m)
        if self.writer is None:  # not rank 0
            return None
        tensors, _ = _dedupe(block.state_dict())
        self.writer.write_shard(self.shard_names[bi], {prefix + k: v for k, v in tensors.items()})
        return None if self.staging_rel is None else {"file": f"{self.staging_rel}/{self.shard_names[bi]}"}

    def release(self, bi: int) -> None:
        # the caller drops the last reference to the block (the skeleton's stays on meta)
        gc.collect()
        _return_freed_memory()


def _outside_groups(model: nn.Module, blocks_path: str, tensors: CheckpointTensors):
    """The output keys outside the blocks, grouped by module (one output shard each, so the
    embeddings and the head are never in memory together), and the aliases of tied keys the
    checkpoint stores once (e.g. ``lm_head.weight`` -> ``model.embed_tokens.weight``)."""
    sd = model.state_dict(keep_vars=True)
    stored = set(tensors.keys())
    groups: Dict[str, List[str]] = {}
    aliases = {}
    by_tensor = {}
    for k, t in sd.items():
        if k.startswith(blocks_path + "."):
            continue
        if k in stored:
            by_tensor.setdefault(id(t), k)
            groups.setdefault(k.rpartition(".")[0], []).append(k)
    for k, t in sd.items():
        if k.startswith(blocks_path + ".") or k in stored:
            continue
        if id(t) in by_tensor:
            aliases[k] = by_tensor[id(t)]
        else:
            raise KeyError(f"{tensors.dir}: the checkpoint has no tensor {k!r}, which the model "
                           f"of its config.json needs")
    return list(groups.values()), aliases


def _stream_scores(importance: str, model, adapter, blocks, tensors, ids, batch_size, dtype,
                   device) -> List[float]:
    """Block importance with one block in memory at a time: LIM from each block's inputs and
    outputs on the calibration data, ZD from its linears' weights."""
    if importance not in ("lim", "zd"):
        raise ValueError(f"importance={importance!r} needs the whole model in memory; out of core "
                         "use 'lim' or 'zd' (or block_order)")
    inputs = None
    if importance == "lim":
        with _outside_blocks_loaded_on_call(model, blocks, tensors, dtype):
            inputs = capture_block_inputs(model, local_batches(ids, batch_size), adapter,
                                          batch_size, device)
    scores = []
    for bi in range(len(blocks)):
        block = copy.deepcopy(blocks[bi])
        _load_into(block, adapter.block_name(bi) + ".", tensors, dtype)
        if importance == "zd":
            scores.append(zd_score([weight_oi(m) for m in adapter.linears(block).values()]))
        else:
            dev = torch.device(device) if device is not None else torch.device("cpu")
            block.to(dev)
            outs = run_block(block, inputs, dev)
            scores.append(lim_from_hidden(inputs.hidden, outs))
            inputs.hidden = outs
        del block
    return scores


@torch.no_grad()
def quantize_checkpoint(model_dir: Union[str, Path], out: Union[str, Path], overwrite: bool = False,
                        extra: Optional[dict] = None, **kwargs) -> QuantReport:
    """Quantises the Hugging Face checkpoint directory ``model_dir`` block by block, never
    holding more than one block in memory, and writes the quantised model to ``out`` (see the
    module doc). ``kwargs``: those of :func:`quantize_model` (``tokenizer`` for text
    calibration, ``device``, ``checkpoint_dir``/``resume``, ...). ``extra`` is stored under
    ``quantization_config.extra`` (the report is added as ``extra["report"]`` when ``extra`` is
    None). Returns the report."""
    if kwargs.get("adapter") is not None:
        raise ValueError("quantize_checkpoint builds its model from model_dir/config.json: adapter= "
                         "cannot be given (the adapter is chosen by its model_type)")
    threads = kwargs.get("threads")
    if kwargs.get("fuse_projections"):
        raise ValueError("fuse_projections=True is not available out of core (the layers are written "
                         "block by block as separate parts; load the result and fuse it with "
                         "layerpress.flows.fusion.fuse_projections)")
    s = QuantizeSettings(**{**kwargs, "fuse_projections": False})
    if s.allocation == "knapsack":
        raise ValueError("allocation='knapsack' measures every layer of the whole model: not "
                         "available out of core (use allocation='order')")
    out = Path(out)
    if out.exists() and not overwrite:  # before any work
        raise FileExistsError(f"{out} exists (pass overwrite=True to replace it)")
    old = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run_out_of_core(Path(model_dir), out, overwrite, extra, s)
    finally:
        torch.set_num_threads(old)


def _run_out_of_core(model_dir: Path, out: Path, overwrite: bool, extra, s: QuantizeSettings):
    started = time.perf_counter()
    _map_large_allocations()
    dtype = torch.float32
    tensors = CheckpointTensors(model_dir)
    check_ranks_agree(checkpoint=tensors.fingerprint())  # distributed: the same model everywhere
    model = meta_skeleton(model_dir, dtype)
    adapter = adapter_for(model)
    blocks = adapter.blocks()
    n_blocks = len(blocks)
    ids, batch_size = _calibrate(adapter, s)
    _check_lorc_rank(adapter, blocks, s.lorc_rank)
    scoring = _score_importance(model, adapter, blocks, ids, batch_size, s, scores_of=lambda imp: (
        _stream_scores(imp, model, adapter, blocks, tensors, ids, batch_size, dtype, s.device)))
    plan = _allocate_bits(model, adapter, blocks, ids, batch_size, scoring, s)

    groups, aliases = _outside_groups(model, adapter.blocks_path(), tensors)
    total = n_blocks + len(groups)
    names = [f"model-{i + 1:05d}-of-{total:05d}.safetensors" for i in range(total)]
    with _outside_blocks_loaded_on_call(model, blocks, tensors, dtype):
        inputs = capture_block_inputs(model, local_batches(ids, batch_size), adapter, batch_size,
                                      s.device)
    _return_freed_memory()  # the embeddings
    tally = _Tally()
    ckpt, start = _open_checkpoints(model, blocks, ids, plan, inputs, tally, s,
                                    model_fp=tensors.fingerprint(), restore=False)
    staging = None if ckpt is None else Path(s.checkpoint_dir) / OUTPUT_STAGING
    writer = ShardedWriter(out, overwrite, staging) if rank() == 0 else None
    layers: Dict[str, dict] = {}
    if ckpt is not None:  # the blocks already done: their entries from the manifest
        for entry in ckpt.blocks:
            prefix = adapter.block_name(entry["block"]) + "."
            layers.update({prefix + k: v for k, v in entry["layers"].items()})
    source = _StreamedBlocks(blocks, adapter, tensors, writer, names, tally, layers, dtype,
                             None if ckpt is None else OUTPUT_STAGING)
    try:
        _quantise_blocks(source, adapter, inputs, plan, tally, ckpt, start, s)
        report = _report(model, adapter, plan, tally, ids, started, s, filled=True)
        if writer is not None:
            for gi, keys in enumerate(groups):  # embeddings, final norm, head: as they are
                writer.write_shard(names[n_blocks + gi], tensors.read(keys, dtype))
            qcfg = quantization_config_of(dict(sorted(layers.items())), type(model).__name__)
            qcfg["aliases"] = aliases
            qcfg["extra"] = extra if extra is not None else {"report": report.to_dict()}
            writer.commit(names, saved_config(model, qcfg))
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if world_size() > 1:
        import torch.distributed as dist
        dist.barrier()  # the output is complete when any rank returns
    return report

