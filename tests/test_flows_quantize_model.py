"""quantize_model, save/load and evaluation (layerpress.flows) on tiny config-built models and
the real all-MiniLM-L6-v2."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from flows_testutils import (FAMILIES, calib_ids, minilm_dir, model_output, quantised_linear_count,
                             tiny_model)
from layerpress.flows import load_quantized, quantize_model, save_quantized
from layerpress.flows.evaluate import embedding_fidelity, perplexity, sentence_embeddings


@pytest.fixture(scope="module", autouse=True)
def _one_thread(torch_single_thread):
    yield


_out = model_output


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_quantize_model_families(family, method):
    model = tiny_model(family)
    ids = calib_ids()
    y0 = _out(model, ids[:2])
    rep = quantize_model(model, bits=4, calib=ids, method=method, axis="auto")
    assert quantised_linear_count(model) == len(rep.layers) > 0  # fused parts counted each
    assert any(r["fused"] for r in rep.fusion) == (family != "gpt2")
    assert all(layer.bits == 4 for layer in rep.layers)
    assert all(0 <= layer.rel_error < 0.2 for layer in rep.layers)
    # auto: both axes measured wherever both are valid, and the lower MSE chosen
    for layer in rep.layers:
        if len(layer.axis_mse) == 2:
            assert layer.axis_mse[layer.axis] == min(layer.axis_mse.values())
    y1 = _out(model, ids[:2])
    assert ((y1 - y0).norm() / y0.norm()).item() < 0.2
    json.dumps(rep.to_dict())


def test_gptq_model_error_below_rtn():
    ids = calib_ids(16, 32)
    errs = {}
    for method in ("rtn", "gptq"):
        model = tiny_model("llama")
        rep = quantize_model(model, bits=3, calib=ids, method=method, axis="oc")
        errs[method] = sum(layer.rel_error for layer in rep.layers)
    assert errs["gptq"] < errs["rtn"]


@pytest.mark.parametrize("importance", ["lim", "zd"])
def test_fractional_bits(importance):
    model = tiny_model("llama", layers=4)
    rep = quantize_model(model, bits=3.5, calib=calib_ids(), method="rtn", axis="oc",
                         importance=importance)
    assert sorted(rep.block_bits) == [3, 3, 4, 4] and rep.average_bits == pytest.approx(3.5)
    assert len(rep.block_scores) == 4 and len(rep.demoted) == 2
    for layer in rep.layers:
        assert layer.bits == rep.block_bits[layer.block]
    with pytest.raises(ValueError, match="unreachable|not supported"):
        quantize_model(tiny_model("llama"), bits=1.5, calib=calib_ids(), method="rtn")


def test_quantize_model_bad_arguments():
    with pytest.raises(ValueError, match="method"):
        quantize_model(tiny_model("llama"), method="hqq", calib=calib_ids())
    with pytest.raises(ValueError, match="axis"):
        quantize_model(tiny_model("llama"), axis="row", calib=calib_ids())
    with pytest.raises(ValueError, match="tokenizer"):
        quantize_model(tiny_model("llama"), calib=["Some text."])


_CHILD = textwrap.dedent("""
    import sys, torch
    from safetensors.torch import load_file, save_file
    from layerpress.flows import load_quantized
    torch.set_num_threads(1)
    for saved, ids_path, out_path in zip(*[iter(sys.argv[1:])] * 3):
        model = load_quantized(saved)
        ids = load_file(ids_path)["ids"]
        with torch.no_grad():
            o = model(input_ids=ids)
        y = o.logits if hasattr(o, "logits") else o.last_hidden_state
        save_file({"y": y.contiguous()}, out_path)
""")


def _fresh_process_outputs(tmp_path, jobs):
    """Loads each saved model in one fresh Python process and returns its outputs on the ids:
    jobs = [(saved dir, ids)]."""
    from safetensors.torch import load_file, save_file
    argv = []
    for i, (saved, ids) in enumerate(jobs):
        save_file({"ids": ids.contiguous()}, str(tmp_path / f"ids{i}.safetensors"))
        argv += [str(saved), str(tmp_path / f"ids{i}.safetensors"), str(tmp_path / f"y{i}.safetensors")]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-c", _CHILD, *argv], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return [load_file(str(tmp_path / f"y{i}.safetensors"))["y"] for i in range(len(jobs))]


def test_save_load_fresh_process_identical(tmp_path):
    """Llama (fractional bits: W4 and W3 layers), Qwen2, OPT and GPT-2 (Conv1D, tied head):
    quantise, save, load in a fresh process -> identical outputs; also into a model built from
    the original architecture in this process."""
    ids = calib_ids()
    jobs, expected = [], []
    for family in ("llama", "qwen2", "opt", "gpt2"):
        model = tiny_model(family)
        quantize_model(model, bits=3.5 if family == "llama" else 4, calib=ids, method="gptq",
                       high_bits=4, low_bits=3)
        saved = save_quantized(model, tmp_path / family)
        assert sorted(os.listdir(saved)) == ["config.json", "model.safetensors"]
        y = _out(model, ids[:2])
        again = load_quantized(saved, model=tiny_model(family, seed=5))
        assert torch.equal(_out(again, ids[:2]), y)
        jobs.append((saved, ids[:2]))
        expected.append(y)
    for got, want in zip(_fresh_process_outputs(tmp_path, jobs), expected):
        assert torch.equal(got, want)


def test_save_is_atomic_and_refuses_overwrite(tmp_path):
    model = tiny_model("bert")
    quantize_model(model, bits=4, calib=calib_ids(), method="rtn")
    save_quantized(model, tmp_path / "q")
    with pytest.raises(FileExistsError):
        save_quantized(model, tmp_path / "q")
    save_quantized(model, tmp_path / "q", overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["q"]  # no temporary directories left behind
    with pytest.raises(ValueError, match="no QuantLinear"):
        save_quantized(tiny_model("bert"), tmp_path / "r")
    assert sorted(os.listdir(tmp_path)) == ["q"]


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_quantized(tmp_path / "missing")
    model = tiny_model("llama")
    quantize_model(model, bits=4, calib=calib_ids(), method="rtn")
    good = save_quantized(model, tmp_path / "good")

    def copy(name):
        import shutil
        d = tmp_path / name
        shutil.copytree(good, d)
        return d

    d = copy("truncated")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_quantized(d)

    d = copy("badspec")
    cfg = json.loads((d / "config.json").read_text())
    name = next(iter(cfg["quantization_config"]["layers"]))
    cfg["quantization_config"]["layers"][name]["spec"]["bits"] = 3
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="do not match"):
        load_quantized(d)

    d = copy("extralayer")
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"]["layers"]["model.layers.0.mlp.nope"] = \
        cfg["quantization_config"]["layers"][name]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="does not have"):
        load_quantized(d)

    d = copy("nojson")
    (d / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="invalid JSON"):
        load_quantized(d)

    d = copy("noweights")
    (d / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        load_quantized(d)

    with pytest.raises(ValueError, match="saved from a LlamaForCausalLM"):
        load_quantized(good, model=tiny_model("opt"))


def test_perplexity_and_fidelity_helpers():
    model = tiny_model("llama")
    ids = calib_ids(4, 16)
    ppl = perplexity(model, input_ids=ids)
    assert 100 < ppl < 1000  # an untrained 256-token model: about the vocabulary size
    e = torch.randn(10, 8)
    f = embedding_fidelity(e, e)
    assert f["mean_cos"] == pytest.approx(1) and f["nn_agreement"] == 1
    f = embedding_fidelity(e, -e)
    assert f["mean_cos"] == pytest.approx(-1)
    with pytest.raises(ValueError):
        embedding_fidelity(e, e[:5])


def test_minilm_end_to_end(tmp_path):
    """The real all-MiniLM-L6-v2: W4 g128 RTN + AdaDim on the built-in sentences keeps the
    held-out sentence embeddings close; save + load in a fresh process gives identical outputs."""
    from transformers import AutoModel, AutoTokenizer
    d = minilm_dir()
    tok = AutoTokenizer.from_pretrained(str(d))
    model = AutoModel.from_pretrained(str(d)).eval()
    ref = sentence_embeddings(model, tok)
    rep = quantize_model(model, bits=4, tokenizer=tok, method="rtn", axis="auto", n_samples=16)
    assert len(rep.layers) == 36 and {layer.axis for layer in rep.layers} == {"oc", "ic"}
    fid = embedding_fidelity(ref, sentence_embeddings(model, tok))
    assert fid["mean_cos"] > 0.95 and fid["nn_agreement"] >= 0.75, fid
    saved = save_quantized(model, tmp_path / "minilm-w4")
    ids = tok(["A short test sentence."], return_tensors="pt")["input_ids"]
    assert torch.equal(_fresh_process_outputs(tmp_path, [(saved, ids)])[0], _out(model, ids))


def test_cli_quantize_errors(tmp_path, capsys):
    from layerpress.cli import main
    assert main(["quantize", "--model", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    assert main(["quantize", "--model", str(tmp_path)]) == 2
    assert "not supported" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["quantize", "--bits", "zero"])


def test_axis_selected_with_rtn_then_gptq():
    ids = calib_ids()
    a = quantize_model(tiny_model("opt"), calib=ids, method="rtn", axis="auto")
    b = quantize_model(tiny_model("opt"), calib=ids, method="gptq", axis="auto", select_with="rtn")
    # block 0 sees the same inputs in both runs (later blocks see differently quantised ones)
    first = [(la.axis, la.axis_mse) for la in a.layers if la.block == 0]
    assert first == [(lb.axis, lb.axis_mse) for lb in b.layers if lb.block == 0]
    assert sum(layer.rel_error for layer in b.layers) < sum(layer.rel_error for layer in a.layers)
    with pytest.raises(ValueError, match="select_with"):
        quantize_model(tiny_model("opt"), calib=ids, select_with="gptq")


def test_saved_config_records_the_model_dtype(tmp_path):
    """A config-built model has no dtype in its config; the saved one names the model's float
    dtype (else transformers' dtype="auto" would pick the fp16 scales' dtype)."""
    import json as _json
    model = tiny_model("llama")
    assert getattr(model.config, "dtype", None) in (None, torch.float32)
    quantize_model(model, bits=4, calib=calib_ids(), method="rtn", axis="oc")
    cfg = _json.loads((save_quantized(model, tmp_path / "m") / "config.json").read_text())
    assert cfg.get("dtype") == "float32" or cfg.get("torch_dtype") == "float32", cfg.get("dtype")


def test_quantize_settings_are_the_keyword_api_validated():
    """QuantizeSettings has quantize_model's keyword arguments (names and defaults), rejects a bad
    one at construction, and records what a checkpoint manifest keeps: every argument but those
    that do not change the result."""
    import inspect

    from layerpress.flows.checkpoint import _NOT_RECORDED
    from layerpress.flows.quantize_model import QuantizeSettings

    params = dict(inspect.signature(quantize_model).parameters)
    params.pop("model")
    fields = inspect.signature(QuantizeSettings).parameters
    assert {n: p.default for n, p in params.items()} == {n: p.default for n, p in fields.items()}
    for bad in (dict(method="foo"), dict(axis="x"), dict(bits=0), dict(select_with="x"),
                dict(allocation="x"), dict(outliers=1.5)):
        with pytest.raises(ValueError):
            QuantizeSettings(**bad)
    recorded = QuantizeSettings(bits=3.5, scale_dtype=torch.bfloat16).recorded()
    assert set(recorded) == set(params) - set(_NOT_RECORDED)
    assert recorded["bits"] == 3.5 and recorded["scale_dtype"] == "bfloat16"
