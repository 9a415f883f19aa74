"""End-to-end CPU inference of a synthetic Llama: prefill and decode, transformers fp32/bf16,
layerpress W4/W3/W2 and llama.cpp, in the same run.

    python -m bench.bench_decode                          # 4 layers of Llama-7B shape, 2 threads
    python -m bench.bench_decode --layers 2 --engines fp32,w4 --rounds 3 --out r.jsonl

The model is a ``LlamaForCausalLM`` with random weights (hidden 4096, MLP 11008, 32 heads by
default; the vocabulary is the 320 entries of the byte-level BPE tokenizer the GGUF export needs).
Each engine is timed on the same prompt:

* ``prefill``: one forward of ``--prompt`` tokens with an empty KV cache (tokens/s);
* ``decode``: greedy ``generate`` of ``--new-tokens`` tokens after a one-token warm start, minus
  the time of a one-token ``generate`` from the same prompt, per token (ms/token) -- the whole
  per-token cost of transformers' ``generate``: the model, the cache and the sampling loop.

``w4``/``w3``/``w2`` swap every linear but ``lm_head`` for a per-OC ``QuantLinear`` (RTN, group
``--group``; speed does not depend on how the codes were chosen). ``--cache static`` runs
``generate`` with transformers' static cache, ``--compile`` additionally compiles the decode step
(transformers' ``compile_config``; its compile time is reported separately).

``llamacpp`` (when ``llama_cpp`` is importable, else reported as skipped): the same base model
quantised by layerpress to W4 symmetric g32 -- which the project's GGUF export writes as ``Q4_0``
blocks exactly, llama.cpp's own 4.5-bit format -- exported with ``export_gguf`` and run by
llama.cpp with ``--threads`` threads (prefill: ``eval`` of the prompt; decode: ``eval`` of one
token at a time, ms/token). One JSON line per measurement on stdout, a table on stderr.
"""
from __future__ import annotations

import argparse
import copy
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional

import torch
from torch import nn

from layerpress import QuantSpec
from layerpress.cli.common import UsageError, table, timed_calls
from layerpress.nn import QuantLinear

from .bench_gemm import Reporter, machine_info

ENGINES = ("fp32", "bf16", "w4", "w3", "w2", "llamacpp")
VOCAB = 320  # tests/export_testutils.GGUF_VOCAB: the byte-level BPE tokenizer padded for GGUF


def synthetic_llama(layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int,
                    seed: int = 0) -> nn.Module:
    import transformers as T

    torch.manual_seed(seed)
    cfg = T.LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate,
                        num_hidden_layers=layers, num_attention_heads=heads,
                        num_key_value_heads=kv_heads, max_position_embeddings=4096,
                        bos_token_id=0, eos_token_id=1, tie_word_embeddings=False)
    with torch.no_grad():
        return T.LlamaForCausalLM(cfg).eval()


def quantised_copy(base: nn.Module, spec: QuantSpec) -> nn.Module:
    """``base`` with every linear but ``lm_head`` an RTN per-OC QuantLinear (a new model)."""
    model = copy.deepcopy(base)
    with torch.no_grad():
        for name, mod in list(model.named_modules()):
            if isinstance(mod, nn.Linear) and name != "lm_head":
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, QuantLinear.from_linear(mod, spec))
    return model


def _median_s(fn, rounds: int) -> float:
    """Median of ``rounds`` timed calls after one warm-up call."""
    return statistics.median(timed_calls(fn, target_s=0.0, min_repeats=rounds, max_repeats=rounds))


def time_hf(model: nn.Module, prompt: torch.Tensor, new_tokens: int, rounds: int, gen_kwargs: dict):
    """(prefill ms, decode ms/token, decode samples ms/token) of a transformers model."""
    with torch.inference_mode():
        prefill = _median_s(lambda: model(prompt, use_cache=True), rounds)

        def generate(n):
            model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           pad_token_id=0, **gen_kwargs)

        # Warm-up. With --compile the first decode compiles for one static-cache length and the
        # second, at another length, recompiles with that length dynamic; later lengths reuse it.
        generate(2)
        generate(new_tokens + 1)
        samples = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            generate(1)
            t1 = time.perf_counter()
            generate(new_tokens + 1)
            t2 = time.perf_counter()
            samples.append(((t2 - t1) - (t1 - t0)) / new_tokens)
    return prefill * 1e3, statistics.median(samples) * 1e3, [s * 1e3 for s in samples]


def time_llamacpp(base: nn.Module, prompt: torch.Tensor, new_tokens: int, rounds: int, threads: int,
                  log):
    """(prefill ms, decode ms/token, samples, report) of llama.cpp on the Q4_0 export of ``base``."""
    from llama_cpp import Llama

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from export_testutils import tiny_bpe_tokenizer  # the tokenizer the GGUF tests use

    from layerpress.interop import export_gguf

    model = quantised_copy(base, QuantSpec(bits=4, group_size=32, symmetric=True))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.gguf"
        report = export_gguf(model, path, tiny_bpe_tokenizer(), float_type="f32")
        del model
        gc.collect()
        n = prompt.shape[1]
        llm = Llama(model_path=str(path), n_ctx=n + new_tokens + 8, n_batch=n, n_threads=threads,
                    n_threads_batch=threads, verbose=False)
        tokens = prompt[0].tolist()

        def prefill():
            llm.reset()
            llm.eval(tokens)

        prefill_s = _median_s(prefill, rounds)
        samples = []
        for _ in range(rounds + 1):
            prefill()
            t0 = time.perf_counter()
            for i in range(new_tokens):
                llm.eval([2 + i % (VOCAB - 2)])
            samples.append((time.perf_counter() - t0) / new_tokens)
        samples = samples[1:]  # the first is a warm-up
        del llm
    types = sorted({t["type"] for t in report["tensors"]})
    log(f"llama.cpp ran the export (tensor types {', '.join(types)})")
    return prefill_s * 1e3, statistics.median(samples) * 1e3, [s * 1e3 for s in samples]


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=11008)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=None, help="default: --heads")
    p.add_argument("--engines", default=",".join(ENGINES),
                   help=f"comma-separated, of {', '.join(ENGINES)}")
    p.add_argument("--group", type=int, default=128, help="group size of w4/w3/w2")
    p.add_argument("--prompt", type=int, default=128, help="prefill length (tokens)")
    p.add_argument("--new-tokens", type=int, default=32, help="decoded tokens per timing")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache", choices=("dynamic", "static"), default="dynamic",
                   help="transformers' KV cache for the transformers engines")
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step (transformers' compile_config; needs --cache static)")
    p.add_argument("--out", help="also write the JSON lines to this file")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines or table")
    return p


def run(args) -> int:
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    for e in engines:
        if e not in ENGINES:
            raise UsageError(f"--engines: unknown engine {e!r}; expected some of {', '.join(ENGINES)}")
    if min(args.layers, args.hidden, args.intermediate, args.heads, args.prompt, args.new_tokens,
           args.rounds, args.threads) < 1:
        raise UsageError("--layers, --hidden, --intermediate, --heads, --prompt, --new-tokens, "
                         "--rounds and --threads must be positive")
    kv_heads = args.kv_heads or args.heads
    if args.hidden % args.heads or args.heads % kv_heads:
        raise UsageError(f"--hidden ({args.hidden}) must be a multiple of --heads ({args.heads}), "
                         f"and --heads of --kv-heads ({kv_heads})")
    if args.compile and args.cache != "static":
        raise UsageError("--compile needs --cache static (a dynamic cache changes shape every token)")
    torch.set_num_threads(args.threads)
    gen_kwargs = {}
    if args.cache == "static":
        gen_kwargs["cache_implementation"] = "static"
    if args.compile:
        from transformers import CompileConfig

        cc = CompileConfig(mode="default", fullgraph=True)
        cc._compile_all_devices = True  # transformers compiles on CPU only when asked so
        gen_kwargs["compile_config"] = cc

    reporter = Reporter(args.out, args.quiet)
    log, emit = reporter.log, reporter.emit
    shape = {"layers": args.layers, "hidden": args.hidden, "intermediate": args.intermediate,
             "heads": args.heads, "kv_heads": kv_heads, "vocab": VOCAB}
    try:
        emit(machine_info())
        base = synthetic_llama(args.layers, args.hidden, args.intermediate, args.heads, kv_heads)
        prompt = torch.randint(2, VOCAB, (1, args.prompt), generator=torch.Generator().manual_seed(1))
        common = {"kind": "result", "op": "decode", "device": "cpu", "threads": args.threads,
                  **shape, "prompt": args.prompt, "new_tokens": args.new_tokens, "rounds": args.rounds}
        for engine in engines:
            log(f"{engine}: preparing")
            rec = {**common, "engine": engine}
            try:
                t0 = time.perf_counter()
                if engine == "llamacpp":
                    try:
                        import llama_cpp  # noqa: F401
                    except ImportError:
                        emit({**rec, "skipped": "llama_cpp (llama-cpp-python) is not importable"})
                        log("llamacpp: skipped (pip install llama-cpp-python; a source build)")
                        continue
                    prefill, decode, samples = time_llamacpp(base, prompt, args.new_tokens,
                                                             args.rounds, args.threads, log)
                    rec.update(weights="Q4_0 (layerpress W4 sym g32 export)")
                else:
                    if engine == "fp32":
                        model = base
                    elif engine == "bf16":
                        model = copy.deepcopy(base).to(torch.bfloat16)
                    else:
                        spec = QuantSpec(bits=int(engine[1:]), group_size=args.group)
                        model = quantised_copy(base, spec)
                        rec.update(weights=f"W{spec.bits} g{spec.group_size} per-OC",
                                   group_size=args.group)
                    rec.update(cache=args.cache, compile=args.compile)
                    prefill, decode, samples = time_hf(model, prompt, args.new_tokens, args.rounds,
                                                       gen_kwargs)
                    if model is not base:
                        del model
                rec.update(prefill_ms=round(prefill, 3),
                           prefill_tok_s=round(args.prompt / prefill * 1e3, 2),
                           decode_ms_per_token=round(decode, 3),
                           decode_samples_ms=[round(s, 3) for s in samples],
                           wall_s=round(time.perf_counter() - t0, 1))
                emit(rec)
            finally:
                gc.collect()
        _summary(reporter)
    finally:
        reporter.close()
    return 0


def _summary(reporter: Reporter) -> None:
    rows = [r for r in reporter.results if r.get("kind") == "result" and "decode_ms_per_token" in r]
    if not rows:
        return
    ref = {r["engine"]: r for r in rows}.get("llamacpp")
    out = []
    for r in rows:
        cells = [r["engine"], f"{r['prefill_tok_s']:.1f}", f"{r['decode_ms_per_token']:.2f}"]
        if ref:
            cells += [f"{r['prefill_tok_s'] / ref['prefill_tok_s']:.2f}x",
                      f"{ref['decode_ms_per_token'] / r['decode_ms_per_token']:.2f}x"]
        out.append(cells)
    head = ["engine", "prefill tok/s", "decode ms/token"]
    if ref:
        head += ["prefill vs llama.cpp", "decode vs llama.cpp"]
    reporter.log(table(head, out))


def main(argv: Optional[List[str]] = None, prog: Optional[str] = None) -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        return run(args)
    except UsageError as e:
        print(f"bench_decode: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
