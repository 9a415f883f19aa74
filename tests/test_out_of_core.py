"""Out-of-core quantisation of a sharded checkpoint (flows/out_of_core.py) and distributed
calibration (flows/distributed.py): the same output as the whole-model flow, one block in memory
at a time (peak RSS measured in a child process), atomic output and resume after a SIGKILL, and
two gloo ranks under torchrun giving the codes of one process."""
from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch

from layerpress.flows import load_quantized, quantize_model, save_quantized
from layerpress.flows import out_of_core
from layerpress.flows.io import _read_tensors
from layerpress.flows.out_of_core import quantize_checkpoint

from flows_testutils import VOCAB, calib_ids, tiny_model, transformers

pytestmark = pytest.mark.usefixtures("torch_single_thread")

qm_module = sys.modules["layerpress.flows.quantize_model"]  # the name is shadowed by the function

WORKER = Path(__file__).with_name("out_of_core_worker.py")
ARGS = dict(bits=3, group_size=32, axis="auto", method="gptq", outliers=0.01, lorc_rank=2)


def _sharded(model, path: Path, shard: str) -> Path:
    model.save_pretrained(str(path), max_shard_size=shard)
    assert (path / "model.safetensors.index.json").is_file()
    return path


def _tiny_checkpoint(tmp_path, family="llama", layers=3, tied=False):
    model = tiny_model(family, layers=layers)
    if tied:  # a config-built Llama with tied embeddings (the checkpoint stores them once)
        cfg = model.config
        cfg.tie_word_embeddings = True
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(cfg).eval()
    return _sharded(model, tmp_path / "src", "200KB")


def _assert_same_checkpoint(a: Path, b: Path):
    ta, tb = _read_tensors(a)[0], _read_tensors(b)[0]
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k
    qa = json.loads((a / "config.json").read_text())["quantization_config"]
    qb = json.loads((b / "config.json").read_text())["quantization_config"]
    for key in ("layers", "aliases", "model_class", "format_version", "digests"):
        assert qa[key] == qb[key], key  # digests: the sharded writer records the same ones


def _same_report(ra: dict, rb: dict):
    ra, rb = json.loads(json.dumps(ra)), json.loads(json.dumps(rb))  # as a child sends them
    ra.pop("time_s"), rb.pop("time_s")
    assert ra == rb


def _whole_model_run(src: Path, out: Path, **args):
    model = transformers.AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    # the out-of-core flow writes the parts separately: compare with the unfused whole-model flow
    report = quantize_model(model, fuse_projections=False, **args)
    save_quantized(model, out)
    return report


@pytest.mark.parametrize("family,tied", [("llama", False), ("llama", True), ("gpt2", False),
                                         ("opt", False)])
def test_out_of_core_equals_the_whole_model_flow(tmp_path, family, tied, monkeypatch):
    src = _tiny_checkpoint(tmp_path, family, tied=tied)
    ids = calib_ids()
    # only one block is alive while a block is quantised: the earlier ones were dropped
    alive, seen = [], []
    real_load = out_of_core._StreamedBlocks.load
    real_quantise = qm_module._quantise_block

    def load(self, bi):
        block = real_load(self, bi)
        alive.append(weakref.ref(block))
        return block

    def quantise(block, bi, *a, **kw):
        gc.collect()
        seen.append(sum(r() is not None for r in alive))
        assert next(block.parameters()).device.type == "cpu"
        return real_quantise(block, bi, *a, **kw)

    monkeypatch.setattr(out_of_core._StreamedBlocks, "load", load)
    monkeypatch.setattr(qm_module, "_quantise_block", quantise)
    # every option on the untied Llama; the others check the model plumbing (cheaper settings)
    args = ARGS if (family, tied) == ("llama", False) else dict(bits=4, group_size=32, axis="oc")
    report = quantize_checkpoint(src, tmp_path / "ooc", calib=ids, **args)
    assert seen == [1, 1, 1]
    monkeypatch.undo()
    whole = _whole_model_run(src, tmp_path / "whole", calib=ids, **args)
    _same_report(report.to_dict(), whole.to_dict())
    _assert_same_checkpoint(tmp_path / "ooc", tmp_path / "whole")
    # transformers reads the sharded output; it computes what the whole-model flow's model does
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "ooc")).eval()
    ref = load_quantized(tmp_path / "whole")
    with torch.no_grad():
        assert torch.equal(hf(ids[:2]).logits, ref(ids[:2]).logits)
    if tied:
        q = json.loads((tmp_path / "ooc" / "config.json").read_text())["quantization_config"]
        assert q["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}


def test_fractional_bits_stream_the_importance_scores(tmp_path):
    src = _tiny_checkpoint(tmp_path, layers=4)
    ids = calib_ids()
    for importance in ("lim", "zd"):
        args = dict(bits=3.5, group_size=32, axis="oc", method="rtn", importance=importance,
                    calib=ids)
        report = quantize_checkpoint(src, tmp_path / f"ooc_{importance}", **args)
        whole = _whole_model_run(src, tmp_path / f"whole_{importance}", **args)
        assert report.block_scores == pytest.approx(whole.block_scores, rel=1e-12, abs=1e-12)
        assert report.demoted == whole.demoted and len(report.demoted) == 2
        _assert_same_checkpoint(tmp_path / f"ooc_{importance}", tmp_path / f"whole_{importance}")


def test_out_of_core_refusals(tmp_path):
    src = _tiny_checkpoint(tmp_path)
    ids = calib_ids()
    with pytest.raises(ValueError, match="knapsack"):
        quantize_checkpoint(src, tmp_path / "o", calib=ids, allocation="knapsack")
    with pytest.raises(ValueError, match="hessian"):
        quantize_checkpoint(src, tmp_path / "o", calib=ids, bits=3.5, importance="hessian")
    with pytest.raises(ValueError, match="adapter"):
        quantize_checkpoint(src, tmp_path / "o", calib=ids, adapter=object())
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError, match="exists"):
        quantize_checkpoint(src, tmp_path / "exists", calib=ids)
    with pytest.raises(FileNotFoundError, match="neither model.safetensors"):
        quantize_checkpoint(tmp_path / "exists", tmp_path / "o", calib=ids)
    # a shard the index lists is missing
    index = json.loads((src / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (src / shard).rename(tmp_path / shard)
    with pytest.raises(FileNotFoundError, match=shard):
        quantize_checkpoint(src, tmp_path / "o", calib=ids)
    (tmp_path / shard).rename(src / shard)
    # a tensor the model needs is not in the checkpoint: named, and no output is left behind
    key = "model.layers.2.mlp.down_proj.weight"
    index["weight_map"].pop(key)
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(KeyError, match=key):
        quantize_checkpoint(src, tmp_path / "o", calib=ids, method="rtn", axis="oc")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists", "src"]


def _child(mode, src, out, result, args, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(WORKER), mode, str(src), str(out), str(result),
                           json.dumps(args)], env=env, capture_output=True, text=True, **kw)


def test_peak_memory_is_one_block_not_the_model(tmp_path):
    # A Llama of 8 blocks of hidden 512 (12 MiB of fp32 weights each; hidden 512 rather than
    # 1024 for the CI time) and a 32000-token vocabulary (62 MiB each for the embeddings and the
    # head), 220 MiB in shards of about 20 MB. A whole-model load holds all of it; out of core,
    # the child may grow by well under it (about a block's weights, its fp64 Hessians and one
    # linear's temporaries; the embedding rows the calibration touches).
    cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1536,
                                   num_hidden_layers=8, num_attention_heads=8,
                                   num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    src = _sharded(transformers.LlamaForCausalLM(cfg).eval(), tmp_path / "src", "20MB")
    model_bytes = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    args = dict(bits=4, group_size=128, axis="oc", method="rtn", clip=False, n=8,
                seq_len_ids=64, vocab=VOCAB)
    res = {}
    for mode in ("rss", "whole"):
        proc = _child(mode, src, tmp_path / mode, tmp_path / f"{mode}.json", args, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        res[mode] = json.loads((tmp_path / f"{mode}.json").read_text())
    grow = {m: (r["peak_kib"] - r["base_kib"]) * 1024 for m, r in res.items()}
    print(f"model {model_bytes / 2**20:.0f} MiB; peak RSS growth out of core "
          f"{grow['rss'] / 2**20:.0f} MiB, whole model {grow['whole'] / 2**20:.0f} MiB")
    assert grow["whole"] > model_bytes  # what a whole-model load needs
    assert grow["rss"] < 0.6 * model_bytes, grow
    _same_report(res["rss"]["report"], res["whole"]["report"])
    _assert_same_checkpoint(tmp_path / "rss", tmp_path / "whole")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "rss")).eval()
    ids = calib_ids(2, 16)
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, load_quantized(tmp_path / "whole")(ids).logits)


def test_sigkill_mid_run_then_resume_equals_uninterrupted(tmp_path):
    src = _tiny_checkpoint(tmp_path, layers=4)
    run = dict(ARGS, axis="oc", lorc_rank=0)  # resume with side paths: test_flows_resume.py
    args = dict(run, n=8, seq_len_ids=32, vocab=VOCAB)
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(WORKER), "slow", str(src), str(out), str(ckpt),
                             json.dumps(args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if line.strip() == "done 1":
                proc.send_signal(signal.SIGKILL)  # while block 2 is being quantised
                break
        proc.wait(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()[-3000:]
    # nothing complete-looking: no output directory, no config or index anywhere outside ckpt
    assert not out.exists()
    assert not [p for p in tmp_path.rglob("config.json") if ckpt not in p.parents and src not in p.parents]
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert not manifest["complete"] and 2 <= len(manifest["blocks"]) <= 3
    # resume (in this process) and compare with an uninterrupted run
    calib = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(1))
    resumed = quantize_checkpoint(src, out, calib=calib, checkpoint_dir=ckpt, resume=True, **run)
    fresh = quantize_checkpoint(src, tmp_path / "fresh", calib=calib, **run)
    _same_report(resumed.to_dict(), fresh.to_dict())
    _assert_same_checkpoint(out, tmp_path / "fresh")
    assert not (ckpt / out_of_core.OUTPUT_STAGING).exists()  # moved into place
    # a resume against another calibration set is refused with the reason
    with pytest.raises(ValueError, match="calibration data differ"):
        quantize_checkpoint(src, tmp_path / "other", calib=calib.flip(0), checkpoint_dir=ckpt,
                            resume=True, **run)


def test_torchrun_two_gloo_ranks_give_the_codes_of_one_process(tmp_path):
    src = _tiny_checkpoint(tmp_path, layers=2)
    args = dict(bits=4, group_size=32, axis="auto", method="gptq", outliers=0.01,
                n=8, seq_len_ids=32, vocab=VOCAB, batch_size=2)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(_free_port()), str(WORKER), "dist", str(src), str(tmp_path / "d"),
           str(tmp_path / "dist.json"), json.dumps(args)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    ranks = json.loads((tmp_path / "dist.json").read_text())
    calib = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(1))
    kw = {k: v for k, v in args.items() if k not in ("n", "seq_len_ids", "vocab")}
    one = quantize_checkpoint(src, tmp_path / "one_gptq", calib=calib, **kw)
    for r in ranks:  # both ranks report what one process reports
        _same_report(r["gptq_report"], one.to_dict())
    _assert_same_checkpoint(tmp_path / "d" / "gptq", tmp_path / "one_gptq")
    one_awq = _whole_model_run(src, tmp_path / "one_awq", calib=calib,
                               **dict(kw, method="awq", bits=3.5))
    for r in ranks:
        # sums over the ranks' batches: the LIM scores and the AWQ search errors are equal to
        # rounding (fp64 sums in another order); every choice made from them is the same
        a, b = json.loads(json.dumps(r["awq_report"])), json.loads(json.dumps(one_awq.to_dict()))
        assert a["block_scores"] == pytest.approx(b["block_scores"], rel=1e-12)
        for ga, gb in zip(a["awq_groups"], b["awq_groups"]):
            assert ga.pop("error") == pytest.approx(gb.pop("error"), rel=1e-9)
        for key in ("block_scores",):
            a.pop(key), b.pop(key)
        _same_report(a, b)
    _assert_same_checkpoint(tmp_path / "d" / "awq", tmp_path / "one_awq")
    for r in ranks:
        assert "seed: rank 0 0, rank 1 1" in r["refused_settings"]
        assert "calibration_data" in r["refused_calibration"]
    assert not (tmp_path / "d" / "bad_settings").exists()


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_out_of_core(tmp_path, capsys):
    from flows_testutils import minilm_dir
    from layerpress.cli.main import main

    model_dir = minilm_dir()
    flags = ["--method", "rtn", "--axis", "oc", "--no-clip", "--n-samples", "4", "--seq-len",
             "16", "--threads", "1"]
    assert main(["quantize", "--model", str(model_dir), "--out-of-core", *flags]) == 2
    assert "--out" in capsys.readouterr().err
    out = tmp_path / "out"
    assert main(["quantize", "--model", str(model_dir), "--out-of-core", "--out", str(out),
                 *flags]) == 0
    assert "saved to" in capsys.readouterr().out
    tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    model = transformers.AutoModel.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    quantize_model(model, method="rtn", axis="oc", clip=False, n_samples=4, seq_len=16,
                   tokenizer=tok, fuse_projections=False)
    save_quantized(model, tmp_path / "whole")
    _assert_same_checkpoint(out, tmp_path / "whole")
    assert (out / "tokenizer.json").is_file()
