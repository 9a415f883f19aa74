"""Quantise a whole model layer by layer and swap its linears for ``QuantLinear``.

``quantize_model(model, bits=4, group_size=128, axis="auto", method="gptq", importance="lim",
calib=...)``:

1. calibration token ids (built-in English sentences by default, tokenised with ``tokenizer``);
2. for a fractional ``bits`` (e.g. 3.25): block importance (LIM on calibration data, or ZD from
   the weights) and the allocation of the high/low widths (:mod:`.allocate`);
3. block by block (only the current block on ``device``): run the full-precision block on its
   inputs, collecting each linear's input Hessian and the inputs/outputs of the AdaDim
   measurement modules; per linear quantise (RTN or GPTQ) -- for ``axis="auto"`` with both axes,
   keeping the one whose fake-quantised weight gives the lower output MSE at the adapter's
   measurement point, measured with the quantiser that is actually applied; swap the block's
   linears (``nn.Linear`` and GPT-2 ``Conv1D``) for ``QuantLinear``; run the quantised block to
   get the next block's inputs.

Returns a :class:`QuantReport` (per-layer bits, axis, error; allocation; timings).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Union

import torch
from torch import nn

from ..nn import QuantLinear
from ..spec import BITS, QuantSpec
from .allocate import allocate_bits, allocate_knapsack, hawq_layer_errors, measure_layer_errors
from .calibration import (capture_block_inputs, default_calibration_shape, default_texts,
                          load_texts, run_block, tokenize_texts)
from .importance import hessian_scores, hessian_traces, importance_order, lim_scores, zd_scores
from .models import ModelAdapter, adapter_for, get_submodule, is_conv1d, weight_oi
from .progress import progress_bar
from .quantizers import HessianAccumulator, QuantResult, gptq, rtn
from .side_paths import check_side_args, quantise_with_side_paths

__all__ = ["quantize_model", "QuantReport", "LayerReport", "calibration_ids"]

METHODS = ("rtn", "gptq", "awq", "awq+gptq")
AXIS_CHOICES = ("oc", "ic", "auto")


@dataclass
class LayerReport:
    name: str                 # full module name in the model
    block: int
    bits: int
    axis: str
    group_size: int
    method: str
    in_features: int
    out_features: int
    rel_error: float          # ||X Wᵀ − X Ŵᵀ|| / ||X Wᵀ|| on the calibration inputs
    axis_mse: Dict[str, float] = field(default_factory=dict)  # AdaDim: MSE at the measurement point
    measure_point: str = ""
    effective_bits: float = 0.0  # stored bits (codes, scales, zeros, side paths) per weight


@dataclass
class QuantReport:
    model_type: str
    method: str
    bits_target: float
    group_size: int
    axis: str
    importance: Optional[str]
    block_bits: List[int]
    block_scores: Optional[List[float]]
    demoted: List[int]
    average_bits: float       # parameter-weighted average code bits of the quantised linears
    layers: List[LayerReport]
    n_samples: int
    seq_len: int
    time_s: float
    quantized_params: int
    original_bytes: int = 0   # bytes of the replaced float weights
    quantized_bytes: int = 0  # bytes of qweight + scales + zeros
    effective_bits: float = 0.0  # parameter-weighted average of the layers' effective bits
    allocation: str = "order"    # "order" (demote by importance) or "knapsack"
    awq_groups: List[dict] = field(default_factory=list)  # AWQ: per scaling group α and errors

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        axes = {}
        for layer in self.layers:
            axes[layer.axis] = axes.get(layer.axis, 0) + 1
        return (f"{self.model_type}: {len(self.layers)} linears, {self.method}, "
                f"avg {self.average_bits:.3f} code bits (target {self.bits_target}, "
                f"{self.allocation}), {self.effective_bits:.3f} effective, g{self.group_size}, "
                f"axes {axes}, {self.time_s:.1f} s")


def calibration_ids(calib=None, tokenizer=None, n_samples: int = 32, seq_len: int = 64,
                    seed: int = 0, align: bool = False) -> torch.Tensor:
    """Calibration token ids from: a ``LongTensor [n, seq_len]`` (used as is), a list of
    strings, a path or list of paths to text files, or None (the built-in English sentences).
    ``align``: windows start at the start of a text line (see ``tokenize_texts``)."""
    if isinstance(calib, torch.Tensor):
        if calib.dim() != 2 or calib.dtype not in (torch.long, torch.int32, torch.int64):
            raise ValueError(f"calibration ids must be an integer tensor [n, seq_len], got "
                             f"{calib.dtype} {list(calib.shape)}")
        return calib.long()
    if calib is None:
        texts = default_texts("calibration")
    elif isinstance(calib, (str, Path)):
        texts = load_texts(calib)
    elif isinstance(calib, (list, tuple)) and all(isinstance(t, Path) for t in calib):
        texts = load_texts(calib)
    elif isinstance(calib, (list, tuple)) and all(isinstance(t, str) for t in calib):
        texts = list(calib)
    else:
        raise TypeError(f"calib must be token ids, texts, text file path(s) or None, got {type(calib).__name__}")
    if tokenizer is None:
        raise ValueError("calibration from text needs a tokenizer (or pass token ids as calib)")
    return tokenize_texts(tokenizer, texts, n_samples, seq_len, seed, align=align)


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(get_submodule(root, parent), child, new)


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _candidate_specs(axis: str, bits: int, group_size: int, symmetric: bool, scale_dtype,
                     n: int, k: int) -> List[QuantSpec]:
    axes = ["oc", "ic"] if axis == "auto" else [axis]
    specs = []
    errors = []
    for a in axes:
        spec = QuantSpec(bits=bits, group_size=group_size, axis=a, symmetric=symmetric,
                         scale_dtype=scale_dtype)
        try:
            spec.check_shape(n, k)
            specs.append(spec)
        except ValueError as e:
            errors.append(str(e))
    if not specs:
        raise ValueError(f"no usable quantisation spec for a [{n}, {k}] weight: {'; '.join(errors)}")
    return specs


def _quantise(w, spec, method, H, act_order, clip=True) -> QuantResult:
    if method in ("rtn", "awq"):  # AWQ: RTN of the scaled weight (scales folded before)
        return rtn(w, spec, clip=clip, hdiag=torch.diag(H) if clip else None)
    return gptq(w, H, spec, act_order=act_order, clip=clip)


def _quantise_side(w, spec, method, H, act_order, side: dict, clip: bool = True) -> QuantResult:
    """:func:`_quantise` plus the optional side paths (outliers, LoRC: flows/side_paths.py);
    the result's ``weight`` is then the effective weight."""
    return quantise_with_side_paths(w, spec, lambda w_, s_: _quantise(w_, s_, method, H, act_order, clip),
                                    H, **side)


def _awq_block(block, bi, adapter, inputs, dev, group_size, symmetric, scale_dtype, block_bits,
               layer_bits, clip) -> List[dict]:
    """AWQ scale search and folding for one block (flows/awq.py), searched with per-OC RTN at
    each linear's width; returns one report entry per scaling group."""
    from .awq import awq_block

    def spec_for(name, n, k):
        width = layer_bits.get(f"{adapter.block_name(bi)}.{name}", block_bits[bi])
        return _candidate_specs("auto", width, group_size, symmetric, scale_dtype, n, k)[0]

    res = awq_block(block, adapter, inputs, spec_for, device=dev, clip=clip)
    return [dict(block=bi, **asdict(r)) for r in res]


def _quad(D: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """Σ_i d_i H d_iᵀ = ||X Dᵀ||² for H = XᵀX (rows d_i of D)."""
    return ((D @ H) * D).sum()


def _ids_fingerprint(ids: torch.Tensor) -> str:
    import hashlib
    return hashlib.sha256(ids.detach().cpu().long().contiguous().numpy().tobytes()).hexdigest()


def _importance_scores(importance, model, ids, adapter, batch_size, device, seed,
                       progress: Optional[bool] = None) -> List[float]:
    if importance == "lim":
        return lim_scores(model, ids, adapter, batch_size, device)
    if importance == "zd":
        return zd_scores(model, adapter)
    if importance == "hessian":
        return hessian_scores(model, ids, adapter, batch_size=batch_size, device=device, seed=seed,
                              progress=progress)
    raise ValueError(f"importance must be 'lim', 'zd' or 'hessian', got {importance!r}")


def _bytes(t) -> int:
    return 0 if t is None else t.numel() * t.element_size()


@torch.no_grad()
def quantize_model(model: nn.Module, bits: Union[int, float] = 4, group_size: int = 128,
                   axis: str = "auto", method: str = "gptq", importance: str = "lim",
                   calib=None, tokenizer=None, n_samples: Optional[int] = None,
                   seq_len: Optional[int] = None, batch_size: Optional[int] = None, device=None,
                   symmetric: bool = False,
                   scale_dtype: torch.dtype = torch.float16, act_order: bool = True,
                   high_bits: Optional[int] = None, low_bits: Optional[int] = None,
                   seed: int = 0, adapter: Optional[ModelAdapter] = None,
                   verbose: bool = False, threads: Optional[int] = None,
                   select_with: str = "applied", outliers: float = 0.0, lorc_rank: int = 0,
                   outlier_criterion: str = "magnitude", side_dtype: torch.dtype = torch.float16,
                   checkpoint_dir=None, resume: bool = False,
                   on_block_done=None, allocation: str = "order", widths=None,
                   clip: bool = True, align: Optional[bool] = None,
                   block_order=None, progress: Optional[bool] = None) -> QuantReport:
    """Quantises ``model`` in place (see the module docstring); returns the report.
    ``threads``: torch intra-op threads for the run (restored afterwards). ``select_with``:
    ``"applied"`` (default) measures AdaDim's candidates with the quantiser that is applied;
    ``"rtn"`` chooses the axis with RTN and then runs ``method`` on it (the AdaDim paper's recipe
    for GPTQ, half the GPTQ work).

    Side paths (flows/side_paths.py): ``outliers`` (fraction in [0, 1) of each layer's weights
    kept in ``side_dtype``, chosen by ``outlier_criterion``) and ``lorc_rank`` (rank of the
    activation-weighted low-rank correction, 0 = none). Checkpoints (flows/checkpoint.py):
    ``checkpoint_dir`` saves every finished block; ``resume=True`` continues a run interrupted
    there (same arguments, model and calibration data, else an error). ``on_block_done(i)`` is
    called after block ``i`` is finished (and checkpointed).

    Allocation (flows/allocate.py): ``allocation="order"`` demotes blocks from ``high_bits`` to
    ``low_bits`` least important first (by ``importance``: ``"lim"``, ``"zd"`` or
    ``"hessian"``) for a fractional ``bits``; ``"knapsack"`` gives each linear a width from
    ``widths`` (default 2, 3, 4, 8) minimising a summed per-layer error under the average
    ``bits`` (any target, integer ones included): with ``importance="hessian"`` HAWQ-V3's
    ``Tr(H_l)/n_l · ‖W_l − Q(W_l)‖²``, otherwise the measured RTN output error.

    Quality options (flows/quantizers.py, flows/awq.py): ``method`` ``"rtn"``, ``"gptq"``,
    ``"awq"`` (activation-aware scales folded into the preceding norm/linear, then RTN) or
    ``"awq+gptq"`` (the same scales, then GPTQ); ``clip`` (default on) chooses each group's
    range by a clipping search minimising its (Hessian-diagonal-weighted) squared error instead
    of min-max. Calibration: ``n_samples``/``seq_len``/``align`` default by model kind --
    encoders 256 sequences of 16 tokens starting at sentence starts (one calibration sentence
    each, shaped like the sentences an encoder embeds), causal LMs 32 random windows of 64
    tokens; ``batch_size`` (sequences per forward) defaults to about 1024 tokens' worth.
    ``block_order``: blocks least important first, used instead of ``importance`` by the
    fractional-bit allocation (e.g. a random order as a baseline)."""
    run_args = dict(locals())  # every argument, recorded by a checkpoint manifest
    check_side_args(outliers, lorc_rank, side_dtype, outlier_criterion)
    if select_with not in ("applied", "rtn"):
        raise ValueError(f"select_with must be 'applied' or 'rtn', got {select_with!r}")
    old = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _quantize_model(model, bits, group_size, axis, method, importance, calib, tokenizer,
                               n_samples, seq_len, batch_size, device, symmetric, scale_dtype,
                               act_order, high_bits, low_bits, seed, adapter, verbose, select_with,
                               side=dict(outliers=outliers, lorc_rank=lorc_rank, side_dtype=side_dtype,
                                         criterion=outlier_criterion),
                               ckpt_args=(checkpoint_dir, resume, on_block_done, run_args),
                               alloc_args=(allocation, widths),
                               quality=dict(clip=clip, align=align, block_order=block_order,
                                            progress=progress))
    finally:
        torch.set_num_threads(old)


@torch.no_grad()
def _quantize_model(model, bits, group_size, axis, method, importance, calib, tokenizer,
                    n_samples, seq_len, batch_size, device, symmetric, scale_dtype, act_order,
                    high_bits, low_bits, seed, adapter, verbose, select_with, side=None,
                    ckpt_args=(None, False, None, None), alloc_args=("order", None),
                    quality=None) -> QuantReport:
    started = time.perf_counter()
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if axis not in AXIS_CHOICES:
        raise ValueError(f"axis must be one of {AXIS_CHOICES}, got {axis!r}")
    if isinstance(bits, bool) or not isinstance(bits, (int, float)) or bits <= 0:
        raise ValueError(f"bits must be a positive number, got {bits!r}")
    adapter = adapter or adapter_for(model)
    blocks = adapter.blocks()
    quality = quality or {}
    clip, block_order = quality.get("clip", True), quality.get("block_order")
    n_samples, seq_len, align = default_calibration_shape(adapter.kind, n_samples, seq_len,
                                                          quality.get("align"))
    ids = calibration_ids(calib, tokenizer, n_samples, seq_len, seed, align)
    if batch_size is None:  # about 1024 tokens per batch: few, large ops (short sequences too)
        batch_size = max(1, 1024 // int(ids.shape[1]))
    was_training = model.training
    model.eval()

    # ---- bit allocation ---------------------------------------------------------------------
    linears0 = [adapter.linears(b) for b in blocks]
    params = [sum(weight_oi(m).numel() for m in lins.values()) for lins in linears0]
    rank = (side or {}).get("lorc_rank", 0)
    too_small = [(f"{adapter.block_name(bi)}.{nm}", list(weight_oi(m).shape)) for bi, lins in
                 enumerate(linears0) for nm, m in lins.items() if rank > min(weight_oi(m).shape)]
    if too_small:  # refused before any work, not at the first such layer
        raise ValueError(f"lorc_rank must be in [0, min(out_features, in_features)] for every "
                         f"linear, got {rank}; {too_small[0][0]} is {too_small[0][1]}")
    scores, imp, layer_bits = None, None, {}
    allocation, widths = alloc_args
    if allocation not in ("order", "knapsack"):
        raise ValueError(f"allocation must be 'order' or 'knapsack', got {allocation!r}")
    if allocation == "knapsack":
        imp = importance
        if importance == "hessian":  # HAWQ-V3: per-linear average trace x ||W - Q(W)||²
            traces = hessian_traces(model, ids, adapter, batch_size=batch_size, device=device, seed=seed,
                                    progress=quality.get("progress"))
            scores = traces.block
            names, lparams, errs = hawq_layer_errors(model, traces.linear, adapter, widths or BITS,
                                                     group_size, axis, symmetric, scale_dtype)
        else:  # measured RTN output error; the scores are only reported (and plotted)
            if importance is not None:
                scores = _importance_scores(importance, model, ids, adapter, batch_size, device, seed,
                                            quality.get("progress"))
            names, lparams, errs = measure_layer_errors(model, ids, adapter, widths or BITS, group_size,
                                                        axis, symmetric, scale_dtype, batch_size, device)
        ks = allocate_knapsack(lparams, errs, float(bits), widths or BITS)
        layer_bits = dict(zip(names, ks.bits))
        block_bits = []
        for bi in range(len(blocks)):
            mine = [(b, p) for nm, b, p in zip(names, ks.bits, lparams)
                    if nm.startswith(adapter.block_name(bi) + ".")]
            same = len({b for b, _ in mine}) == 1
            block_bits.append(mine[0][0] if same else sum(b * p for b, p in mine) / sum(p for _, p in mine))
        demoted, average = [], ks.average
    elif float(bits).is_integer() and high_bits is None and low_bits is None:
        block_bits = [int(bits)] * len(blocks)
        QuantSpec(bits=int(bits))  # validates the width
        demoted, average = [], float(bits)
    else:
        if block_order is not None:
            order = [int(i) for i in block_order]
            if sorted(order) != list(range(len(blocks))):
                raise ValueError(f"block_order must be a permutation of 0..{len(blocks) - 1}, "
                                 f"got {list(block_order)}")
            imp = "given order"
        else:
            imp = importance
            scores = _importance_scores(importance, model, ids, adapter, batch_size, device, seed,
                                            quality.get("progress"))
            order = importance_order(scores, importance)
        alloc = allocate_bits(params, order, float(bits), high_bits, low_bits)
        block_bits, demoted, average = alloc.bits, alloc.demoted, alloc.average

    # ---- block by block -----------------------------------------------------------------------
    inputs = capture_block_inputs(model, ids, adapter, batch_size, device)
    layers: List[LayerReport] = []
    awq_groups: List[dict] = []
    orig_bytes = quant_bytes = 0
    side = side or {}
    checkpoint_dir, resume, on_block_done, run_args = ckpt_args
    ckpt, start = None, 0
    if checkpoint_dir is not None:  # per-block checkpoints (flows/checkpoint.py)
        from .checkpoint import BlockCheckpoints, model_fingerprint, run_arguments
        ckpt = BlockCheckpoints(checkpoint_dir, run_arguments(run_args or {}), model_fingerprint(model),
                                _ids_fingerprint(ids), len(blocks), block_bits)
        start, hidden, done = ckpt.begin(resume)
        for entry in done:
            ckpt.restore_block(blocks[entry["block"]], entry)
            layers += [LayerReport(**r) for r in entry["reports"]]
            orig_bytes += entry["extra"]["original_bytes"]
            quant_bytes += entry["extra"]["quantized_bytes"]
        if hidden is not None:
            inputs.hidden = hidden
        if verbose and start:
            print(f"  resumed from {checkpoint_dir}: blocks 0..{start - 1} restored")
    bar = progress_bar(len(blocks), f"quantising ({method})", quality.get("progress"), "block")
    bar.update(start)
    for bi, block in enumerate(blocks):
        if bi < start:
            continue
        block_layers0, block_bytes0 = len(layers), (orig_bytes, quant_bytes)
        home = next(block.parameters()).device
        dev = torch.device(device) if device is not None else home
        block.to(dev)
        lins = adapter.linears(block)
        if method.startswith("awq") and axis != "ic":  # per-IC groups are scale-invariant
            awq_groups += _awq_block(block, bi, adapter, inputs, dev, group_size, symmetric,
                                     scale_dtype, block_bits, layer_bits, clip)
        hess = {name: HessianAccumulator(weight_oi(m).shape[1], dev) for name, m in lins.items()}
        points = sorted({adapter.measure_point(n) for n in lins} - set(lins)) if axis == "auto" else []
        cap = {p: {"args": [], "kwargs": [], "out": []} for p in points}
        handles = []
        for name, m in lins.items():
            handles.append(m.register_forward_hook(
                lambda mod, a, out, _n=name: hess[_n].add(a[0])))
        for p in points:
            mod = get_submodule(block, p)
            handles.append(mod.register_forward_pre_hook(
                lambda mod, a, kw, _p=p: (cap[_p]["args"].append(a), cap[_p]["kwargs"].append(kw), None)[-1],
                with_kwargs=True))
            handles.append(mod.register_forward_hook(
                lambda mod, a, out, _p=p: cap[_p]["out"].append(_first(out).detach())))
        try:
            run_block(block, inputs, dev)
        finally:
            for h in handles:
                h.remove()

        chosen = {}
        for name, m in lins.items():
            W = weight_oi(m).detach().float().clone()
            n, k = W.shape
            Hraw = hess[name].H.float()  # Σ xxᵀ
            H = hess[name].hessian()
            width = layer_bits.get(f"{adapter.block_name(bi)}.{name}", block_bits[bi])
            specs = _candidate_specs(axis, width, group_size, symmetric, scale_dtype, n, k)
            sel = method if select_with == "applied" else "rtn"
            results = {s.axis: _quantise_side(W, s, sel, H, act_order, side, clip) for s in specs}
            point = adapter.measure_point(name)
            mse = {}
            if len(results) > 1:
                for a, res in results.items():
                    D = W - res.weight
                    if point == name:
                        mse[a] = (_quad(D, Hraw) / (hess[name].n * n)).item()
                        continue
                    mod = get_submodule(block, point)
                    view = weight_oi(m)
                    keep = view.clone()
                    view.copy_(res.weight.to(view.dtype))
                    try:
                        err, cnt = 0.0, 0
                        for a_, kw_, ref in zip(cap[point]["args"], cap[point]["kwargs"], cap[point]["out"]):
                            y = _first(mod(*a_, **kw_))
                            err += (y.float() - ref.float()).pow(2).sum().item()
                            cnt += ref.numel()
                        mse[a] = err / cnt
                    finally:
                        view.copy_(keep)
                best = min(mse, key=lambda a: (mse[a], a != "oc"))
            else:
                best = next(iter(results))
            res = results[best]
            if sel != method:  # axis chosen with RTN (AdaDim paper's recipe), then quantised
                res = _quantise_side(W, res.spec, method, H, act_order, side, clip)
            num = _quad(W - res.weight, Hraw).clamp_min(0).sqrt()
            den = _quad(W, Hraw).clamp_min(1e-30).sqrt()
            rel = (num / den).item()
            full = f"{adapter.block_name(bi)}.{name}"
            layers.append(LayerReport(full, bi, res.spec.bits, best, group_size, method, k, n, rel,
                                      mse, point))
            chosen[name] = res
            if verbose:
                print(f"  {full}: W{res.spec.bits} {best} rel.err {rel:.4f} {mse if mse else ''}")
        for name, res in chosen.items():
            m = lins[name]
            bias = None if getattr(m, "bias", None) is None else m.bias.detach()
            side_paths = getattr(res, "side", None)
            q = QuantLinear.from_quantized(res.qweight, res.scales, res.zeros, res.spec, bias,
                                           **(side_paths.kwargs() if side_paths else {}))
            q._lp_conv1d = is_conv1d(m)  # recorded in the saved config
            orig_bytes += _bytes(m.weight)
            quant_bytes += _bytes(res.qweight) + _bytes(res.scales) + _bytes(res.zeros)
            quant_bytes += side_paths.nbytes() if side_paths else 0
            _set_module(block, name, q)
        del hess, cap
        inputs.hidden = run_block(block, inputs, dev)
        block.to(home)
        if ckpt is not None:
            ckpt.save_block(bi, block, [asdict(r) for r in layers[block_layers0:]],
                            {"original_bytes": orig_bytes - block_bytes0[0],
                             "quantized_bytes": quant_bytes - block_bytes0[1]},
                            inputs.hidden if bi + 1 < len(blocks) else None)
        bar.update()
        if on_block_done is not None:
            on_block_done(bi)
    bar.close()
    if ckpt is not None:
        ckpt.finish()
    model.train(was_training)
    from .report import fill_effective_bits
    eff = fill_effective_bits(model, layers)
    return QuantReport(
        model_type=adapter.config.model_type, method=method, bits_target=float(bits),
        group_size=group_size, axis=axis, importance=imp, block_bits=block_bits,
        block_scores=scores, demoted=demoted, average_bits=average, layers=layers,
        n_samples=int(ids.shape[0]), seq_len=int(ids.shape[1]),
        time_s=time.perf_counter() - started, quantized_params=int(sum(params)),
        original_bytes=orig_bytes, quantized_bytes=quant_bytes, effective_bits=eff,
        awq_groups=awq_groups,
        allocation=allocation)
