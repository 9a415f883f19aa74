"""Bit allocation to a fractional average (layer-wise quantisation).

Every block starts at the high bit width; blocks are demoted to the low width in order of
importance, least important first, and demotion stops at the first point where the
parameter-weighted average *code* bits (Σ bits_i·params_i / Σ params_i over the quantised
linears; scale/zero overhead not counted) is ``≤ target``. Since the average only decreases
along that order, this is the allocation in importance order closest to the target from below.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

from ..spec import BITS

__all__ = ["Allocation", "allocate_bits", "bit_pair"]


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
