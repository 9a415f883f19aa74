"""Bit allocation to a fractional average (layer-wise quantisation).

Two allocators, both meeting the target as ``Σ bits_i·params_i ≤ target · Σ params_i`` (the
parameter-weighted average *code* bits; scales, zeros and side paths are not counted -- the
report's *effective* bits count them). Equality meets the target; the comparison is exact
(rational arithmetic on the float target), so the average is never above it.

**Order** (:func:`allocate_bits`). Every block starts at the high bit width; blocks are demoted to the low width in order of
importance, least important first, and demotion stops at the first point where the
parameter-weighted average *code* bits (Σ bits_i·params_i / Σ params_i over the quantised
linears; scale/zero overhead not counted) is ``≤ target``. Since the average only decreases
along that order, this is the allocation in importance order closest to the target from below.

**Knapsack** (:func:`allocate_knapsack`). Each item (a linear) picks a width from a set
(default 2, 3, 4, 8) to minimise the sum of measured errors ``Σ err_i(bits_i)`` under the budget
-- a multiple-choice knapsack, solved exactly by dynamic programming over the integer budget in
units of ``gcd(params)`` (transformer linears share large factors, so the budget is small: 72
units for MiniLM's 36 linears). Only if ``items × budget`` exceeds ``max_cells`` are the item
sizes rounded *up* to a coarser unit: the result still never exceeds the target, but is then
optimal only for the coarsened sizes (``exact=False``). Ties: among widths giving the same total
error at a DP step the lower width is kept. :func:`measure_layer_errors` gives the errors the
flow uses: the mean squared output error ``‖X(W − Q_b(W))ᵀ‖²/T`` of RTN at each width ``b`` on
the calibration inputs ``X`` (``T`` tokens) of the full-precision model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from functools import reduce
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..spec import BITS

__all__ = ["Allocation", "allocate_bits", "bit_pair", "KnapsackAllocation", "allocate_knapsack",
           "measure_layer_errors", "hawq_layer_errors"]


@dataclass
class Allocation:
    bits: List[int]          # per block
    average: float           # parameter-weighted average code bits
    demoted: List[int]       # demoted blocks, in demotion order
    high: int
    low: int
    target: float


def bit_pair(target: float, high: Optional[int] = None, low: Optional[int] = None):
    """The (high, low) widths around a target: ceil/floor by default (both must be kernel
    widths: 2, 3, 4, 8)."""
    if high is None:
        high = int(math.ceil(target))
    if low is None:
        low = int(math.floor(target))
    for b in (high, low):
        if b not in BITS:
            raise ValueError(f"bits target {target}: width {b} is not supported (widths: {BITS}); "
                             "pass high/low explicitly")
    if low > high:
        raise ValueError(f"low width {low} > high width {high}")
    return high, low


def allocate_bits(params: Sequence[int], order: Sequence[int], target: float,
                  high: Optional[int] = None, low: Optional[int] = None) -> Allocation:
    """``params[i]``: quantised parameters of block ``i``; ``order``: blocks least important
    first (a permutation). Raises ValueError if the target cannot be reached (below ``low``)."""
    n = len(params)
    if sorted(order) != list(range(n)):
        raise ValueError(f"order must be a permutation of range({n}), got {list(order)}")
    if n == 0 or sum(params) <= 0:
        raise ValueError("nothing to allocate: no parameters")
    high, low = bit_pair(target, high, low)
    total = float(sum(params))
    bits = [high] * n
    avg = lambda: sum(b * p for b, p in zip(bits, params)) / total  # noqa: E731
    if low * total > target * total + 1e-9 * total:
        raise ValueError(f"average of {target} bits is unreachable: demoting every layer from "
                         f"{high} to {low} bits still averages {low}")
    demoted = []
    eps = 1e-12
    for i in order:
        if avg() <= target + eps:
            break
        bits[i] = low
        demoted.append(i)
    return Allocation(bits, avg(), demoted, high, low, float(target))


@dataclass
class KnapsackAllocation:
    bits: List[int]          # per item
    average: float           # parameter-weighted average code bits
    error: float             # Σ err_i(bits_i)
    target: float
    widths: Tuple[int, ...]
    exact: bool              # DP on the exact budget (True) or on item sizes rounded up


def _check_widths(widths) -> Tuple[int, ...]:
    ws = tuple(sorted(set(int(w) for w in widths)))
    if not ws or any(w not in BITS for w in ws):
        raise ValueError(f"widths must be a non-empty subset of {BITS}, got {tuple(widths)}")
    return ws


def allocate_knapsack(params: Sequence[int], errors: Sequence[Mapping[int, float]], target: float,
                      widths: Sequence[int] = BITS, max_cells: int = 20_000_000) -> KnapsackAllocation:
    """Minimises ``Σ errors[i][bits_i]`` over ``bits_i ∈ widths`` subject to
    ``Σ bits_i·params[i] ≤ target·Σ params`` (see the module docstring). ``errors[i]`` maps each
    width to item ``i``'s measured error. Raises ValueError naming ``bits`` if even the lowest
    width exceeds the target."""
    ws = _check_widths(widths)
    n = len(params)
    if n == 0 or len(errors) != n:
        raise ValueError(f"need one error table per item: {n} params, {len(errors)} error tables")
    if any(int(p) != p or p <= 0 for p in params):
        raise ValueError(f"params must be positive integers, got {list(params)}")
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not math.isfinite(target):
        raise ValueError(f"bits target must be a finite number, got {target!r}")
    err = np.empty((n, len(ws)), dtype=np.float64)
    for i, e in enumerate(errors):
        missing = [w for w in ws if w not in e]
        if missing:
            raise ValueError(f"errors[{i}] has no entry for widths {missing}")
        err[i] = [float(e[w]) for w in ws]
    if not np.isfinite(err).all():
        raise ValueError("errors must be finite")
    params = [int(p) for p in params]
    total = sum(params)
    lo, hi = ws[0], ws[-1]
    if Fraction(lo * total) > Fraction(target) * total:
        raise ValueError(f"bits={target} is unreachable with widths {ws}: every layer at the lowest "
                         f"width {lo} already averages {lo} code bits")
    g = reduce(math.gcd, params)
    units = [p // g for p in params]
    # budget beyond every item at the lowest width, in units (exact: Σ extra·g ≤ target·N − lo·N)
    extra = int(math.floor((Fraction(target) - lo) * sum(units)))
    extra = min(extra, (hi - lo) * sum(units))
    exact = True
    scale = 1
    if n * (extra + 1) > max_cells:  # coarsen: sizes rounded up keep every solution feasible
        scale = -(-(n * (extra + 1)) // max_cells)
        units = [-(-u // scale) for u in units]
        extra = extra // scale
        exact = False
    dp = np.zeros(extra + 1)  # min error of the items so far with extra budget <= j
    choice = np.zeros((n, extra + 1), dtype=np.int8)
    for i in range(n):
        new = np.full(extra + 1, np.inf)
        for wi, w in enumerate(ws):  # ascending: on equal totals the lower width stays
            cost = (w - lo) * units[i]
            if cost > extra:
                break
            cand = np.full(extra + 1, np.inf)
            cand[cost:] = dp[:extra + 1 - cost] + err[i, wi]
            better = cand < new
            new[better] = cand[better]
            choice[i, better] = wi
        dp = new
    bits = [0] * n
    j = extra
    for i in reversed(range(n)):
        wi = int(choice[i, j])
        bits[i] = ws[wi]
        j -= (ws[wi] - lo) * units[i]
    assert j >= 0 and sum(b * p for b, p in zip(bits, params)) <= Fraction(target) * total
    return KnapsackAllocation(bits, sum(b * p for b, p in zip(bits, params)) / total,
                              float(sum(err[i, ws.index(b)] for i, b in enumerate(bits))),
                              float(target), ws, exact)


def _rtn_error_table(W, widths, axes, group_size, symmetric, scale_dtype, error_of, name):
    """``{width: min over axes of error_of(W − RTN(W))}`` for one ``[out, in]`` weight; axes
    whose groups do not fit the shape are skipped (an error names the layer if none fits)."""
    from ..spec import QuantSpec
    from .quantizers import rtn

    table: Dict[int, float] = {}
    for w in widths:
        best = math.inf
        for a in axes:
            spec = QuantSpec(bits=w, group_size=group_size, axis=a, symmetric=symmetric,
                             scale_dtype=scale_dtype)
            try:
                spec.check_shape(*W.shape)
            except ValueError:
                continue
            best = min(best, error_of(W - rtn(W, spec).weight))
        if best == math.inf:
            raise ValueError(f"{name}: no axis in {axes} fits a {list(W.shape)} weight with "
                             f"group_size {group_size}")
        table[w] = best
    return table


def measure_layer_errors(model, input_ids, adapter=None, widths: Sequence[int] = BITS,
                         group_size: int = 128, axis: str = "auto", symmetric: bool = False,
                         scale_dtype=None, batch_size: int = 8, device=None):
    """Per linear of every block (full-precision model, one block on ``device`` at a time):
    ``{width: ‖X(W − Q(W))ᵀ‖²/T}`` with ``Q`` RTN at that width (``axis="auto"``: the lower of
    the two axes), ``X`` the linear's calibration inputs over ``T`` tokens. Returns
    ``(names, params, errors)`` with full module names. The model is not modified."""
    import torch

    from .calibration import capture_block_inputs, run_block
    from .models import adapter_for, weight_oi
    from .quantizers import HessianAccumulator

    ws = _check_widths(widths)
    scale_dtype = scale_dtype or torch.float16
    adapter = adapter or adapter_for(model)
    axes = ["oc", "ic"] if axis == "auto" else [axis]
    with torch.no_grad():
        inputs = capture_block_inputs(model, input_ids, adapter, batch_size, device)
        names, params, errors = [], [], []
        for bi, block in enumerate(adapter.blocks()):
            home = next(block.parameters()).device
            dev = torch.device(device) if device is not None else home
            block.to(dev)
            lins = adapter.linears(block)
            acc = {n: HessianAccumulator(weight_oi(m).shape[1], dev) for n, m in lins.items()}
            hooks = [m.register_forward_hook(lambda mod, a, out, _n=n: acc[_n].add(a[0]))
                     for n, m in lins.items()]
            try:
                outs = run_block(block, inputs, dev)
            finally:
                for h in hooks:
                    h.remove()
            for n, m in lins.items():
                W = weight_oi(m).detach().float()
                H, tokens = acc[n].H.float(), acc[n].n
                table = _rtn_error_table(
                    W, ws, axes, group_size, symmetric, scale_dtype,
                    lambda D, H=H, tokens=tokens: ((D @ H) * D).sum().clamp_min(0).item() / tokens,
                    f"{adapter.block_name(bi)}.{n}")
                names.append(f"{adapter.block_name(bi)}.{n}")
                params.append(W.numel())
                errors.append(table)
            inputs.hidden = outs
            block.to(home)
    return names, params, errors


def hawq_layer_errors(model, traces: Mapping[str, float], adapter=None, widths: Sequence[int] = BITS,
                      group_size: int = 128, axis: str = "auto", symmetric: bool = False,
                      scale_dtype=None):
    """HAWQ-V3's knapsack objective per linear: ``{width: t_l · ‖W_l − Q(W_l)‖²_F}`` with ``t_l``
    the linear's average Hessian trace (``traces[full name]``, e.g. ``HessianTraces.linear``;
    negative estimates are clamped to 0: the second-order model assumes a PSD Hessian) and ``Q``
    RTN at that width (``axis="auto"``: the lower of the two axes). Needs no calibration pass.
    Returns ``(names, params, errors)`` like :func:`measure_layer_errors`."""
    import torch

    from .models import adapter_for, weight_oi

    ws = _check_widths(widths)
    scale_dtype = scale_dtype or torch.float16
    adapter = adapter or adapter_for(model)
    axes = ["oc", "ic"] if axis == "auto" else [axis]
    names, params, errors = [], [], []
    with torch.no_grad():
        for bi, block in enumerate(adapter.blocks()):
            for n, m in adapter.linears(block).items():
                full = f"{adapter.block_name(bi)}.{n}"
                if full not in traces:
                    raise ValueError(f"no Hessian trace for {full}")
                t = max(float(traces[full]), 0.0)
                W = weight_oi(m).detach().float()
                table = _rtn_error_table(W, ws, axes, group_size, symmetric, scale_dtype,
                                         lambda D: D.pow(2).sum().item(), full)
                table = {w: t * e for w, e in table.items()}
                names.append(full)
                params.append(W.numel())
                errors.append(table)
    return names, params, errors
