"""The ``layerpress`` command line.

    layerpress               the same as ``layerpress demo``
    layerpress demo          quantise a random 4096x4096 Linear at W4/W3/W2 (per-OC and per-IC),
                             check the low-bit GEMM against the float64 reference, benchmark it
    layerpress info          build information (version, torch, CUDA, CPU features, kernels) as JSON
    layerpress bench [...]   the CPU GEMM benchmark suite (bench/bench_gemm.py of a source checkout)
    layerpress quantize      quantise a Hugging Face model (default: the bundled all-MiniLM-L6-v2)
                             layer by layer, report size, fidelity/perplexity and time
    layerpress eval DIR      evaluate a saved quantised model (perplexity, embedding fidelity,
                             per-layer reconstruction error against --reference)
    layerpress inspect DIR   what a saved quantised model holds, per layer and in total
    layerpress export DIR    write a quantised checkpoint as compressed-tensors, GGUF, AWQ or GPTQ
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from . import bench, demo, evaluate, export, info, inspect, quantize
from .common import PROG, UsageError

__all__ = ["main", "build_parser", "UsageError", "PROG"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="layerpress: low-bit GEMM, per-input-channel quantisation and compression "
                    "flows for PyTorch. With no command, runs `demo`.",
        epilog="`layerpress bench --help` lists the benchmark options.")
    sub = p.add_subparsers(dest="command", metavar="{demo,info,bench,quantize,eval,inspect,export}")
    for command in (demo, info, bench, quantize, evaluate, inspect, export):
        command.add_parser(sub)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # --threads applies to this command only: an in-process caller keeps its own setting
    torch_mod = sys.modules.get("torch")
    threads0 = torch_mod.get_num_threads() if torch_mod is not None else None
    try:
        if argv and argv[0] == "bench":
            return bench.bench(argv[1:])
        args = parser.parse_args(argv)
        if args.command in (None, "demo"):
            if args.command is None:
                args = parser.parse_args(["demo"])
            return demo.demo(args)
        if args.command == "info":
            return info.info(args)
        if args.command == "quantize":
            return quantize.quantize(args)
        if args.command == "eval":
            return evaluate.evaluate(args)
        if args.command == "inspect":
            return inspect.inspect_saved(args)
        if args.command == "export":
            return export.export(args)
        parser.error(f"unknown command {args.command!r}")
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `layerpress info | head -1`
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # silence the flush at exit
        return 1
    finally:
        if threads0 is not None and torch_mod.get_num_threads() != threads0:
            torch_mod.set_num_threads(threads0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
