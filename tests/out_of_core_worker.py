"""Child process of tests/test_out_of_core.py (run as a script, or under torchrun).

    python out_of_core_worker.py rss SRC OUT RESULT.json ARGS_JSON
        quantize_checkpoint SRC -> OUT; RESULT: baseline (after the imports) and peak resident
        memory of this process, the report
    python out_of_core_worker.py whole SRC OUT RESULT.json ARGS_JSON
        the same through the whole-model path (from_pretrained + quantize_model + save_quantized)
    python out_of_core_worker.py slow SRC OUT CKPT ARGS_JSON
        quantize_checkpoint with checkpoints; prints "done <i>" after block i (the parent kills
        it mid-run)
    torchrun --nproc-per-node 2 out_of_core_worker.py dist SRC OUTDIR RESULT.json ARGS_JSON
        the distributed runs of the test (gloo)
"""
from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import layerpress  # noqa: E402,F401
from layerpress.flows.out_of_core import quantize_checkpoint  # noqa: E402


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _rss_kib() -> int:
    return _status_kib("VmRSS")


def _peak_kib() -> int:
    # VmHWM: this process image's peak. Not getrusage's ru_maxrss: Linux carries the forked
    # parent's peak across exec into it (a child of a large pytest process starts "large").
    return _status_kib("VmHWM")


def _ids(args: dict) -> torch.Tensor:
    n, length, vocab = args.pop("n"), args.pop("seq_len_ids"), args.pop("vocab")
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(1))


def main(argv):
    mode, src, out, result = argv[:4]
    args = json.loads(argv[4])
    torch.set_num_threads(int(args.pop("threads_env", 1)))
    calib = _ids(args)
    if mode in ("rss", "whole"):
        import transformers
        from layerpress.flows import quantize_model, save_quantized
        transformers.LlamaForCausalLM  # the modelling code, imported before the baseline by both
        base = _rss_kib()
        if mode == "rss":
            report = quantize_checkpoint(src, out, calib=calib, **args)
        else:
            model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
            report = quantize_model(model, calib=calib, fuse_projections=False, **args)
            save_quantized(model, out)
        with open(result, "w") as f:
            json.dump({"base_kib": base, "peak_kib": _peak_kib(), "report": report.to_dict()}, f)
    elif mode == "slow":
        def done(i):
            print(f"done {i}", flush=True)
        quantize_checkpoint(src, out, calib=calib, checkpoint_dir=result, on_block_done=done,
                            **args)
        print("finished", flush=True)
    elif mode == "dist":
        _dist(src, out, result, calib, args)
    else:
        raise SystemExit(f"unknown mode {mode}")


def _dist(src, out_dir, result, calib, args):
    import torch.distributed as dist
    import transformers

    from layerpress.flows import quantize_model
    from layerpress.flows.distributed import RanksDisagree, rank

    dist.init_process_group("gloo")
    me = rank()
    res = {}
    # 1. out of core, GPTQ with AdaDim (Hessians and axis errors reduced, linears shared out)
    rep = quantize_checkpoint(src, os.path.join(out_dir, "gptq"), calib=calib, **args)
    res["gptq_report"] = rep.to_dict()
    # 2. in memory, AWQ + fractional bits by LIM (statistics, errors and scores reduced)
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    rep = quantize_model(model, calib=calib, **dict(args, method="awq", bits=3.5, fuse_projections=False))
    res["awq_report"] = rep.to_dict()
    if me == 0:
        from layerpress.flows import save_quantized
        save_quantized(model, os.path.join(out_dir, "awq"))
    # 3. ranks given different settings / calibration data: refused on every rank
    for what, kw in (("settings", dict(args, seed=me)),
                     ("calibration", dict(args, calib=calib if me == 0 else calib.flip(0)))):
        kw.setdefault("calib", calib)
        try:
            quantize_checkpoint(src, os.path.join(out_dir, f"bad_{what}"), **kw)
            res[f"refused_{what}"] = None
        except RanksDisagree as e:
            res[f"refused_{what}"] = str(e)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, res)
    if me == 0:
        with open(result, "w") as f:
            json.dump(gathered, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
