"""``layerpress bench``: the CPU GEMM benchmark suite of a source checkout (bench/bench_gemm.py),
its options forwarded."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import List, Optional

from .common import PROG, UsageError


def add_parser(sub) -> None:
    sub.add_parser("bench", help="run the CPU GEMM benchmark suite (options forwarded)",
                   add_help=False)


def _find_bench_suite() -> Optional[Path]:
    roots = [Path.cwd(), Path(__file__).resolve().parents[3]]
    if os.environ.get("LAYERPRESS_SOURCE_DIR"):
        roots.insert(0, Path(os.environ["LAYERPRESS_SOURCE_DIR"]))
    for root in roots:
        p = root / "bench" / "bench_gemm.py"
        if p.is_file():
            return p
    return None


def bench(argv: List[str]) -> int:
    path = _find_bench_suite()
    if path is None:
        raise UsageError("the benchmark suite (bench/bench_gemm.py) ships with the source tree, "
                         "not with the installed package: run `layerpress bench` from a checkout "
                         "of layerpress, or set LAYERPRESS_SOURCE_DIR to one")
    spec = importlib.util.spec_from_file_location("layerpress_bench_gemm", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main(argv, prog=f"{PROG} bench")
