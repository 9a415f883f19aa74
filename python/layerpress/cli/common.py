"""What the ``layerpress`` commands share, and ``bench/`` uses too: the usage error, median
timing, aligned tables, ``--threads``, loading a saved model, and the tinygemm int4pack weight
that the demo and the GEMM benchmark time against."""
from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Callable, List, Optional

PROG = "layerpress"

__all__ = ["PROG", "UsageError", "timed_calls", "measure", "median_ms", "set_threads", "table",
           "int4pack", "load_saved", "LOAD_ERRORS"]


class UsageError(Exception):
    """A mistake on the command line: reported as one line, no traceback, exit status 2."""


def timed_calls(fn: Callable[[], object], target_s: float, min_repeats: int = 3,
                max_repeats: int = 2000, warmup_fraction: float = 0.1) -> List[float]:
    """Wall times (s) of repeated ``fn()`` calls: warm-up calls first (at least one, for about
    ``warmup_fraction`` of the budget), then enough timed calls that they take about
    ``target_s``."""
    warm_deadline = time.perf_counter() + target_s * warmup_fraction
    t0 = time.perf_counter()
    fn()
    est = time.perf_counter() - t0
    while time.perf_counter() < warm_deadline:
        t0 = time.perf_counter()
        fn()
        est = min(est, time.perf_counter() - t0)
    repeats = int(min(max_repeats, max(min_repeats, target_s / max(est, 1e-7))))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def measure(fn: Callable[[], object], target_s: float = 0.25, min_repeats: int = 3,
            max_repeats: int = 2000) -> tuple:
    """Median wall time of ``fn()`` in ms over ``timed_calls``. Returns (median_ms, repeats)."""
    times = timed_calls(fn, target_s, min_repeats, max_repeats)
    return statistics.median(times) * 1e3, len(times)


def median_ms(fn, target_s: float = 0.15, min_repeats: int = 3) -> float:
    """Median wall time of fn() in ms: one warm-up call, then about target_s of timed calls (the
    quick timing of ``layerpress demo``)."""
    return statistics.median(timed_calls(fn, target_s, min_repeats, max_repeats=1000,
                                         warmup_fraction=0.0)) * 1e3


def set_threads(threads: Optional[int]) -> None:
    """--threads: torch's intra-op threads for this command (main() restores the caller's)."""
    if threads is None:
        return
    if threads < 1:
        raise UsageError(f"--threads must be >= 1, got {threads}")
    import torch
    torch.set_num_threads(threads)


def table(head: List[str], rows: List[List[str]], left: int = 1) -> str:
    """``head`` and ``rows`` as aligned columns under a dashed rule: the first ``left`` columns
    left-aligned, the rest right-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]

    def line(cells):
        return "  ".join(c.ljust(w) if i < left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


def int4pack(w, group: int):
    """W4 asymmetric RTN weight in the layout of torch's _weight_int4pack_mm_for_cpu
    (tinygemm: (q - 8)·scale + zero, scales_and_zeros bf16 [K/g, N, 2])."""
    import torch
    from .. import ops
    from ..spec import QuantSpec

    spec = QuantSpec(bits=4, group_size=group, axis="oc", scale_dtype=torch.bfloat16)
    codes, s, z = ops.quantize(w.contiguous(), spec)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
    sf = s.float()
    sz = torch.stack([sf, (8.0 - z.float()) * sf], dim=-1).transpose(0, 1).contiguous()
    return packed, sz.to(torch.bfloat16)


LOAD_ERRORS = (FileNotFoundError, NotADirectoryError, ValueError, NotImplementedError, KeyError,
                TypeError, OSError)


def load_saved(model_dir: str, verify: bool = True):
    """A saved layerpress model (flows/io.py load_quantized; ``verify``: check the tensor
    digests); user errors -> UsageError."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from ..flows.io import load_quantized

    try:
        return load_quantized(model_dir, verify=verify)
    except LOAD_ERRORS as e:
        msg = " ".join(str(e).split())  # one line (torch's state-dict errors span several)
        where = "" if str(Path(model_dir)) in msg else f" {model_dir}"
        raise UsageError(f"cannot load the quantised model{where}: {msg}") from None
