"""``layerpress export``: a saved quantised model to another serving format (compressed-tensors for
vLLM, GGUF for llama.cpp, AWQ, GPTQ); prints what was written and each converted layer's error
as JSON."""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..interop.gguf import GGML_TYPES
from .common import LOAD_ERRORS, UsageError

FORMATS = ("compressed-tensors", "gguf", "awq", "gptq")


def add_parser(sub) -> None:
    e = sub.add_parser(
        "export", help="write a saved quantised model as compressed-tensors, GGUF, AWQ or GPTQ",
        description="Reads a quantised checkpoint directory (layerpress, AWQ, GPTQ or "
                    "compressed-tensors) and writes it in another format. Layers the target "
                    "cannot hold (per-input-channel groups, 16-bit side paths, rotations) are "
                    "refused, naming them, unless --requantize. Prints a JSON report.")
    e.add_argument("model_dir", metavar="DIR", help="quantised checkpoint directory")
    e.add_argument("--format", required=True, choices=FORMATS, help="target format")
    e.add_argument("--out", required=True, metavar="PATH",
                   help="output directory (a .gguf file for --format gguf)")
    e.add_argument("--requantize", action="store_true",
                   help="convert layers the format cannot hold to its per-output-channel form "
                        "(reports each one's added error)")
    e.add_argument("--tokenizer", metavar="DIR",
                   help="gguf: Hugging Face tokenizer directory (default: DIR)")
    e.add_argument("--tokenizer-pre", metavar="NAME",
                   help="gguf: llama.cpp pre-tokenizer name for a BPE vocabulary (default 'default')")
    e.add_argument("--ggml-type", choices=GGML_TYPES,
                   help="gguf: requantise every layer whose codes do not fit this block type "
                        "(K-quants: layers whose rows are not a multiple of 256 fall back to "
                        "Q5_0 / Q5_1 / Q8_0, as llama.cpp does)")
    e.add_argument("--float-type", choices=("f16", "f32"), default="f16",
                   help="gguf: type of the unquantised matrices (default f16)")
    e.add_argument("--gptq-version", type=int, choices=(1, 2), default=1,
                   help="gptq: checkpoint format v1 (stores z-1) or v2")
    e.add_argument("--overwrite", action="store_true", help="replace PATH if it exists")


def export(args) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from ..interop import load_checkpoint

    try:
        model = load_checkpoint(args.model_dir)
    except LOAD_ERRORS as e:
        raise UsageError(f"cannot load {args.model_dir}: {' '.join(str(e).split())}") from None
    out = Path(args.out)
    try:
        if args.format == "compressed-tensors":
            from ..interop import export_compressed_tensors

            report = export_compressed_tensors(model, out, requantize=args.requantize,
                                               overwrite=args.overwrite)
        elif args.format == "gguf":
            from ..interop import export_gguf

            tok = args.tokenizer or args.model_dir
            if not (Path(tok) / "tokenizer.json").is_file():
                raise UsageError(f"{tok} has no tokenizer.json: pass --tokenizer DIR (a Hugging Face "
                                 "tokenizer directory) for the GGUF vocabulary")
            report = export_gguf(model, out, tok, requantize=args.requantize,
                                 ggml_type=args.ggml_type, float_type=args.float_type,
                                 tokenizer_pre=args.tokenizer_pre, overwrite=args.overwrite)
        else:
            if args.requantize:
                raise UsageError(f"--requantize applies to compressed-tensors and gguf, not {args.format}")
            from ..interop import export_awq, export_gptq

            if args.format == "awq":
                path = export_awq(model, out, overwrite=args.overwrite)
            else:
                path = export_gptq(model, out, version=args.gptq_version, overwrite=args.overwrite)
            report = {"path": str(path)}
    except (ValueError, FileExistsError, TypeError, ImportError) as e:
        raise UsageError(" ".join(str(e).split())) from None
    print(json.dumps({"format": args.format, **report}, indent=1))
    return 0
