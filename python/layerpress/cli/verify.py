"""``layerpress verify DIR``: checks every tensor of a saved model against its recorded digest."""
from __future__ import annotations

import json

from .common import LOAD_ERRORS, UsageError


def add_parser(sub) -> None:
    v = sub.add_parser(
        "verify", help="check a saved quantised model's tensors against their digests",
        description="Reads every safetensors file of a saved layerpress model and checks each "
                    "tensor against the digest recorded at save time (config.json, "
                    "quantization_config.digests). Prints one result per file; the exit status "
                    "is 1 if any file fails.")
    v.add_argument("model_dir", metavar="DIR", help="saved quantised model directory")
    v.add_argument("--json", action="store_true", help="print JSON lines instead of text")


def verify(args) -> int:
    from ..flows.io import verify_directory

    try:
        results = verify_directory(args.model_dir)
    except LOAD_ERRORS as e:
        raise UsageError(f"cannot verify {args.model_dir}: {' '.join(str(e).split())}") from None
    for r in results:
        if args.json:
            print(json.dumps(r))
        elif r["ok"]:
            print(f"{r['file']}: OK ({r['tensors']} tensors)")
        else:
            print(f"{r['file']}: FAILED: {r['error']}")
    return 0 if all(r["ok"] for r in results) else 1
