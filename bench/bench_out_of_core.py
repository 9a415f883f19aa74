"""Peak resident memory of out-of-core quantisation against the whole-model path (issue 16).

Writes a synthetic Llama-style checkpoint (random fp32 weights, one safetensors shard per block
plus the embeddings and the head, ``model.safetensors.index.json``) of about ``--gib`` GiB
without ever holding it in memory, then quantises it twice, each in a fresh child process:

* ``out_of_core``: ``layerpress.flows.out_of_core.quantize_checkpoint`` (one block at a time);
* ``whole_model``: ``AutoModelForCausalLM.from_pretrained`` + ``quantize_model`` +
  ``save_quantized`` (the in-memory flow).

Per child: peak resident set growth over the baseline after the imports (``VmHWM`` and
``VmRSS`` of ``/proc/self/status``), wall time, and whether the two outputs hold identical
tensors. W4 RTN per-OC g128 min-max (the cheapest quantiser: the memory is the point), 4
calibration sequences of 64 tokens, one thread. Prints one JSON line per child and a summary
line; writes them to ``bench/results/out-of-core-<date>.jsonl`` (``--out``). The checkpoint and
outputs are deleted afterwards (``--keep`` keeps them).

    nice python -m bench.bench_out_of_core [--gib 6.3] [--workdir /tmp/lp-ooc]
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

HIDDEN, INTER, HEADS, KV_HEADS, VOCAB = 2048, 5632, 16, 4, 32000


def _config(layers: int) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": VOCAB,
            "hidden_size": HIDDEN, "intermediate_size": INTER, "num_hidden_layers": layers,
            "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
            "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
            "torch_dtype": "float32", "hidden_act": "silu", "rope_theta": 10000.0}


def _block_shapes() -> dict:
    kv = HIDDEN // HEADS * KV_HEADS
    return {"self_attn.q_proj.weight": (HIDDEN, HIDDEN), "self_attn.k_proj.weight": (kv, HIDDEN),
            "self_attn.v_proj.weight": (kv, HIDDEN), "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
            "mlp.gate_proj.weight": (INTER, HIDDEN), "mlp.up_proj.weight": (INTER, HIDDEN),
            "mlp.down_proj.weight": (HIDDEN, INTER), "input_layernorm.weight": (HIDDEN,),
            "post_attention_layernorm.weight": (HIDDEN,)}


def write_checkpoint(path: Path, gib: float) -> dict:
    """The synthetic checkpoint, shard by shard (one block's tensors in memory at a time)."""
    import torch
    from safetensors.torch import save_file

    block_bytes = sum(4 * math.prod(shape) for shape in _block_shapes().values())
    outside = 2 * VOCAB * HIDDEN * 4 + HIDDEN * 4
    layers = max(1, round((gib * 2**30 - outside) / block_bytes))
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(_config(layers)))
    g = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    n_shards = layers + 1

    def shard(i, tensors):
        nonlocal total
        name = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        save_file(tensors, str(path / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
        total += (path / name).stat().st_size

    for bi in range(layers):
        tensors = {}
        for key, shape in _block_shapes().items():
            t = (torch.ones(shape) if len(shape) == 1 else
                 torch.randn(shape, generator=g) * (1.0 / shape[1] ** 0.5))
            tensors[f"model.layers.{bi}.{key}"] = t
        shard(bi, tensors)
    shard(layers, {"model.embed_tokens.weight": torch.randn(VOCAB, HIDDEN, generator=g) * 0.02,
                   "model.norm.weight": torch.ones(HIDDEN),
                   "lm_head.weight": torch.randn(VOCAB, HIDDEN, generator=g) * 0.02})
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}))
    return {"layers": layers, "bytes": total}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


ARGS = dict(bits=4, group_size=128, axis="oc", method="rtn", clip=False, n_samples=4, seq_len=64)


def child(mode: str, src: str, out: str, result: str) -> None:
    import torch
    import transformers

    import layerpress  # noqa: F401
    from layerpress.flows import quantize_model, save_quantized
    from layerpress.flows.out_of_core import quantize_checkpoint

    torch.set_num_threads(1)
    transformers.LlamaForCausalLM  # noqa: B018  (the modelling code, before the baseline)
    ids = torch.randint(0, VOCAB, (ARGS["n_samples"], ARGS["seq_len"]),
                        generator=torch.Generator().manual_seed(1))
    args = {k: v for k, v in ARGS.items() if k not in ("n_samples", "seq_len")}
    base = _status_kib("VmRSS")
    t0 = time.perf_counter()
    if mode == "out_of_core":
        quantize_checkpoint(src, out, calib=ids, **args)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
        quantize_model(model, calib=ids, **args)
        save_quantized(model, out)
    Path(result).write_text(json.dumps({"base_kib": base, "peak_kib": _status_kib("VmHWM"),
                                        "time_s": time.perf_counter() - t0}))


def _same_output(a: Path, b: Path) -> bool:
    import torch

    from layerpress.flows.io import _read_tensors
    ta, tb = _read_tensors(a)[0], _read_tensors(b)[0]
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gib", type=float, default=6.3, help="checkpoint size in GiB (fp32)")
    ap.add_argument("--workdir", default="/tmp/lp-bench-ooc")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--out", help="JSON lines file (default bench/results/out-of-core-<date>.jsonl)")
    ap.add_argument("--child", nargs=4, metavar=("MODE", "SRC", "OUT", "RESULT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(*args.child)
        return 0
    work = Path(args.workdir)
    if work.exists():
        raise SystemExit(f"{work} exists: remove it or pass another --workdir")
    lines = []
    try:
        t0 = time.perf_counter()
        info = write_checkpoint(work / "src", args.gib)
        print(f"checkpoint: {info['layers']} blocks, {info['bytes'] / 2**30:.2f} GiB in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        for mode in ("out_of_core", "whole_model"):
            res = work / f"{mode}.json"
            env = dict(os.environ, OMP_NUM_THREADS="1")
            proc = subprocess.run([sys.executable, "-m", "bench.bench_out_of_core", "--child", mode,
                                   str(work / "src"), str(work / mode), str(res)], env=env,
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"{mode} failed:\n{proc.stderr[-3000:]}")
            r = json.loads(res.read_text())
            line = {"bench": "out_of_core", "path": mode, "checkpoint_bytes": info["bytes"],
                    "blocks": info["layers"], "hidden": HIDDEN, "intermediate": INTER,
                    "vocab": VOCAB, "quantiser": ARGS,
                    "peak_rss_growth_mib": round((r["peak_kib"] - r["base_kib"]) / 1024, 1),
                    "baseline_rss_mib": round(r["base_kib"] / 1024, 1),
                    "time_s": round(r["time_s"], 1), "threads": 1,
                    "machine": "2-core AMD EPYC Zen 4 (shared), torch "
                               + __import__("torch").__version__,
                    "python": platform.python_version(), "commit": _commit(),
                    "date": datetime.date.today().isoformat()}
            print(json.dumps(line), flush=True)
            lines.append(line)
        same = _same_output(work / "out_of_core", work / "whole_model")
        ooc, whole = (ln["peak_rss_growth_mib"] for ln in lines)
        summary = {"bench": "out_of_core", "summary": True, "identical_outputs": same,
                   "peak_growth_ratio_whole_over_out_of_core": round(whole / ooc, 2),
                   "checkpoint_gib": round(info["bytes"] / 2**30, 2)}
        print(json.dumps(summary), flush=True)
        lines.append(summary)
        out = Path(args.out or f"bench/results/out-of-core-{datetime.date.today().isoformat()}.jsonl")
        out.write_text("".join(json.dumps(ln) + "\n" for ln in lines))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
