"""Quality of rotated quantisation on the real all-MiniLM-L6-v2 (issue 22's targets): GPTQ with
the clipping search and AdaDim (axis auto), default calibration, g128, for ``rotate`` none,
hadamard and auto, side by side at each width (W4, W3, W2 and a 3.5-bit average, LIM order).
Quality: mean cosine of the sentence embeddings to the fp32 model on the 60 built-in held-out
sentences (flows/evaluate.py ``quality_of``). One JSON line per run, then a table and the checks.

    python -m bench.bench_rotation_quality [--bits 4,3,2,3.5] [--rotate none,hadamard,auto] [--out F]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from .bench_flow_quality import _load  # noqa: E402

TARGETS = {4.0: 0.993, 3.0: 0.975, 2.0: 0.90, 3.5: 0.985}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_rotation_quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--bits", default="4,3,2,3.5")
    p.add_argument("--rotate", default="none,hadamard,auto")
    p.add_argument("--rotate-block", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="append JSON lines here too")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from layerpress.cli.common import table
    from layerpress.flows import quantize_model
    from layerpress.flows.evaluate import quality_of, sentence_embeddings

    model, tok = _load()
    ref = sentence_embeddings(model, tok)
    machine = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
               "torch": torch.__version__}
    results, rows = {}, []
    for bits in [float(b) for b in a.bits.split(",")]:
        for rotate in a.rotate.split(","):
            m = copy.deepcopy(model)
            t0 = time.perf_counter()
            rep = quantize_model(m, bits=int(bits) if bits.is_integer() else bits, axis="auto", method="gptq",
                                 tokenizer=tok, rotate=rotate, rotate_block=a.rotate_block)
            q = quality_of(m, tok, ref)
            e = dict(kind="rotation_quality", model="all-MiniLM-L6-v2", bits=bits, method="gptq", axis="auto",
                     rotate=rotate, rotate_block=a.rotate_block, group_size=128, mean_cos=q["mean_cos"],
                     min_cos=q["min_cos"], nn_agreement=q["nn_agreement"], quantize_s=rep.time_s,
                     time_s=time.perf_counter() - t0,
                     rotated_layers=sum(1 for la in rep.layers if la.rotation == "hadamard"),
                     layers=len(rep.layers), axes={x: sum(1 for la in rep.layers if la.axis == x) for x in ("oc", "ic")},
                     **machine)
            results[(bits, rotate)] = e
            line = json.dumps(e)
            print(line, flush=True)
            if a.out:
                with open(a.out, "a") as f:
                    f.write(line + "\n")
            rows.append([f"W{bits:g}", rotate, f"{q['mean_cos']:.4f}", f"{q['min_cos']:.4f}",
                         f"{100 * q['nn_agreement']:.0f}%", f"{e['rotated_layers']}/{e['layers']}", f"{rep.time_s:.0f}"])
    print(table(["bits", "rotate", "mean cos", "min cos", "NN agree", "rotated", "quantise s"], rows, left=2),
          file=sys.stderr)
    for bits in sorted({b for b, _ in results}, reverse=True):
        got = {r: results[(b, r)]["mean_cos"] for b, r in results if b == bits}
        best = max(got.values())
        print(f"  W{bits:g}: best {best:.4f} vs target {TARGETS.get(bits, float('nan'))} "
              f"[{'PASS' if best >= TARGETS.get(bits, 2) else 'FAIL'}]", file=sys.stderr)
        if "auto" in got and len(got) == 3:
            fixed = max(got["none"], got["hadamard"])
            print(f"  W{bits:g}: auto {got['auto']:.4f} >= max(none, hadamard) {fixed:.4f} "
                  f"[{'PASS' if got['auto'] >= fixed else 'FAIL'}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
