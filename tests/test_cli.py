"""`layerpress eval`, `inspect` and the allocation/plot flags of `quantize`, run in-process
through cli.main: exit codes and messages (user errors: one line on stderr, status 2, no
traceback) and the figures printed against independent computations."""
from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

from flows_testutils import VOCAB, calib_ids, tiny_model
from layerpress.cli import main
from layerpress.flows import load_quantized, quantize_model, save_quantized
from layerpress.flows.evaluate import embedding_fidelity, perplexity, sentence_embeddings


def byte_tokenizer():
    """A byte-level tokenizer with exactly VOCAB = 256 ids (one per byte), so the config-built
    tiny models can read text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    assert len(alphabet) == VOCAB
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    pad = sorted(alphabet)[0]
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=pad, eos_token=pad, bos_token=pad)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{family: (quantised dir, original dir)} for a tiny Llama and a tiny BERT."""
    root = tmp_path_factory.mktemp("cli")
    out = {}
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for family in ("llama", "bert"):
            orig = root / f"{family}-orig"
            model = tiny_model(family, layers=2)
            model.save_pretrained(orig)
            byte_tokenizer().save_pretrained(orig)
            quantize_model(model, bits=3.5, group_size=32, method="rtn", calib=calib_ids(4, 16),
                           allocation="knapsack", widths=(3, 4))
            q = save_quantized(model, root / f"{family}-q", extra={"bits_target": 3.5,
                                                                   "allocation": "knapsack"})
            out[family] = (q, orig)
    finally:
        torch.set_num_threads(old)
    return out


@pytest.fixture(autouse=True, scope="module")
def _one_thread(torch_single_thread):
    """(--threads sets the process-wide count; the fixture restores it after this module)"""
    yield


def _run(capsys, *argv):
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _user_error(capsys, match, *argv):
    rc, out, err = _run(capsys, *argv)
    assert rc == 2, (rc, out, err)
    # (progress bars of Hugging Face loading may precede it on stderr)
    lines = err.strip().splitlines()
    assert "Traceback" not in err and lines[-1].startswith("layerpress: error: "), err
    assert sum("error" in ln for ln in lines) == 1 and re.search(match, lines[-1]), err
    return err


def test_inspect(saved, capsys):
    qdir, _ = saved["llama"]
    rc, out, _ = _run(capsys, "inspect", qdir, "--json")
    assert rc == 0
    info = json.loads(out)
    cfg = json.loads((qdir / "config.json").read_text())["quantization_config"]["layers"]
    for name, entry in list(cfg.items()):  # a fused layer is listed as its parts
        if "fused" in entry:
            parent = name.rpartition(".")[0]
            for part, n in zip(entry["fused"]["parts"], entry["fused"]["part_sizes"]):
                cfg[f"{parent}.{part}"] = {**entry, "out_features": n}
            del cfg[name]
    assert sorted(lay["name"] for lay in info["layers"]) == sorted(cfg)
    w = bits = eff = 0
    for lay in info["layers"]:
        spec = cfg[lay["name"]]["spec"]
        n, k = cfg[lay["name"]]["out_features"], cfg[lay["name"]]["in_features"]
        assert (lay["bits"], lay["axis"], lay["group_size"]) == (spec["bits"], spec["axis"], spec["group_size"])
        # codes + fp16 scale + uint8 zero per group of 32
        assert lay["effective_bits"] == pytest.approx(spec["bits"] + 24 / 32)
        assert lay["bytes"] == n * k * spec["bits"] // 8 + n * k // 32 * 3
        w, bits, eff = w + n * k, bits + spec["bits"] * n * k, eff + lay["effective_bits"] * n * k
    t = info["totals"]
    assert t["quantized_weights"] == w and t["average_code_bits"] == pytest.approx(bits / w)
    assert t["average_effective_bits"] == pytest.approx(eff / w) and t["average_code_bits"] <= 3.5
    assert {lay["bits"] for lay in info["layers"]} == {3, 4}
    rc, out, _ = _run(capsys, "inspect", qdir)
    assert rc == 0 and "model.layers.0.self_attn.q_proj" in out
    assert f"{t['average_effective_bits']:.3f} effective bits per weight" in out
    assert "target 3.5 bits (knapsack)" in out


def test_inspect_and_eval_errors(saved, tmp_path, capsys):
    qdir, orig = saved["llama"]
    for cmd in ("inspect", "eval"):
        _user_error(capsys, "not a directory", cmd, tmp_path / "missing")
    _user_error(capsys, "no layerpress quantization_config", "inspect", orig)  # unquantised model

    def copy(name):
        d = tmp_path / name
        shutil.copytree(qdir, d)
        return d

    d = copy("truncated")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 3])
    for cmd in ("inspect", "eval"):
        _user_error(capsys, "truncated or corrupt", cmd, d)
    d = copy("mismatch")
    cfg = json.loads((d / "config.json").read_text())
    name = next(iter(cfg["quantization_config"]["layers"]))
    spec = cfg["quantization_config"]["layers"][name]["spec"]
    spec["bits"] = 8 if spec["bits"] != 8 else 4
    (d / "config.json").write_text(json.dumps(cfg))
    _user_error(capsys, "do not match", "inspect", d)
    _user_error(capsys, "needs --reference", "eval", qdir, "--calib", tmp_path / "x.txt")
    _user_error(capsys, "no config.json", "eval", qdir, "--reference", tmp_path)
    _user_error(capsys, "no tokenizer", "eval", qdir)  # saved without one, no --reference
    (tmp_path / "empty.txt").write_text("# nothing\n")
    _user_error(capsys, "--text: no text", "eval", qdir, "--reference", orig, "--text",
                tmp_path / "empty.txt")


def test_eval_causal(saved, tmp_path, capsys):
    qdir, orig = saved["llama"]
    text = tmp_path / "eval.txt"
    text.write_text("\n".join(f"Line {i}: the quick brown fox jumps over the lazy dog." for i in range(20)))
    rc, out, err = _run(capsys, "eval", qdir, "--reference", orig, "--text", text, "--calib", text,
                        "--n-samples", 4, "--seq-len", 32, "--threads", 1)
    assert rc == 0, err
    tok = byte_tokenizer()
    texts = text.read_text().splitlines()
    ppl_q = perplexity(load_quantized(qdir), tok, texts=texts, seq_len=32)
    ppl_r = perplexity(tiny_model("llama", layers=2), tok, texts=texts, seq_len=32)
    assert f"quantised {ppl_q:.3f}, reference {ppl_r:.3f}" in out
    rows = re.findall(r"^(model\.layers\.\d\.\S+)\s+(\d)\s+(oc|ic)\s+([0-9.]+)$", out, re.M)
    assert len(rows) == 14
    for _, bits, _, e in rows:  # RTN W3/W4 g32 on a random model: a few to ~20 percent
        assert 0.01 < float(e) < (0.3 if bits == "3" else 0.15)


def test_eval_encoder(saved, capsys):
    qdir, orig = saved["bert"]
    rc, out, err = _run(capsys, "eval", qdir, "--reference", orig)
    assert rc == 0, err
    tok = byte_tokenizer()
    fid = embedding_fidelity(sentence_embeddings(tiny_model("bert", layers=2), tok),
                             sentence_embeddings(load_quantized(qdir), tok))
    assert f"mean cos {fid['mean_cos']:.4f}, min cos {fid['min_cos']:.4f}" in out
    shutil.copy(orig / "tokenizer.json", qdir / "tokenizer.json")
    shutil.copy(orig / "tokenizer_config.json", qdir / "tokenizer_config.json")
    rc, out, _ = _run(capsys, "eval", qdir)
    assert rc == 0 and "needs the full-precision model" in out


def test_quantize_allocation_flags(saved, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    _, orig = saved["llama"]
    common = ["quantize", "--model", str(orig), "--method", "rtn", "--group-size", "32",
              "--n-samples", "4", "--seq-len", "16", "--threads", "1"]
    _user_error(capsys, r"bits=1.5 is unreachable with widths \(2, 3, 4, 8\)",
                *common, "--bits", "1.5", "--allocation", "knapsack")
    _user_error(capsys, "widths is for --allocation knapsack", *common, "--widths", "3,4")
    with pytest.raises(SystemExit):
        main(common + ["--allocation", "knapsack", "--widths", "3,5"])
    capsys.readouterr()
    rc, out, err = _run(capsys, *common, "--bits", "3.25", "--allocation", "knapsack",
                        "--plots", tmp_path / "plots", "--importance", "zd", "--out", tmp_path / "q")
    assert rc == 0, err
    assert re.search(r"forward time, fp32 -> quantised .*1 sequence \(16 tokens\) [\d.]+ -> [\d.]+ ms", out), out
    assert re.search(r"knapsack over widths \(2, 3, 4, 8\) \(RTN output error\), linears per "
                     r"width W\d: \d+", out), out
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["bits.png", "scores.png"]
    rc, out, _ = _run(capsys, "inspect", tmp_path / "q", "--json")
    t = json.loads(out)["totals"]
    assert t["allocation"] == "knapsack" and t["average_code_bits"] <= 3.25


def test_threads_flag_does_not_leak_into_the_caller(saved, capsys):
    import torch
    _, orig = saved["llama"]
    before = torch.get_num_threads()
    other = 1 if before != 1 else 2
    rc, _, err = _run(capsys, "quantize", "--model", str(orig), "--method", "rtn", "--group-size",
                      "32", "--n-samples", "2", "--seq-len", "16", "--threads", str(other))
    assert rc == 0, err
    assert torch.get_num_threads() == before
