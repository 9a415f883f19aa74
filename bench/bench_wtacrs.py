"""WTA-CRS fine-tuning benchmark: one training step of a small Llama-shaped model (built from a
``transformers.LlamaConfig``, random weights, no download) with

* ``linear``     -- plain ``nn.Linear`` everywhere (the baseline),
* ``wtacrs``     -- :func:`layerpress.apply_wtacrs` at ``--ratio`` (attention output + FFN),
* ``checkpoint`` -- plain linears with gradient checkpointing per decoder layer,
* ``lora``/``lora_wtacrs`` -- frozen base + LoRA adapters (r=8) on the same layers, without / with
  WTA-CRS on the down-projection,

measuring, per variant, in a fresh subprocess (so that peak memory is not polluted by the other
variants):

* ``saved_mb``: bytes saved for backward during the step (``saved_tensors_hooks``; parameters
  excluded, every saved tensor counted once per save),
* ``saved_unique_mb``: the same, each storage counted once (what is really held),
* ``peak_mb``: peak resident memory of a (warm) step above the resident memory before it: the
  kernel's high-water mark ``VmHWM`` is reset through ``/proc/self/clear_refs`` before the step,
  and the subprocess runs with ``MALLOC_MMAP_THRESHOLD_`` fixed at 128 KiB so that freed tensors
  go back to the OS and resident memory follows the live tensors (CPU, Linux),
* ``step_ms``: median step time (forward + backward + SGD) over ``--repeats`` steps after warm-up,
  all variants built in one further subprocess and stepped in turn, round by round, so that the
  drift of a shared machine hits them alike.

    python -m bench.bench_wtacrs [--batch 8 --seq 256 --ratio 0.3 --repeats 5] [--variants a,b]

Output: one JSON line per variant on stdout, then a table on stderr. The machine is shared: the
load average is recorded with the results.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

VARIANTS = ("linear", "wtacrs", "checkpoint", "lora", "lora_wtacrs")


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def peak_of(fn) -> float:
    """Peak resident MB of ``fn()`` above the resident memory before it (Linux)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current VmRSS
    before = _status_mb("VmRSS:")
    fn()
    return _status_mb("VmHWM:") - before


def build(args):
    import torch
    import transformers
    cfg = transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                                   intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                                   num_attention_heads=args.heads, num_key_value_heads=args.heads,
                                   max_position_embeddings=max(args.seq, 128), use_cache=False)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).train()


def make_step(args, v):
    """Model of variant ``v`` and a closure running one training step on a fixed batch."""
    import torch
    from layerpress.wtacrs import apply_lora, apply_wtacrs
    model = build(args)
    if v == "wtacrs":
        apply_wtacrs(model, ratio=args.ratio)
    elif v == "checkpoint":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif v in ("lora", "lora_wtacrs"):
        apply_lora(model, r=8, ratio=args.ratio if v == "lora_wtacrs" else None)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:  # gradients exist before the measured step: they are not "step memory"
        p.grad = torch.zeros_like(p)
    opt = torch.optim.SGD(params, lr=1e-4)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
        return loss

    return model, step


def run_timing(args) -> list:
    """Step times of all variants, interleaved round by round (a shared machine drifts)."""
    import torch
    torch.set_num_threads(args.threads)
    variants = args.variants.split(",")
    steps = {v: make_step(args, v)[1] for v in variants}
    for v in variants:
        for _ in range(max(args.warmup, 1)):
            steps[v]()
    times = {v: [] for v in variants}
    for _ in range(args.repeats):
        for v in variants:
            t0 = time.perf_counter()
            steps[v]()
            times[v].append(time.perf_counter() - t0)
    return [{"variant": v, "step_ms": round(statistics.median(times[v]) * 1e3, 1),
             "step_ms_min": round(min(times[v]) * 1e3, 1)} for v in variants]


def run_variant(args) -> dict:
    import torch
    import layerpress
    torch.set_num_threads(args.threads)
    v = args.variant
    model, step = make_step(args, v)

    # 1) peak memory of a warm step
    for _ in range(max(args.warmup, 1)):
        step()
    peak = max(peak_of(step) for _ in range(2))
    # 2) bytes saved for backward
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = [0]
    unique = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in param_ptrs:
            saved[0] += t.numel() * t.element_size()
            unique[ptr] = max(unique.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return {"kind": "wtacrs_step", "variant": v, "ratio": args.ratio if "wtacrs" in v else None,
            "batch": args.batch, "seq": args.seq, "hidden": args.hidden,
            "intermediate": args.intermediate, "layers": args.layers, "threads": args.threads,
            "saved_mb": round(saved[0] / 2 ** 20, 2),
            "saved_unique_mb": round(sum(unique.values()) / 2 ** 20, 2), "peak_mb": round(peak, 1),
            "loadavg": os.getloadavg()[0], "torch": torch.__version__,
            "layerpress": layerpress.__version__}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=688)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a shared, oversubscribed machine more threads spin)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant in this process
    ap.add_argument("--timing", action="store_true", help=argparse.SUPPRESS)  # internal
    args = ap.parse_args(argv)
    if args.variant:
        print(json.dumps(run_variant(args)), flush=True)
        return 0
    if args.timing:
        print(json.dumps(run_timing(args)), flush=True)
        return 0
    rows = []
    argv_ = list(argv if argv is not None else sys.argv[1:])
    for v in args.variants.split(","):
        if v not in VARIANTS:
            ap.error(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")

    def child(*extra):
        out = subprocess.run([sys.executable, "-m", "bench.bench_wtacrs", *argv_, *extra],
                             capture_output=True, text=True,
                             env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"},
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        if out.returncode != 0:
            raise RuntimeError(out.stderr[-2000:])
        return json.loads(out.stdout.strip().splitlines()[-1])

    try:
        mem = {v: child("--variant", v) for v in args.variants.split(",")}
        timing = {t["variant"]: t for t in child("--timing")}
    except RuntimeError as e:
        print(e, file=sys.stderr)
        return 1
    for v, row in mem.items():
        row.update(step_ms=timing[v]["step_ms"], step_ms_min=timing[v]["step_ms_min"],
                   repeats=args.repeats, timing="interleaved")
        print(json.dumps(row), flush=True)
        rows.append(row)
    base = next((r for r in rows if r["variant"] == "linear"), None)
    hdr = (f"{'variant':<12} {'saved MB':>9} {'vs linear':>9} {'unique MB':>9} {'vs linear':>9} "
           f"{'peak MB':>8} {'vs linear':>9} {'step ms':>8} {'vs linear':>9}")
    print(hdr, file=sys.stderr)
    for r in rows:
        def rel(key):
            return f"{r[key] / base[key]:.2f}x" if base and base[key] > 0 else "-"
        print(f"{r['variant']:<12} {r['saved_mb']:>9.1f} {rel('saved_mb'):>9} "
              f"{r['saved_unique_mb']:>9.1f} {rel('saved_unique_mb'):>9} {r['peak_mb']:>8.1f} "
              f"{rel('peak_mb'):>9} {r['step_ms']:>8.1f} {rel('step_ms'):>9}", file=sys.stderr)
    print(f"load average (1 min) at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
