"""Model adapters, calibration data and block-by-block capture (layerpress.flows)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from flows_testutils import FAMILIES, calib_ids, minilm_dir, tiny_model
from layerpress.flows.calibration import (capture_block_inputs, default_texts, load_texts,
                                          run_block, tokenize_texts)
from layerpress.flows.models import adapter_for, get_submodule, is_conv1d, weight_oi

EXPECTED = {"llama": 7, "qwen2": 7, "opt": 6, "gpt2": 4, "bert": 6}


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_structure(family):
    model = tiny_model(family)
    ad = adapter_for(model)
    blocks = ad.blocks()
    assert len(blocks) == 2
    for block in blocks:
        lins = ad.linears(block)
        assert len(lins) == EXPECTED[family]
        for name, m in lins.items():
            assert isinstance(m, nn.Linear) or is_conv1d(m)
            assert weight_oi(m).shape[1] == (m.in_features if isinstance(m, nn.Linear) else m.weight.shape[0])
            point = ad.measure_point(name)
            assert point == "" or name == point or name.startswith(point + "."), (name, point)
            get_submodule(block, point)
        for grp in ad.scaling_groups(block):
            prev = get_submodule(block, grp.prev)
            assert grp.fold in ("norm", "linear", "activation")
            if grp.fold == "linear":
                assert grp.prev in lins
            elif grp.fold == "norm":
                assert "norm" in type(prev).__name__.lower()
            get_submodule(block, grp.inspect)
            for lin in grp.linears:
                assert lin in lins
    assert ad.kind == ("encoder" if family == "bert" else "causal")


def test_adapter_gpt2_conv1d_is_in_out():
    model = tiny_model("gpt2")
    lins = adapter_for(model).linears(adapter_for(model).blocks()[0])
    c_fc = lins["mlp.c_fc"]
    assert is_conv1d(c_fc) and tuple(weight_oi(c_fc).shape) == (512, 128)


def test_adapter_unsupported_model():
    with pytest.raises(NotImplementedError, match="supported model types"):
        adapter_for(nn.Linear(4, 4))
    from transformers import T5Config, T5Model
    with pytest.raises(NotImplementedError, match="'t5'"):
        adapter_for(T5Model(T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, vocab_size=64,
                                     d_kv=16)))


def test_default_texts():
    cal, held = default_texts("calibration"), default_texts("heldout")
    assert len(cal) >= 60 and len(held) >= 60
    assert not set(cal) & set(held)
    assert all(len(t.split()) >= 6 for t in cal + held)
    with pytest.raises(ValueError):
        default_texts("train")


def test_load_texts(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("# comment\nFirst line.\n\nSecond line.\n", encoding="utf-8")
    assert load_texts(p) == ["First line.", "Second line."]
    with pytest.raises(FileNotFoundError, match="not found"):
        load_texts(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("# only a comment\n")
    with pytest.raises(ValueError, match="no text"):
        load_texts(tmp_path / "empty.txt")


def test_tokenize_texts_minilm():
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(minilm_dir()))
    ids = tokenize_texts(tok, n_samples=5, seq_len=40)
    assert ids.shape == (5, 40)
    assert (ids[:, 0] == tok.cls_token_id).all() and (ids[:, -1] == tok.sep_token_id).all()
    assert torch.equal(ids, tokenize_texts(tok, n_samples=5, seq_len=40))  # seeded
    with pytest.raises(ValueError, match="too short"):
        tokenize_texts(tok, ["Too short."], n_samples=2, seq_len=64)


@pytest.mark.parametrize("family", FAMILIES)
def test_capture_and_run_blocks_reproduce_hidden_states(family):
    model = tiny_model(family)
    ad = adapter_for(model)
    ids = calib_ids(6, 16)
    inputs = capture_block_inputs(model, ids, ad, batch_size=4)
    assert len(inputs) == 2 and inputs.hidden[0].shape[:2] == (4, 16)
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    hs = out.hidden_states
    assert torch.allclose(torch.cat(inputs.hidden), hs[0], atol=1e-6)
    h = run_block(ad.blocks()[0], inputs)
    assert torch.allclose(torch.cat(h), hs[1], atol=1e-5)
