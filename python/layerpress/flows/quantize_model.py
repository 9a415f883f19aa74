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
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from ..nn import QuantLinear
from ..spec import BITS, QuantSpec
from .allocate import allocate_bits, allocate_knapsack, hawq_layer_errors, measure_layer_errors
from .calibration import (capture_block_inputs, default_calibration_shape, default_texts,
                          load_texts, run_block, tokenize_texts)
from .distributed import (all_reduce_sum, check_ranks_agree, compute_by_owner, local_batches,
                          world_size)
from .importance import hessian_scores, hessian_traces, importance_order, lim_scores, zd_scores
from .models import ModelAdapter, adapter_for, get_submodule, is_conv1d, weight_oi
from .progress import progress_bar
from .quantizers import HessianAccumulator, QuantResult, gptq, rtn
from .side_paths import check_side_args, quantise_with_side_paths

__all__ = ["quantize_model", "QuantizeSettings", "QuantReport", "LayerReport", "calibration_ids"]

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
    gptq_damp: Optional[float] = None  # GPTQ: relative dampening used (> 0.01: H was not PD; inf: identity)
    rotation: str = "none"    # "hadamard": the weight was quantised as W·R (flows/rotation.py)


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
    fusion: List[dict] = field(default_factory=list)  # fuse_projections: per group, fused / why not

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
    if importance == "lim":  # each rank its own batches; the cosines are summed over the ranks
        return lim_scores(model, local_batches(ids, batch_size), adapter, batch_size, device)
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
                   block_order=None, progress: Optional[bool] = None,
                   rotate: str = "none", rotate_block: int = 128,
                   fuse_projections: bool = True) -> QuantReport:
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
    fractional-bit allocation (e.g. a random order as a baseline).

    Rotation (flows/rotation.py): ``rotate="hadamard"`` quantises every linear as ``W·R`` (a
    randomised block Walsh–Hadamard rotation of blocks of ``rotate_block``, or the largest power
    of two below it dividing K) with GPTQ on ``RᵀHR`` (RTN, AWQ-scaled weights and the clipping
    search likewise in the rotated basis); ``"auto"`` measures the rotated and unrotated
    candidates of each linear together with AdaDim's axes and keeps the lowest output error.

    Fusion (flows/fusion.py, nn/fused.py): ``fuse_projections`` (default on) makes the
    quantised projections of a block that read the same input (Llama/Mistral/Qwen2 q/k/v and
    gate/up, OPT q/k/v, BERT query/key/value) one ``FusedQuantLinear`` each where that is exact
    (same spec, rotation signs, input permutation, bias presence, no side paths); the report's
    ``fusion`` lists what was fused and why the rest was not. The report's layers keep the
    parts' names."""
    settings = QuantizeSettings(**{k: v for k, v in locals().items() if k != "model"})
    old = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(model, settings)
    finally:
        torch.set_num_threads(old)


@dataclass(frozen=True, eq=False)
class QuantizeSettings:
    """The settings of one :func:`quantize_model` run: its keyword arguments (the same names and
    defaults), checked at construction (ValueError) so that a bad one fails before any work.
    :meth:`recorded` is what a checkpoint manifest keeps of them."""
    bits: Union[int, float] = 4
    group_size: int = 128
    axis: str = "auto"
    method: str = "gptq"
    importance: str = "lim"
    calib: object = None
    tokenizer: object = None
    n_samples: Optional[int] = None
    seq_len: Optional[int] = None
    batch_size: Optional[int] = None
    device: object = None
    symmetric: bool = False
    scale_dtype: torch.dtype = torch.float16
    act_order: bool = True
    high_bits: Optional[int] = None
    low_bits: Optional[int] = None
    seed: int = 0
    adapter: Optional[ModelAdapter] = None
    verbose: bool = False
    threads: Optional[int] = None
    select_with: str = "applied"
    outliers: float = 0.0
    lorc_rank: int = 0
    outlier_criterion: str = "magnitude"
    side_dtype: torch.dtype = torch.float16
    checkpoint_dir: object = None
    resume: bool = False
    on_block_done: Optional[Callable[[int], None]] = None
    allocation: str = "order"
    widths: Optional[Sequence[int]] = None
    clip: bool = True
    align: Optional[bool] = None
    block_order: Optional[Sequence[int]] = None
    progress: Optional[bool] = None
    rotate: str = "none"
    rotate_block: int = 128
    fuse_projections: bool = True

    def __post_init__(self):
        check_side_args(self.outliers, self.lorc_rank, self.side_dtype, self.outlier_criterion)
        if self.select_with not in ("applied", "rtn"):
            raise ValueError(f"select_with must be 'applied' or 'rtn', got {self.select_with!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.axis not in AXIS_CHOICES:
            raise ValueError(f"axis must be one of {AXIS_CHOICES}, got {self.axis!r}")
        bits = self.bits
        if isinstance(bits, bool) or not isinstance(bits, (int, float)) or bits <= 0:
            raise ValueError(f"bits must be a positive number, got {bits!r}")
        if self.allocation not in ("order", "knapsack"):
            raise ValueError(f"allocation must be 'order' or 'knapsack', got {self.allocation!r}")
        _check_rotate(self)

    @property
    def side(self) -> dict:
        """The side-path arguments of flows/side_paths.py ``quantise_with_side_paths``."""
        return dict(outliers=self.outliers, lorc_rank=self.lorc_rank, side_dtype=self.side_dtype,
                    criterion=self.outlier_criterion)

    @property
    def widths_or_default(self) -> Sequence[int]:
        return self.widths or BITS

    def recorded(self) -> dict:
        """The result-relevant settings, JSON-normalised, as a checkpoint manifest records them."""
        from .checkpoint import run_arguments
        return run_arguments({f.name: getattr(self, f.name) for f in fields(self)})


@dataclass
class BitPlan:
    """What the allocation stage decided: a width per block (a fraction where knapsack mixed
    widths inside one) and per linear (knapsack), with what the report records of it."""
    block_bits: list
    layer_bits: Dict[str, int]
    demoted: List[int]
    average: float
    params: List[int]                     # weights per block
    scores: Optional[List[float]] = None  # block importance (reported; ordered the demotion)
    importance: Optional[str] = None      # what the scores are ("lim", ..., "given order")

    def width(self, full_name: str, block: int):
        return self.layer_bits.get(full_name, self.block_bits[block])


@dataclass
class _Tally:
    """The report's running totals over the blocks done so far."""
    layers: List[LayerReport] = field(default_factory=list)
    awq_groups: List[dict] = field(default_factory=list)
    original_bytes: int = 0
    quantized_bytes: int = 0


# ---- the run, stage by stage ------------------------------------------------------------------

@torch.no_grad()
def _run(model: nn.Module, s: QuantizeSettings) -> QuantReport:
    started = time.perf_counter()
    adapter = s.adapter or adapter_for(model)  # resolved once, passed to every stage
    blocks = adapter.blocks()
    ids, batch_size = _calibrate(adapter, s)
    was_training = model.training
    model.eval()
    _check_lorc_rank(adapter, blocks, s.lorc_rank)
    _check_finite_weights(adapter, blocks)
    scoring = _score_importance(model, adapter, blocks, ids, batch_size, s)
    plan = _allocate_bits(model, adapter, blocks, ids, batch_size, scoring, s)

    inputs = capture_block_inputs(model, local_batches(ids, batch_size), adapter, batch_size,
                                  s.device)
    tally = _Tally()
    ckpt, start = _open_checkpoints(model, blocks, ids, plan, inputs, tally, s)
    _quantise_blocks(_ModelBlocks(blocks), adapter, inputs, plan, tally, ckpt, start, s)
    model.train(was_training)
    report = _report(model, adapter, plan, tally, ids, started, s)
    if s.fuse_projections:  # after the report, which looks the layers up by their names
        from .fusion import fuse_projections
        report.fusion = fuse_projections(model, adapter)
        if s.verbose:
            n = sum(len(r["fused"]) for r in report.fusion)
            apart = sum(len(r["separate"]) for r in report.fusion)
            print(f"  fused {n} projection group(s); {apart} projection(s) kept separate")
    return report


class _ModelBlocks:
    """Where :func:`_quantise_blocks` gets each block and puts it back: here the blocks of the
    model in memory, quantised in place. The out-of-core flow (flows/out_of_core.py) loads each
    from the checkpoint's shards, writes it to the output shard and frees it instead."""

    def __init__(self, blocks):
        self.blocks = blocks

    def __len__(self):
        return len(self.blocks)

    def load(self, bi: int) -> nn.Module:
        return self.blocks[bi]

    def store(self, bi: int, block: nn.Module) -> Optional[dict]:
        """After block ``bi`` is quantised; returns the checkpoint entry of a file that already
        holds it (None: the checkpoint writes its own)."""
        return None

    def release(self, bi: int) -> None:
        """After block ``bi`` is stored and checkpointed (and the loop dropped it)."""


def _quantise_blocks(source, adapter: ModelAdapter, inputs, plan: BitPlan, tally: _Tally, ckpt,
                     start: int, s: QuantizeSettings) -> None:
    """The block loop both flows share: per block from ``start`` on, load it, quantise it
    (:func:`_quantise_block`), store it, checkpoint it, release it."""
    n = len(source)
    bar = progress_bar(n, f"quantising ({s.method})", s.progress, "block")
    bar.update(start)
    for bi in range(start, n):
        block = source.load(bi)
        before = (len(tally.layers), tally.original_bytes, tally.quantized_bytes)
        _quantise_block(block, bi, adapter, inputs, plan, tally, s)
        stored = source.store(bi, block)
        if ckpt is not None:
            ckpt.save_block(bi, block, [asdict(r) for r in tally.layers[before[0]:]],
                            {"original_bytes": tally.original_bytes - before[1],
                             "quantized_bytes": tally.quantized_bytes - before[2]},
                            inputs.hidden if bi + 1 < n else None, stored=stored)
        del block  # before the next one is loaded
        source.release(bi)
        bar.update()
        if s.on_block_done is not None:
            s.on_block_done(bi)
    bar.close()
    if ckpt is not None:
        ckpt.finish()


def _calibrate(adapter: ModelAdapter, s: QuantizeSettings):
    """Calibration token ids ``[n, seq_len]`` (shape defaults by model kind) and the batch size
    (about 1024 tokens per batch: few, large ops, short sequences too)."""
    n_samples, seq_len, align = default_calibration_shape(adapter.kind, s.n_samples, s.seq_len,
                                                          s.align)
    ids = calibration_ids(s.calib, s.tokenizer, n_samples, seq_len, s.seed, align)
    batch_size = s.batch_size if s.batch_size is not None else max(1, 1024 // int(ids.shape[1]))
    check_ranks_agree(settings=s.recorded(), calibration_data=_ids_fingerprint(ids))
    return ids, batch_size


def _check_lorc_rank(adapter: ModelAdapter, blocks, rank: int) -> None:
    """Refuses a LoRC rank too large for some linear before any work, not at that layer."""
    too_small = [(f"{adapter.block_name(bi)}.{nm}", list(weight_oi(m).shape))
                 for bi, b in enumerate(blocks) for nm, m in adapter.linears(b).items()
                 if rank > min(weight_oi(m).shape)]
    if too_small:
        raise ValueError(f"lorc_rank must be in [0, min(out_features, in_features)] for every "
                         f"linear, got {rank}; {too_small[0][0]} is {too_small[0][1]}")


def _check_finite_weights(adapter: ModelAdapter, blocks) -> None:
    """Refuses a weight holding NaN or Inf before any work, naming the layer."""
    for bi, b in enumerate(blocks):
        for nm, m in adapter.linears(b).items():
            w = weight_oi(m)
            if not bool(torch.isfinite(w).all()):
                bad = int((~torch.isfinite(w)).sum())
                raise ValueError(f"{adapter.block_name(bi)}.{nm}: the weight holds {bad} NaN/Inf "
                                 f"value(s); refusing to quantise it")


def _check_finite_inputs(hidden, adapter: ModelAdapter, bi: int) -> None:
    """Stops the run when a block's calibration inputs (the previous block's outputs) are not
    finite: every statistic built on them (Hessians, AdaDim errors) would be NaN."""
    for h in hidden:
        if h.is_floating_point() and not bool(torch.isfinite(h).all()):
            src = "the embeddings" if bi == 0 else f"the output of {adapter.block_name(bi - 1)}"
            raise ValueError(f"{adapter.block_name(bi)}: its calibration inputs ({src}) hold NaN/Inf; "
                             "stopping (check the model's weights and dtype, e.g. fp16 overflow)")


@dataclass
class _Scoring:
    scores: Optional[List[float]] = None
    importance: Optional[str] = None
    order: Optional[List[int]] = None  # blocks least important first (order allocation)
    traces: object = None              # HessianTraces (knapsack with importance="hessian")


def _score_importance(model, adapter, blocks, ids, batch_size, s: QuantizeSettings,
                      scores_of=None) -> _Scoring:
    """Block importance where the allocation needs it (or reports it): none for a whole number
    of bits under ``allocation="order"``; ``block_order`` replaces it when given.
    ``scores_of(importance)``: the block scores (default :func:`_importance_scores` on the
    model in memory; the out-of-core flow streams the blocks)."""
    if scores_of is None:
        def scores_of(importance):
            return _importance_scores(importance, model, ids, adapter, batch_size, s.device,
                                      s.seed, s.progress)
    if s.allocation == "knapsack":
        if s.importance == "hessian":  # HAWQ-V3: per-linear average traces (and block scores)
            traces = hessian_traces(model, ids, adapter, batch_size=batch_size, device=s.device,
                                    seed=s.seed, progress=s.progress)
            return _Scoring(traces.block, s.importance, traces=traces)
        scores = None
        if s.importance is not None:  # only reported (and plotted)
            scores = scores_of(s.importance)
        return _Scoring(scores, s.importance)
    if _whole_bits(s):
        return _Scoring()
    if s.block_order is not None:
        order = [int(i) for i in s.block_order]
        if sorted(order) != list(range(len(blocks))):
            raise ValueError(f"block_order must be a permutation of 0..{len(blocks) - 1}, "
                             f"got {list(s.block_order)}")
        return _Scoring(importance="given order", order=order)
    scores = scores_of(s.importance)
    return _Scoring(scores, s.importance, order=importance_order(scores, s.importance))


def _whole_bits(s: QuantizeSettings) -> bool:
    return float(s.bits).is_integer() and s.high_bits is None and s.low_bits is None


def _allocate_bits(model, adapter, blocks, ids, batch_size, scoring: _Scoring,
                   s: QuantizeSettings) -> BitPlan:
    params = [sum(weight_oi(m).numel() for m in adapter.linears(b).values()) for b in blocks]
    if s.allocation == "knapsack":
        if scoring.traces is not None:
            names, lparams, errs = hawq_layer_errors(model, scoring.traces.linear, adapter,
                                                     s.widths_or_default, s.group_size, s.axis,
                                                     s.symmetric, s.scale_dtype)
        else:  # the measured RTN output error
            names, lparams, errs = measure_layer_errors(model, ids, adapter, s.widths_or_default,
                                                        s.group_size, s.axis, s.symmetric,
                                                        s.scale_dtype, batch_size, s.device)
        ks = allocate_knapsack(lparams, errs, float(s.bits), s.widths_or_default)
        block_bits = []
        for bi in range(len(blocks)):
            mine = [(b, p) for nm, b, p in zip(names, ks.bits, lparams)
                    if nm.startswith(adapter.block_name(bi) + ".")]
            same = len({b for b, _ in mine}) == 1
            block_bits.append(mine[0][0] if same else sum(b * p for b, p in mine) / sum(p for _, p in mine))
        return BitPlan(block_bits, dict(zip(names, ks.bits)), [], ks.average, params,
                       scoring.scores, scoring.importance)
    if _whole_bits(s):
        QuantSpec(bits=int(s.bits))  # validates the width
        return BitPlan([int(s.bits)] * len(blocks), {}, [], float(s.bits), params)
    alloc = allocate_bits(params, scoring.order, float(s.bits), s.high_bits, s.low_bits)
    return BitPlan(alloc.bits, {}, alloc.demoted, alloc.average, params, scoring.scores,
                   scoring.importance)


def _open_checkpoints(model, blocks, ids, plan: BitPlan, inputs, tally: _Tally,
                      s: QuantizeSettings, model_fp: Optional[str] = None, restore: bool = True):
    """Per-block checkpoints (flows/checkpoint.py), or ``(None, 0)`` without ``checkpoint_dir``;
    on resume the finished blocks are restored into ``blocks`` (unless ``restore`` is False: the
    out-of-core flow's finished blocks are already in its output shards) and ``tally``.
    ``model_fp``: the model's fingerprint when it cannot be hashed from memory. Returns the
    checkpoints and the first block still to do."""
    if s.checkpoint_dir is None:
        return None, 0
    if world_size() > 1:
        raise ValueError("checkpoint_dir (--checkpoint-dir, --resume) is not supported in a "
                         "distributed run: each rank holds only its share of the block inputs")
    from .checkpoint import BlockCheckpoints, model_fingerprint
    ckpt = BlockCheckpoints(s.checkpoint_dir, s.recorded(), model_fp or model_fingerprint(model),
                            _ids_fingerprint(ids), len(blocks), plan.block_bits)
    start, hidden, done = ckpt.begin(s.resume)
    for entry in done:
        if restore:
            ckpt.restore_block(blocks[entry["block"]], entry)
        tally.layers += [LayerReport(**r) for r in entry["reports"]]
        tally.original_bytes += entry["extra"]["original_bytes"]
        tally.quantized_bytes += entry["extra"]["quantized_bytes"]
    if hidden is not None:
        inputs.hidden = hidden
    if s.verbose and start:
        print(f"  resumed from {s.checkpoint_dir}: blocks 0..{start - 1} restored")
    return ckpt, start


def _quantise_block(block, bi: int, adapter: ModelAdapter, inputs, plan: BitPlan, tally: _Tally,
                    s: QuantizeSettings) -> None:
    """One block on its device: AWQ scales (if asked), capture, per linear choose the axis and
    quantise, pack and swap; then the quantised block's outputs become the next inputs."""
    home = next(block.parameters()).device
    dev = torch.device(s.device) if s.device is not None else home
    block.to(dev)
    lins = adapter.linears(block)
    if s.method.startswith("awq") and s.axis != "ic":  # per-IC groups are scale-invariant
        tally.awq_groups += _awq_block(block, bi, adapter, inputs, dev, s.group_size, s.symmetric,
                                       s.scale_dtype, plan.block_bits, plan.layer_bits, s.clip)
    _check_finite_inputs(inputs.hidden, adapter, bi)
    # rotate="auto" measures its candidates like axis="auto" does
    hess, cap = _capture(block, lins, adapter, inputs, dev, "auto" if s.rotate == "auto" else s.axis)
    for h in hess.values():  # distributed: the Hessians of all ranks' calibration batches
        h.H, h.n = all_reduce_sum(h.H, h.n)
    chosen = {}
    names = list(lins)
    step = world_size()  # distributed: one linear per rank at a time, each by its owner
    for first in range(0, len(names), step):
        group = names[first:first + step]
        for name, (report, chosen[name]) in _quantise_linears(block, bi, group, lins, adapter,
                                                              hess, cap, plan, dev, s).items():
            # only the packed tensors are swapped in: drop the unpacked codes and the
            # dequantised weight now, not after the block (a block's worth of memory)
            chosen[name].codes = chosen[name].weight = None
            tally.layers.append(report)
            if s.verbose:
                print(f"  {report.name}: W{report.bits} {report.axis} rel.err "
                      f"{report.rel_error:.4f} {report.axis_mse if report.axis_mse else ''}")
    for name, res in chosen.items():
        orig, quant = _swap(block, name, lins[name], res)
        tally.original_bytes += orig
        tally.quantized_bytes += quant
    del hess, cap
    inputs.hidden = run_block(block, inputs, dev)
    block.to(home)


def _capture(block, lins, adapter: ModelAdapter, inputs, dev, axis: str):
    """Runs the full-precision block on its inputs, collecting each linear's input Hessian and,
    for ``axis="auto"``, the inputs and outputs of the AdaDim measurement modules."""
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
    return hess, cap


def _quantise_linears(block, bi: int, names, lins, adapter: ModelAdapter, hess, cap,
                      plan: BitPlan, dev, s: QuantizeSettings):
    """Quantises the linears ``names`` of the block: the candidate axes, the one with the lower
    output error at the adapter's measurement point (AdaDim), then ``method`` on it. Each
    linear's quantisers run on one rank (all of them in one process, flows/distributed.py);
    the measurement runs on every rank's calibration batches. Returns ``{name: (report entry,
    chosen result)}``."""
    sel = s.method if s.select_with == "applied" else "rtn"

    def weight(name):
        return weight_oi(lins[name]).detach().float().clone()

    def full(name):
        return f"{adapter.block_name(bi)}.{name}"

    def candidates(name):
        W = weight(name)
        n, k = W.shape
        if not bool(torch.isfinite(hess[name].H).all()):
            raise ValueError(f"{full(name)}: its calibration inputs hold NaN/Inf (inside "
                             f"{adapter.block_name(bi)}); stopping (check the model's weights and "
                             "dtype, e.g. fp16 overflow)")
        specs = _candidate_specs(s.axis, plan.width(full(name), bi),
                                 s.group_size, s.symmetric, s.scale_dtype, n, k)
        H = hess[name].hessian()
        try:
            results = _rotation_candidates(specs, W, H, sel, s, full(name))
            if s.rotate != "hadamard" or not results:  # (hadamard with no block fitting K: unrotated)
                results = {**{sp.axis: _quantise_side(W, sp, sel, H, s.act_order, s.side, s.clip)
                              for sp in specs}, **results}
            return results
        except ValueError as e:  # e.g. a scale overflowing scale_dtype: say which layer
            raise ValueError(f"{full(name)}: {e}") from None

    results = compute_by_owner(names, candidates, dev)
    picked = {}
    for name in names:
        point = adapter.measure_point(name)
        mse = {}
        if len(results[name]) > 1:
            mse = _axis_errors(results[name], weight(name), lins[name], block, name, point,
                               hess[name], hess[name].H.float(), cap)
            best = min(mse, key=lambda a: (mse[a], a != "oc"))
        else:
            best = next(iter(results[name]))
        picked[name] = (best, mse, point)
    if sel != s.method:  # axis chosen with RTN (AdaDim paper's recipe), then quantised
        final = compute_by_owner(names, lambda name: _quantise_candidate(
            weight(name), results[name][picked[name][0]].spec, s.method, hess[name].hessian(), s), dev)
    else:
        final = {name: results[name][picked[name][0]] for name in names}
    out = {}
    for name in names:
        best, mse, point = picked[name]
        res, W, Hraw = final[name], weight(name), hess[name].H.float()  # Hraw: Σ xxᵀ
        n, k = W.shape
        num = _quad(W - res.weight, Hraw).clamp_min(0).sqrt()
        den = _quad(W, Hraw).clamp_min(1e-30).sqrt()
        rel = (num / den).item()
        if s.verbose and res.damp is not None and res.damp > 0.01:
            print(f"  {full(name)}: Hessian not positive definite, dampening raised to {res.damp:g}")
        out[name] = (LayerReport(full(name), bi, res.spec.bits, res.spec.axis, s.group_size, s.method,
                                 k, n, rel, mse, point, gptq_damp=res.damp, rotation=res.spec.rotation),
                     res)
    return out


def _check_rotate(s: QuantizeSettings) -> None:
    from .rotation import ROTATE_CHOICES
    if s.rotate not in ROTATE_CHOICES:
        raise ValueError(f"rotate must be one of {ROTATE_CHOICES}, got {s.rotate!r}")
    b = s.rotate_block
    if isinstance(b, bool) or not isinstance(b, int) or b < 16 or b & (b - 1):
        raise ValueError(f"rotate_block must be a power of two >= 16, got {b!r}")
    if s.rotate != "none" and (s.outliers or s.lorc_rank):
        raise ValueError("rotate is not supported together with outliers/lorc_rank (the side paths "
                         "act on the unrotated input)")


def _rotation_candidates(specs: List[QuantSpec], W, H, method: str, s: QuantizeSettings, full: str):
    """{key: result} of the rotated candidates of ``specs`` (keys "oc+hadamard", ...); empty for
    rotate="none" or when no rotation block fits K."""
    from .rotation import layer_seed, rotated_spec
    if s.rotate == "none":
        return {}
    out = {}
    for sp in specs:
        rs = rotated_spec(sp, W.shape[1], s.rotate_block, layer_seed(s.seed, full))
        if rs is not None:
            out[f"{sp.axis}+hadamard"] = _quantise_candidate(W, rs, method, H, s)
    return out


def _quantise_candidate(W, spec: QuantSpec, method: str, H, s: QuantizeSettings):
    """One candidate's quantisation, in the rotated basis when ``spec`` has a rotation."""
    if spec.rotated:
        from .rotation import quantise_rotated
        return quantise_rotated(W, H, spec, lambda w_, sp_, h_: _quantise(w_, sp_, method, h_, s.act_order, s.clip))
    return _quantise_side(W, spec, method, H, s.act_order, s.side, s.clip)


def _axis_errors(results: Dict[str, QuantResult], W, m, block, name: str, point: str, hess,
                 Hraw, cap) -> Dict[str, float]:
    """{axis: MSE at the measurement point} of each candidate: from the Hessian when the point
    is the linear itself, else by running the measurement module with the candidate's weight."""
    n = W.shape[0]
    mse = {}
    for a, res in results.items():
        D = W - res.weight
        if point == name:
            mse[a] = (_quad(D, Hraw) / (hess.n * n)).item()
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
            err, cnt = all_reduce_sum(err, cnt)  # distributed: over all ranks' batches
            mse[a] = err / cnt
        finally:
            view.copy_(keep)
    return mse


def _swap(block, name: str, m, res: QuantResult):
    """Packs ``res`` into a ``QuantLinear`` and swaps it in for ``m``; returns (bytes of the
    float weight replaced, bytes stored for it)."""
    bias = None if getattr(m, "bias", None) is None else m.bias.detach()
    side_paths = getattr(res, "side", None)
    q = QuantLinear.from_quantized(res.qweight, res.scales, res.zeros, res.spec, bias,
                                   **(side_paths.kwargs() if side_paths else {}),
                                   rot_signs=getattr(res, "rot_signs", None))
    q._lp_conv1d = is_conv1d(m)  # recorded in the saved config
    quant = _bytes(res.qweight) + _bytes(res.scales) + _bytes(res.zeros)
    quant += side_paths.nbytes() if side_paths else 0
    orig = _bytes(m.weight)
    _set_module(block, name, q)
    return orig, quant


def _report(model, adapter: ModelAdapter, plan: BitPlan, tally: _Tally, ids, started: float,
            s: QuantizeSettings, filled: bool = False) -> QuantReport:
    """The run's report; ``filled``: the layers' ``effective_bits`` are already set (the
    out-of-core flow sets them per block, its model holds no quantised layers)."""
    from .report import fill_effective_bits
    if filled:
        w = [lay.in_features * lay.out_features for lay in tally.layers]
        eff = sum(lay.effective_bits * n for lay, n in zip(tally.layers, w)) / max(sum(w), 1)
    else:
        eff = fill_effective_bits(model, tally.layers)
    return QuantReport(
        model_type=adapter.config.model_type, method=s.method, bits_target=float(s.bits),
        group_size=s.group_size, axis=s.axis, importance=plan.importance,
        block_bits=plan.block_bits, block_scores=plan.scores, demoted=plan.demoted,
        average_bits=plan.average, layers=tally.layers, n_samples=int(ids.shape[0]),
        seq_len=int(ids.shape[1]), time_s=time.perf_counter() - started,
        quantized_params=int(sum(plan.params)),
        original_bytes=tally.original_bytes, quantized_bytes=tally.quantized_bytes,
        effective_bits=eff, awq_groups=tally.awq_groups, allocation=s.allocation)
