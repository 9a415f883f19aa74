"""AWQ (Lin et al., activation-aware weight quantisation): per scaling group, input-channel scales
``s`` that protect the weights seeing large activations, folded into the preceding module so the
float model is unchanged.

For a scaling group (``prev`` → ``linears``, :class:`~.models.ScalingGroup`) the linears compute
``W x``; with ``s > 0`` per input channel, ``W x = (W·diag(s)) (x / s)``. The factor ``1/s`` is
folded into ``prev`` -- a norm's weight and bias (``fold="norm"``) or the output rows and bias of
a previous linear (``fold="linear"``, valid when what lies between is linear in it: attention's
``softmax(·)·V``, Llama's ``act(gate)·up``) -- and ``diag(s)`` into the linears' columns, so the
folded model computes the same function (exactly, up to float rounding). Quantising
``W·diag(s)`` instead of ``W`` shrinks the relative rounding error of the columns whose inputs
are large.

The search: ``s = mean|x|^α`` over the calibration tokens (normalised to a geometric mean of 1),
for ``α`` on a grid in ``[0, 1]`` (``α = 0`` is ``s = 1``, plain quantisation); each candidate
quantises the group's linears with the quantiser that will be applied (RTN with the clipping
search of :mod:`.quantizers`: AWQ's clip search, weighted by the Hessian diagonal) and measures
the squared error of the output of the group's ``inspect`` module (e.g. the whole attention for
q/k/v) against the float output on the captured calibration inputs; the ``α`` with the lowest
error wins, so on the calibration data the result is never worse than no scaling.

Not done: ``fold="activation"`` groups (s⁻¹ after a GELU, as in GPT-2 ``mlp.act`` → ``c_proj``
or BERT's intermediate activation → ``output.dense``) need an extra scaling module in the model,
which a saved checkpoint's config does not describe; those groups are skipped (reported).
Per-IC groups (AdaDim's ``ic`` axis) are invariant to input-channel scaling -- each column has
its own scales -- so AWQ is searched with per-OC groups and only changes per-OC results.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from torch import nn

from ..spec import QuantSpec
from .calibration import BlockInputs, run_block, to_device
from .distributed import all_reduce_sum
from .models import ModelAdapter, ScalingGroup, get_submodule, weight_oi
from .quantizers import rtn

__all__ = ["ALPHA_GRID", "AWQGroupResult", "fold_scales", "awq_block", "group_output_error"]

#: α values of the scale search (0 = no scaling)
ALPHA_GRID = tuple(i / 20 for i in range(21))


@dataclass
class AWQGroupResult:
    prev: str
    linears: tuple
    fold: str
    alpha: Optional[float]            # None: skipped
    error: Dict[str, float] = field(default_factory=dict)  # "none" (α = 0) and "best" MSE
    skipped: str = ""


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def fold_scales(block: nn.Module, group: ScalingGroup, s: torch.Tensor) -> None:
    """Folds per-input-channel scales ``s [K]`` of ``group`` into ``block`` in place: the
    linears' columns are multiplied by ``s``, ``prev`` divided by it (see the module doc)."""
    if group.fold not in ("norm", "linear"):
        raise ValueError(f"fold_scales: fold {group.fold!r} of {group.prev} is not supported "
                         "(only 'norm' and 'linear' keep the model's structure)")
    s = s.detach()
    if not torch.isfinite(s).all() or (s <= 0).any():
        raise ValueError("fold_scales: scales must be finite and positive")
    prev = get_submodule(block, group.prev)
    if group.fold == "norm":
        w = getattr(prev, "weight", None)
        if w is None or w.dim() != 1 or w.numel() != s.numel():
            raise ValueError(f"fold_scales: {group.prev} has no weight of {s.numel()} channels")
        w.data.div_(s.to(w.dtype))
        b = getattr(prev, "bias", None)
        if b is not None:
            b.data.div_(s.to(b.dtype))
    else:
        w = weight_oi(prev)  # [out, in] view: the output rows are the next linears' inputs
        if w.shape[0] != s.numel():
            raise ValueError(f"fold_scales: {group.prev} has {w.shape[0]} outputs, scales {s.numel()}")
        w.div_(s.to(w.dtype)[:, None])
        b = getattr(prev, "bias", None)
        if b is not None:
            b.data.div_(s.to(b.dtype))
    for name in group.linears:
        w = weight_oi(get_submodule(block, name))
        if w.shape[1] != s.numel():
            raise ValueError(f"fold_scales: {name} has {w.shape[1]} inputs, scales {s.numel()}")
        w.mul_(s.to(w.dtype)[None, :])


class _Capture:
    """Inputs of a group's first linear (its activation statistics and Hessian diagonal) and the
    inputs/outputs of its inspect module, from one run of the float block."""

    def __init__(self):
        self.abs_sum = None
        self.sq_sum = None
        self.n = 0
        self.args, self.kwargs, self.out = [], [], []

    def add_x(self, x):
        x = x.detach().reshape(-1, x.shape[-1]).double()
        a, q = x.abs().sum(0), (x * x).sum(0)
        self.abs_sum = a if self.abs_sum is None else self.abs_sum + a
        self.sq_sum = q if self.sq_sum is None else self.sq_sum + q
        self.n += x.shape[0]


def group_output_error(block: nn.Module, group: ScalingGroup, cap: "_Capture", weights) -> float:
    """Mean squared error of the inspect module's output with the group's linears set to
    ``weights`` (``{name: [out, in]}``) against the captured float outputs. Restores the
    weights."""
    mod = get_submodule(block, group.inspect)
    keep = {n: weight_oi(get_submodule(block, n)).clone() for n in group.linears}
    try:
        for n, w in weights.items():
            weight_oi(get_submodule(block, n)).copy_(w)
        err, cnt = 0.0, 0
        for a, kw, ref in zip(cap.args, cap.kwargs, cap.out):
            y = _first(mod(*a, **kw))
            err += (y.double() - ref.double()).pow(2).sum().item()
            cnt += ref.numel()
        err, cnt = all_reduce_sum(err, cnt)  # distributed: over all ranks' batches
        return err / max(cnt, 1)
    finally:
        for n, w in keep.items():
            weight_oi(get_submodule(block, n)).copy_(w)


@torch.no_grad()
def awq_block(block: nn.Module, adapter: ModelAdapter, inputs: BlockInputs, spec_for,
              device=None, grid=ALPHA_GRID, max_batches: Optional[int] = None,
              clip: bool = True) -> List[AWQGroupResult]:
    """Searches and folds the AWQ scales of every scaling group of ``block`` (in place).

    ``inputs``: the block's calibration inputs; ``spec_for(name, out, in)``: the
    :class:`QuantSpec` the search quantises linear ``name`` with (RTN, ``clip`` search);
    ``max_batches``: use only the first batches of ``inputs`` for the search."""
    device = device or next(block.parameters()).device
    groups = adapter.scaling_groups(block)
    usable = [g for g in groups if g.fold in ("norm", "linear")]
    results = [AWQGroupResult(g.prev, g.linears, g.fold, None,
                              skipped=f"fold {g.fold!r} needs a scaling module after the activation")
               for g in groups if g not in usable]
    if not usable:
        return results
    n_b = len(inputs) if max_batches is None else min(len(inputs), max_batches)
    sub = BlockInputs(inputs.hidden[:n_b], inputs.args[:n_b], inputs.kwargs[:n_b])
    caps = {g: _Capture() for g in usable}
    handles = []
    for g in usable:
        lin0 = get_submodule(block, g.linears[0])
        handles.append(lin0.register_forward_pre_hook(lambda m, a, _g=g: caps[_g].add_x(a[0])))
        if g.inspect != "":
            mod = get_submodule(block, g.inspect)
            handles.append(mod.register_forward_pre_hook(
                lambda m, a, kw, _g=g: (caps[_g].args.append(a), caps[_g].kwargs.append(kw),
                                        None)[-1], with_kwargs=True))
            handles.append(mod.register_forward_hook(
                lambda m, a, out, _g=g: caps[_g].out.append(_first(out).detach())))
    try:
        outs = run_block(block, sub, device, storage=device)
    finally:
        for h in handles:
            h.remove()
    for g in usable:
        if g.inspect == "":  # the whole block: its inputs and outputs
            c = caps[g]
            c.args = [(h.to(device),) + tuple(to_device(a, device)) for h, a in zip(sub.hidden, sub.args)]
            c.kwargs = [to_device(kw, device) for kw in sub.kwargs]
            c.out = outs

    scales = {}
    for g in usable:
        c = caps[g]
        c.abs_sum, c.sq_sum, c.n = all_reduce_sum(c.abs_sum, c.sq_sum, c.n)  # over all ranks
        mean_abs = (c.abs_sum / max(c.n, 1)).float().clamp_min(1e-8)
        hdiag = (2.0 * c.sq_sum / max(c.n, 1)).float()
        ws = {n: weight_oi(get_submodule(block, n)).detach().float().clone() for n in g.linears}
        specs = {n: spec_for(n, *w.shape) for n, w in ws.items()}
        errs = {}
        for alpha in grid:
            s = mean_abs.pow(alpha)
            s = s / (s.max() * s.min()).sqrt()  # scale-free: geometric middle of the range at 1
            cand = {}
            for n, w in ws.items():
                q = rtn(w * s[None, :], specs[n], clip=clip, hdiag=hdiag / (s * s) if clip else None)
                cand[n] = (q.weight / s[None, :]).to(weight_oi(get_submodule(block, n)).dtype)
            errs[alpha] = group_output_error(block, g, c, cand)
        best = min(errs, key=lambda a: (errs[a], a))
        results.append(AWQGroupResult(g.prev, g.linears, g.fold, best,
                                      {"none": errs[grid[0]] if grid[0] == 0 else float("nan"),
                                       "best": errs[best]}))
        if best != 0:
            s = mean_abs.pow(best)
            scales[g] = s / (s.max() * s.min()).sqrt()
    for g, s in scales.items():  # folding does not change the float block, so order is free
        fold_scales(block, g, s)
    return results
