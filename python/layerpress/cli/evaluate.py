"""``layerpress eval``: perplexity, embedding fidelity and per-layer reconstruction error of a saved
quantised model."""
from __future__ import annotations

import time
from pathlib import Path
from typing import List

from .common import LOAD_ERRORS, UsageError, load_saved, set_threads, table


def add_parser(sub) -> None:
    e = sub.add_parser(
        "eval", help="evaluate a saved quantised model",
        description="Loads a directory written by `layerpress quantize --out` and reports the "
                    "perplexity (causal LMs; with --reference also the original's), the embedding "
                    "fidelity against the full-precision model (encoders; needs --reference) and, "
                    "with --calib, each quantised linear's reconstruction error on calibration "
                    "text through the reference model.")
    e.add_argument("model_dir", metavar="MODEL_DIR", help="saved quantised model directory")
    e.add_argument("--no-verify", action="store_true",
                   help="skip checking the tensors against their recorded digests")
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


def _hf_dir(path: str, what: str) -> Path:
    d = Path(path)
    if not (d / "config.json").is_file():
        raise UsageError(f"{what} {d}: no config.json there (a Hugging Face model directory is "
                         "expected)")
    return d


def _lines(paths: List[str], what: str) -> List[str]:
    from ..flows.calibration import load_texts

    try:
        return load_texts([Path(p) for p in paths])
    except (FileNotFoundError, ValueError, UnicodeDecodeError) as e:
        raise UsageError(f"{what}: {e}") from None


def _layer_errors(reference, qmodel, ids, batch_size: int = 8):
    """{name: ||q(X) − W X|| / ||W X||} per quantised linear, bias excluded, X the reference
    linear's inputs on the calibration ids (the reference model's own forward pass)."""
    import torch

    from ..flows.report import quantized_layers

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

    set_threads(args.threads)
    if args.calib and not args.reference:
        raise UsageError("per-layer reconstruction error (--calib) needs --reference ORIG_DIR")
    texts = _lines(args.text, "--text") if args.text else None  # user errors first, then loading
    ref_dir = _hf_dir(args.reference, "--reference") if args.reference else None
    t0 = time.perf_counter()
    qmodel = load_saved(args.model_dir, verify=not args.no_verify)
    import transformers

    from ..flows.evaluate import embedding_fidelity, perplexity, sentence_embeddings
    from ..flows.models import adapter_for
    from ..flows.quantize_model import calibration_ids
    from ..flows.report import effective_bits, quantized_layers

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
        except LOAD_ERRORS as e:
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
            print(table(["layer", "bits", "axis", "rel. error"], rows))
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(str(e)) from None
    return 0
