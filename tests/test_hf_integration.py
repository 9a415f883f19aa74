"""The ``layerpress`` quantisation method in Hugging Face transformers: checkpoints written by
``save_quantized`` load through ``AutoModel*.from_pretrained`` onto ``QuantLinear`` with outputs
identical to the in-memory quantised model, and ``save_pretrained`` writes them back (readable by
``from_pretrained`` and ``load_quantized``). Tiny config-built models, no download."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from flows_testutils import FAMILIES, calib_ids, tiny_model
from layerpress import Layout, QuantLinear
from layerpress.flows import load_quantized, quantize_model, save_quantized

transformers = pytest.importorskip("transformers")
from layerpress.integrations.hf import LayerpressConfig  # noqa: E402  (needs transformers)

CAUSAL = ("llama", "qwen2", "opt", "gpt2")
BASE_ATTR = {"llama": "model", "qwen2": "model", "opt": "model", "gpt2": "transformer"}


@pytest.fixture(scope="module", autouse=True)
def _one_thread(torch_single_thread):
    yield


def _auto(family):
    return transformers.AutoModel if family == "bert" else transformers.AutoModelForCausalLM


def _out(model, ids):
    with torch.no_grad():
        o = model(input_ids=ids)
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


def _quant_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> (the in-memory quantised model, its save_quantized directory); built once."""
    cache = {}

    def get(family):
        if family not in cache:
            model = tiny_model(family)
            quantize_model(model, bits=4, group_size=32, calib=calib_ids(4, 16), method="rtn",
                           axis="auto", n_samples=4, seq_len=16)
            path = save_quantized(model, tmp_path_factory.mktemp(family) / "q")
            cache[family] = (model, path)
        return cache[family]

    return get


IDS = calib_ids(2, 12, seed=7)


@pytest.mark.parametrize("family", FAMILIES)
def test_from_pretrained_and_save_pretrained(family, saved, tmp_path):
    model, path = saved(family)
    ref = _out(model, IDS)

    loaded = _auto(family).from_pretrained(path)
    assert type(loaded) is type(model)
    assert isinstance(loaded.config.quantization_config, LayerpressConfig)
    got_layers, want_layers = _quant_layers(loaded), _quant_layers(model)
    assert got_layers.keys() == want_layers.keys() and got_layers
    for name, m in got_layers.items():
        assert m.spec == want_layers[name].spec, name
        assert m.layout == Layout.CPU_BITPLANE16, name  # repacked for the CPU kernel
    assert torch.equal(_out(loaded, IDS), ref)

    # save_pretrained of the loaded model: the same format, read back both ways
    loaded.save_pretrained(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    q = cfg["quantization_config"]
    assert q["quant_method"] == "layerpress" and q["layers"].keys() == want_layers.keys()
    assert torch.equal(_out(load_quantized(tmp_path / "hf"), IDS), ref)
    assert torch.equal(_out(_auto(family).from_pretrained(tmp_path / "hf"), IDS), ref)


@pytest.mark.parametrize("family", CAUSAL)
def test_automodel_loads_the_base_of_a_causal_checkpoint(family, saved):
    model, path = saved(family)
    base = transformers.AutoModel.from_pretrained(path)
    want = getattr(model, BASE_ATTR[family])
    assert type(base) is type(want)
    assert _quant_layers(base).keys() == _quant_layers(want).keys()
    with torch.no_grad():
        assert torch.equal(base(input_ids=IDS).last_hidden_state, want(input_ids=IDS).last_hidden_state)


def test_head_model_from_a_base_checkpoint(saved):
    model, path = saved("bert")  # saved as BertModel
    mlm = transformers.AutoModelForMaskedLM.from_pretrained(path)
    assert _quant_layers(mlm).keys() == {"bert." + n for n in _quant_layers(model)}
    with torch.no_grad():
        assert torch.equal(mlm.bert(input_ids=IDS).last_hidden_state, _out(model, IDS))


def test_generate(saved):
    model, path = saved("llama")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(path)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        got = loaded.generate(IDS, **kw)
        want = model.generate(IDS, **kw)
    assert got.shape == (2, IDS.shape[1] + 6)
    assert torch.equal(got, want)


def test_compile_decode(saved):
    """compile_decode: generate after from_pretrained runs the decode step as a compiled graph
    (static cache) and gives the eager tokens, with logits equal to fp32 rounding."""
    from layerpress.integrations.hf import compile_decode

    _, path = saved("llama")
    eager = transformers.AutoModelForCausalLM.from_pretrained(path)
    fast = compile_decode(transformers.AutoModelForCausalLM.from_pretrained(path))
    assert fast.generation_config.cache_implementation == "static"
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, output_logits=True,
              return_dict_in_generate=True)
    torch._dynamo.reset()
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch.no_grad():
        want = eager.generate(IDS, **kw)
        got = fast.generate(IDS, **kw)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > frames, "nothing was compiled"
    assert torch.equal(got.sequences, want.sequences)
    for g, w in zip(got.logits, want.logits):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
    with pytest.raises(TypeError, match="generation_config"):
        compile_decode(torch.nn.Linear(2, 2))


def test_bf16_activations(saved):
    model, path = saved("qwen2")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    layer = next(iter(_quant_layers(loaded).values()))
    assert layer.scales.dtype == torch.float16 and layer.bias.dtype == torch.bfloat16
    got, want = _out(loaded, IDS).float(), _out(model, IDS)
    assert ((got - want).norm() / want.norm()).item() < 0.03


def test_fresh_process_registration_and_load(saved, tmp_path):
    """A new interpreter: ``import layerpress`` does not import transformers, yet
    from_pretrained knows the method; its logits equal the in-memory model's."""
    model, path = saved("gpt2")
    out_file = tmp_path / "logits.pt"
    code = textwrap.dedent(f"""
        import sys, torch
        torch.set_num_threads(1)
        import layerpress
        assert "transformers" not in sys.modules, "import layerpress imported transformers"
        from transformers import AutoModelForCausalLM
        from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING
        assert AUTO_QUANTIZER_MAPPING["layerpress"].__name__ == "LayerpressHfQuantizer"
        m = AutoModelForCausalLM.from_pretrained({str(path)!r})
        ids = torch.tensor({IDS.tolist()!r})
        with torch.no_grad():
            torch.save(m(input_ids=ids).logits, {str(out_file)!r})
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert torch.equal(torch.load(out_file), _out(model, IDS))


# ---- bad input -----------------------------------------------------------------------------------

def _edit_config(path, fn):
    cfg_path = path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    fn(cfg["quantization_config"])
    cfg_path.write_text(json.dumps(cfg))


def _copy(path, tmp_path):
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(path, dst)
    return dst


def test_bad_config_is_refused(saved, tmp_path):
    _, path = saved("llama")
    bad = _copy(path, tmp_path)
    _edit_config(bad, lambda q: q.update(format_version=99))
    with pytest.raises(ValueError, match="format_version 99 is not supported"):
        transformers.AutoModelForCausalLM.from_pretrained(bad)
    _edit_config(bad, lambda q: q.update(format_version=1, layers={}))
    with pytest.raises(ValueError, match="layers is missing or empty"):
        transformers.AutoModelForCausalLM.from_pretrained(bad)
    with pytest.raises(ValueError, match=r"layers\['x'\] is invalid"):
        LayerpressConfig(layers={"x": {"in_features": 8}})
    with pytest.raises(ValueError, match="quant_method"):
        LayerpressConfig.from_dict({"quant_method": "gptq", "layers": {}})


def test_missing_tensor_is_refused(saved, tmp_path):
    from safetensors.torch import load_file, save_file

    _, path = saved("llama")
    bad = _copy(path, tmp_path)
    sd = load_file(str(bad / "model.safetensors"))
    del sd["model.layers.1.mlp.down_proj.qweight"]
    save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj\.qweight: missing from the checkpoint"):
        transformers.AutoModelForCausalLM.from_pretrained(bad)


def test_float_model_with_layerpress_config_is_refused(saved, tmp_path):
    _, path = saved("llama")
    tiny_model("llama").save_pretrained(tmp_path / "float")
    cfg = LayerpressConfig.from_dict(json.loads((path / "config.json").read_text())["quantization_config"])
    with pytest.raises(ValueError, match="already quantised"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "float", quantization_config=cfg)


@pytest.mark.skipif(not (hasattr(QuantLinear, "set_in_perm") and hasattr(QuantLinear, "set_side_paths")),
                    reason="QuantLinear has no input permutation / side paths in this version")
def test_permutation_and_side_paths(tmp_path):
    """Optional per-layer tensors (an input permutation, outliers, LoRC factors) load through
    from_pretrained and survive save_pretrained."""
    model = tiny_model("llama")
    quantize_model(model, bits=4, group_size=32, calib=calib_ids(4, 16), method="rtn", axis="oc",
                   n_samples=4, seq_len=16, fuse_projections=False)  # per-layer tensors set below
    g = torch.Generator().manual_seed(3)
    q = model.model.layers[0].self_attn.q_proj
    q.set_in_perm(torch.randperm(q.in_features, generator=g))
    o = model.model.layers[1].mlp.down_proj
    n, k = o.out_features, o.in_features
    idx = torch.randperm(n * k, generator=g)[:40].sort().values.to(torch.int32)
    o.set_side_paths(idx, torch.randn(40, generator=g).half(),
                     torch.randn(2, k, generator=g).half() * 0.1, torch.randn(n, 2, generator=g).half() * 0.1)
    ref = _out(model, IDS)
    save_quantized(model, tmp_path / "q")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    lq, lo = loaded.model.layers[0].self_attn.q_proj, loaded.model.layers[1].mlp.down_proj
    assert torch.equal(lq.in_perm, q.in_perm)
    assert lo.outlier_count == 40 and lo.lorc_rank == 2
    assert torch.equal(_out(loaded, IDS), ref)
    loaded.save_pretrained(tmp_path / "hf")
    assert torch.equal(_out(load_quantized(tmp_path / "hf"), IDS), ref)
    assert torch.equal(_out(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf"), IDS), ref)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_dequantize(exact_cpu_gemm_variant, family, saved):
    """model.dequantize(): float linears (GPT-2: Conv1D) with the dequantised weights; the same
    outputs up to float rounding, and the quantisation config is gone."""
    model, path = saved(family)
    loaded = _auto(family).from_pretrained(path)
    from layerpress.nn.fused import unfuse
    parts = copy.deepcopy(loaded)
    unfuse(parts)  # the fused projections' parts are what become float linears
    want = {n: m.dequantized_weight() for n, m in _quant_layers(parts).items()}
    loaded.dequantize()
    assert not _quant_layers(loaded) and not hasattr(loaded.config, "quantization_config")
    for name, w in want.items():
        layer = loaded.get_submodule(name)
        got = layer.weight.t() if family == "gpt2" else layer.weight
        assert type(layer).__name__ == ("Conv1D" if family == "gpt2" else "Linear")
        assert torch.equal(got, w), name
    got, ref = _out(loaded, IDS), _out(model, IDS)
    assert ((got - ref).norm() / ref.norm()).item() < 1e-5


def test_quantised_head(tmp_path):
    """A quantised lm_head loads with the causal model and is left out of its base model."""
    from layerpress import QuantSpec

    model = tiny_model("llama")
    assert not model.config.tie_word_embeddings
    quantize_model(model, bits=4, group_size=32, calib=calib_ids(4, 16), method="rtn", axis="oc",
                   n_samples=4, seq_len=16)
    model.lm_head = QuantLinear.from_linear(model.lm_head, QuantSpec(bits=8, group_size=32))
    save_quantized(model, tmp_path / "q")
    causal = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert isinstance(causal.lm_head, QuantLinear) and causal.lm_head.spec.bits == 8
    # the config has no dtype; "lm_head.scales" (fp16) is the checkpoint's first float tensor
    assert causal.dtype == torch.float32
    assert torch.equal(_out(causal, IDS), _out(model, IDS))
    base = transformers.AutoModel.from_pretrained(tmp_path / "q")
    assert _quant_layers(base).keys() == {n[len("model."):] for n in _quant_layers(model) if n != "lm_head"}
    with torch.no_grad():
        assert torch.equal(base(input_ids=IDS).last_hidden_state, model.model(input_ids=IDS).last_hidden_state)


def test_sharded_save_pretrained_loads(saved, tmp_path):
    """save_pretrained shards a large model (model-0000i-of-0000n.safetensors + an index);
    load_quantized reads the shards, and refuses a missing shard or a key its shard lacks."""
    model, path = saved("llama")
    ref = _out(model, IDS)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(path)
    out = tmp_path / "sharded"
    loaded.save_pretrained(out, max_shard_size="20KB")
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and not (out / "model.safetensors").exists()
    assert torch.equal(_out(load_quantized(out), IDS), ref)
    assert torch.equal(_out(transformers.AutoModelForCausalLM.from_pretrained(out), IDS), ref)

    index = json.loads((out / "model.safetensors.index.json").read_text())
    key, shard = next(iter(index["weight_map"].items()))
    (out / shard).rename(out / "moved.safetensors")
    with pytest.raises(FileNotFoundError, match=f"{shard} is missing"):
        load_quantized(out)
    (out / "moved.safetensors").rename(out / shard)
    index["weight_map"][key + ".nope"] = shard
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"\.nope' is missing"):
        load_quantized(out)
    (out / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a safetensors index"):
        load_quantized(out)
