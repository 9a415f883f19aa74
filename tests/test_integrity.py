"""Per-tensor digests of saved models (flows/integrity.py): recorded by save_quantized, the
interop converters and save_pretrained; checked by load_quantized and from_pretrained; the
``layerpress verify`` command."""
from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch

from flows_testutils import calib_ids, tiny_model
from layerpress.cli.main import main as cli_main
from layerpress.flows import load_quantized, quantize_model, save_quantized
from layerpress.flows.integrity import DIGEST_ALGORITHM, IntegrityError, tensor_digest
from layerpress.flows.io import verify_directory

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = tiny_model("llama")
    quantize_model(model, bits=4, calib=calib_ids(4, 16), method="rtn", axis="oc",
                   fuse_projections=False)  # the tests name per-layer tensors
    path = save_quantized(model, tmp_path_factory.mktemp("integrity") / "q")
    return model, path


def _copy(path, tmp_path, name="copy"):
    dst = tmp_path / name
    shutil.copytree(path, dst)
    return dst


def _header(file):
    raw = file.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return n, json.loads(raw[8:8 + n])


def _flip_bit(file, key, byte=0, bit=3):
    n, hdr = _header(file)
    start = 8 + n + hdr[key]["data_offsets"][0] + byte
    raw = bytearray(file.read_bytes())
    raw[start] ^= 1 << bit
    file.write_bytes(bytes(raw))


def test_digests_recorded_for_every_stored_tensor(saved):
    _, path = saved
    q = json.loads((path / "config.json").read_text())["quantization_config"]
    assert q["digests"]["algorithm"] == DIGEST_ALGORITHM
    _, hdr = _header(path / "model.safetensors")
    stored = {k for k in hdr if k != "__metadata__"}
    assert set(q["digests"]["tensors"]) == stored
    from safetensors.torch import load_file
    sd = load_file(str(path / "model.safetensors"))
    assert all(q["digests"]["tensors"][k] == tensor_digest(v) for k, v in sd.items())


def test_digest_covers_dtype_shape_and_bytes():
    t = torch.arange(8, dtype=torch.int32)
    d = tensor_digest(t)
    assert d == tensor_digest(t.clone()) and len(d) == 32
    assert d != tensor_digest(t.view(torch.float32))  # same bytes, other dtype
    assert d != tensor_digest(t.reshape(2, 4))        # same bytes, other shape
    u = t.clone()
    u.view(torch.uint8)[5] ^= 1
    assert d != tensor_digest(u)
    assert tensor_digest(torch.empty(0, 3)) != tensor_digest(torch.empty(3, 0))
    assert tensor_digest(t[::2]) == tensor_digest(t[::2].contiguous())  # as stored


@pytest.mark.parametrize("key", ["model.layers.0.self_attn.q_proj.qweight", "model.layers.1.mlp.down_proj.scales",
                                 "model.embed_tokens.weight", "model.norm.weight"])
def test_flipped_payload_bit_is_caught_naming_tensor_and_file(saved, tmp_path, key):
    model, path = saved
    bad = _copy(path, tmp_path)
    _flip_bit(bad / "model.safetensors", key, byte=1)
    with pytest.raises(IntegrityError, match=rf"model\.safetensors: tensor '{key}' does not match its recorded digest"):
        load_quantized(bad)
    # verify=False: loads, and the flip really changed the model
    m = load_quantized(bad, verify=False)
    before = model.state_dict()[key] if key in model.state_dict() else None
    if before is not None:
        assert not torch.equal(m.state_dict()[key], before)


def test_retyped_header_is_caught(saved, tmp_path):
    # F32 -> I32 in the header: same size, so safetensors reads it and load_state_dict would cast
    # the integers into the float embedding silently
    _, path = saved
    bad = _copy(path, tmp_path)
    f = bad / "model.safetensors"
    raw = f.read_bytes()
    n, hdr = _header(f)
    text = raw[8:8 + n].decode()
    entry = json.dumps(hdr["model.embed_tokens.weight"], separators=(",", ":"))
    assert entry in text and '"F32"' in entry
    f.write_bytes(raw[:8] + text.replace(entry, entry.replace('"F32"', '"I32"')).encode() + raw[8 + n:])
    load_quantized(bad, verify=False)  # loads silently without the check
    with pytest.raises(IntegrityError, match="model.embed_tokens.weight"):
        load_quantized(bad)


def test_directory_without_digests_loads_with_a_notice(saved, tmp_path):
    _, path = saved
    old = _copy(path, tmp_path)
    cfg = json.loads((old / "config.json").read_text())
    del cfg["quantization_config"]["digests"]
    (old / "config.json").write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match="saved without tensor digests") as rec:
        load_quantized(old)
    assert len(rec) == 1 and "\n" not in str(rec[0].message)


def test_malformed_digests_entry_is_refused(saved, tmp_path):
    _, path = saved
    bad = _copy(path, tmp_path)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"]["digests"] = {"algorithm": "md5", "tensors": {}}
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="quantization_config.digests is malformed"):
        load_quantized(bad)


def test_sharded_save_pretrained_digests_and_from_pretrained(saved, tmp_path):
    _, path = saved
    model = transformers.AutoModelForCausalLM.from_pretrained(path)  # through the quantisation method
    out = tmp_path / "sharded"
    model.save_pretrained(out, max_shard_size="100KB")
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1
    assert all(r["ok"] for r in verify_directory(out))
    assert {r["file"] for r in verify_directory(out)} == set(shards)
    transformers.AutoModelForCausalLM.from_pretrained(out)  # verified, loads
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    key = "model.layers.1.self_attn.o_proj.qweight"
    _flip_bit(out / index[key], key)
    with pytest.raises(IntegrityError, match=rf"{index[key]}: tensor '{key}'"):
        load_quantized(out)
    with pytest.raises(IntegrityError, match=rf"{index[key]}: tensor '{key}'"):
        transformers.AutoModelForCausalLM.from_pretrained(out)
    bad = [r for r in verify_directory(out) if not r["ok"]]
    assert [r["file"] for r in bad] == [index[key]] and key in bad[0]["error"]


def test_from_pretrained_skips_verification_with_env(saved, tmp_path, monkeypatch):
    _, path = saved
    bad = _copy(path, tmp_path)
    _flip_bit(bad / "model.safetensors", "model.layers.0.mlp.up_proj.qweight")
    with pytest.raises(IntegrityError):
        transformers.AutoModelForCausalLM.from_pretrained(bad)
    monkeypatch.setenv("LAYERPRESS_VERIFY", "0")
    transformers.AutoModelForCausalLM.from_pretrained(bad)


def test_verify_command(saved, tmp_path, capsys):
    _, path = saved
    assert cli_main(["verify", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("model.safetensors: OK (") and "tensors)" in out
    bad = _copy(path, tmp_path)
    _flip_bit(bad / "model.safetensors", "model.layers.0.mlp.gate_proj.scales")
    assert cli_main(["verify", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "model.safetensors: FAILED: tensor 'model.layers.0.mlp.gate_proj.scales' does not match" in out
    assert cli_main(["verify", "--json", str(bad)]) == 1
    rec = json.loads(capsys.readouterr().out.splitlines()[0])
    assert rec["ok"] is False and rec["file"] == "model.safetensors"
    # --no-verify on the commands that load a model
    assert cli_main(["inspect", str(bad)]) == 2
    assert "does not match its recorded digest" in capsys.readouterr().err
    assert cli_main(["inspect", "--no-verify", str(bad)]) == 0
    capsys.readouterr()
    # truncated file, not a model, no digests
    trunc = _copy(path, tmp_path, "trunc")
    f = trunc / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    assert cli_main(["verify", str(trunc)]) == 1
    assert "FAILED: unreadable safetensors file" in capsys.readouterr().out
    assert cli_main(["verify", str(tmp_path)]) == 2
    assert "config.json is missing" in capsys.readouterr().err
    old = _copy(path, tmp_path, "old")
    cfg = json.loads((old / "config.json").read_text())
    del cfg["quantization_config"]["digests"]
    (old / "config.json").write_text(json.dumps(cfg))
    assert cli_main(["verify", str(old)]) == 2
    assert "saved without tensor digests" in capsys.readouterr().err
