"""llama.cpp (through llama-cpp-python) against transformers on our GGUF exports; run by
scripts/check_llamacpp.sh, not in CI.

For each case a synthetic model (tests/export_testutils.py: Llama, Qwen2 or Mistral, hidden 256,
2 layers, random weights scaled x2 so the logits are not all tiny) has its linears quantised
with layerpress RTN, is exported with export_gguf (unquantised tensors as F32), and is run by
llama.cpp on a fixed token sequence; its logits at every position are compared with the
transformers model whose linears carry our dequantised weights (dense fp32 nn.Linear).

Tolerance: llama.cpp's CPU kernels quantise the activations to 8 bits (Q8_0/Q8_1 blocks) for
dot products with Q4_0/Q4_1/Q8_0 weights, so its logits differ from an fp32 forward even when
the weights are read exactly: the first run (2026-12-04) measured 1-2 % of max |logit| already
at position 0 for exact Q8_0 weights (no RoPE there), growing with the weights' scale (x5: up to
6 %). A wrong tensor name, row order (the q/k permutation), nibble order or scale gives
uncorrelated logits. Pass: at every position max |Δ| <= 5 % of max |logit|, correlation of all
logits >= 0.999, the same arg-max at >= 90 % of positions.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from export_testutils import MIXED, quantise_linears, tiny_bpe_tokenizer, tiny_decoder  # noqa: E402

from layerpress import QuantLinear, QuantSpec  # noqa: E402
from layerpress.interop import export_gguf  # noqa: E402

RTOL, CORR, ARGMAX = 0.05, 0.999, 0.9
CASES = {
    "llama-w4g32-asym": ("llama", [QuantSpec(4, 32)]),
    "llama-w4g32-sym": ("llama", [QuantSpec(4, 32, symmetric=True)]),
    "llama-w8g32-sym": ("llama", [QuantSpec(8, 32, symmetric=True)]),
    "llama-mixed": ("llama", MIXED),
    "mistral-mixed": ("mistral", MIXED),
    "qwen2-mixed": ("qwen2", MIXED),
}


def dense_copy(model: nn.Module) -> nn.Module:
    """The model with each QuantLinear replaced by an fp32 nn.Linear holding its dequantised weight."""
    import copy

    dense = copy.deepcopy(model)
    for name, m in list(dense.named_modules()):
        if isinstance(m, QuantLinear):
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(m.dequantized_weight(torch.float32))
                if m.bias is not None:
                    lin.bias.copy_(m.bias.float())
            parent, _, child = name.rpartition(".")
            setattr(dense.get_submodule(parent), child, lin)
    return dense.float().eval()


def run_case(name: str, family: str, specs, tok, threads: int) -> dict:
    from llama_cpp import Llama

    model = tiny_decoder(family, hidden=256, heads=4, kv_heads=2)
    with torch.no_grad():  # larger weights than the default init, so the logits have a range
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(2.0)
    quantise_linears(model, specs)
    ids = tok("the quick brown fox jumps over the lazy dog and layerpress exports it")["input_ids"]
    with torch.no_grad():
        ref = dense_copy(model)(torch.tensor([ids])).logits[0].numpy()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "m.gguf"
        report = export_gguf(model, path, tok, float_type="f32")
        llm = Llama(model_path=str(path), n_ctx=128, n_batch=128, logits_all=True, n_threads=threads,
                    verbose=False)
        llm.reset()
        llm.eval(ids)
        got = np.array(llm.scores[: len(ids)], dtype=np.float32)
        del llm
    diff = np.abs(got - ref)
    scale = np.abs(ref).max(axis=1)
    rel = (diff.max(axis=1) / scale)
    agree = float(np.mean(got.argmax(1) == ref.argmax(1)))
    corr = float(np.corrcoef(got.ravel(), ref.ravel())[0, 1])
    import collections

    return {"kind": "llamacpp_check", "case": name, "family": family, "tokens": len(ids),
            "types": dict(collections.Counter(t["type"] for t in report["tensors"])),
            "requantized_tensors": sum(t["how"] == "requantized" for t in report["tensors"]),
            "max_weight_rel_error": max(t["rel_error"] for t in report["tensors"]),
            "max_abs_logit": float(np.abs(ref).max()), "max_abs_diff": float(diff.max()),
            "max_rel_diff_per_position": float(rel.max()), "mean_rel_diff": float(rel.mean()),
            "rel_diff_position0": float(rel[0]), "correlation": corr,
            "argmax_agreement": agree, "rtol": RTOL,
            "ok": bool(rel.max() <= RTOL and corr >= CORR and agree >= ARGMAX)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    import llama_cpp

    tok = tiny_bpe_tokenizer()
    lines = [{"kind": "versions", "llama_cpp_python": llama_cpp.__version__,
              "torch": torch.__version__}]
    for name, (family, specs) in CASES.items():
        lines.append(run_case(name, family, specs, tok, args.threads))
    for line in lines:
        print(json.dumps(line))
    return 0 if all(line.get("ok", True) for line in lines) else 1


if __name__ == "__main__":
    sys.exit(main())
