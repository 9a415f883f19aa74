"""Fused projections (nn/fused.py, flows/fusion.py): q/k/v and gate/up as one QuantLinear each,
exact against the separate layers; saved, loaded (load_quantized, from_pretrained) and exported
(AWQ, GPTQ, compressed-tensors, GGUF: split back, the same files as the unfused model)."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from layerpress import QuantLinear, QuantSpec
from layerpress.flows import load_quantized, quantize_model, save_quantized
from layerpress.flows.fusion import fuse_projections
from layerpress.nn.fused import FusedQuantLinear, FusedSlice, fuse_layers, fusion_problem, unfuse

from flows_testutils import calib_ids, model_output, tiny_model

pytestmark = pytest.mark.usefixtures("torch_single_thread")

QKV = ("q_proj", "k_proj", "v_proj")


def _parent(specs, sizes=(128, 64, 64), k=128, bias=True, seed=0):
    torch.manual_seed(seed)
    p = nn.Module()
    for name, n, spec in zip(QKV, sizes, specs):
        setattr(p, name, QuantLinear.from_linear(nn.Linear(k, n, bias=bias), spec))
    return p


def _rotated(p, signs):
    """Gives every layer of ``p`` the same Hadamard rotation (signs ``signs``), re-quantised."""
    from layerpress import ops
    from layerpress.ops.rotation import hadamard
    for name in QKV:
        m = getattr(p, name)
        spec = QuantSpec(4, 32, rotation="hadamard", rotation_block=64)
        w = m.dequantized_weight()
        wr = hadamard(w, 64, signs)  # W·R
        codes, s, z = ops.quantize(wr.contiguous(), spec)
        setattr(p, name, QuantLinear.from_quantized(ops.pack(codes, 4), s, z, spec, m.bias.detach(),
                                                    rot_signs=signs))
    return p


@pytest.mark.parametrize("spec", [QuantSpec(4, 32), QuantSpec(3, 64, symmetric=True),
                                  QuantSpec(4, 32, axis="ic"), QuantSpec(8, -1),
                                  QuantSpec(2, 128, scale_dtype=torch.bfloat16)],
                         ids=lambda s: f"W{s.bits}g{s.group_size}{s.axis}{'s' if s.symmetric else ''}")
def test_fused_layer_is_the_parts_concatenated(exact_cpu_gemm_variant, spec):
    p = _parent([spec] * 3)
    parts = [getattr(p, n) for n in QKV]
    canon = [m.canonical() for m in parts]
    x = torch.randn(2, 5, 128)
    ref = [m(x) for m in parts]
    fused = fuse_layers(p, QKV)
    assert isinstance(p.q_proj, FusedSlice) and p.fused_q_k_v is fused
    # the product split is each part's product, bit for bit; the split layers are the parts
    assert all(torch.equal(getattr(p, n)(x), r) for n, r in zip(QKV, ref))
    for m, (q, s, z) in zip(fused.split(), canon):
        q2, s2, z2 = m.canonical()
        assert torch.equal(q, q2) and torch.equal(s, s2) and (z is None or torch.equal(z, z2))
    # and the whole product against a float64 reference of the parts' weights
    w = torch.cat([m.dequantized_weight().double() for m in parts])
    b = torch.cat([m.bias.double() for m in parts])
    torch.testing.assert_close(fused(x).double(), x.double() @ w.t() + b, rtol=1e-5, atol=1e-4)


def test_rotated_parts_fuse_when_their_signs_agree(exact_cpu_gemm_variant):
    signs = torch.where(torch.rand(128, generator=torch.Generator().manual_seed(3)) < 0.5, -1.0, 1.0)
    p = _rotated(_parent([QuantSpec(4, 32)] * 3), signs)
    x = torch.randn(3, 128)
    ref = [getattr(p, n)(x) for n in QKV]
    fuse_layers(p, QKV)
    assert all(torch.equal(getattr(p, n)(x), r) for n, r in zip(QKV, ref))
    q = _rotated(_parent([QuantSpec(4, 32)] * 3), signs)
    q.v_proj.set_rot_signs(-signs)
    assert "rotation signs" in fusion_problem([q.q_proj, q.v_proj], ["q_proj", "v_proj"])


def test_slices_share_one_product_and_never_serve_a_stale_one(exact_cpu_gemm_variant, monkeypatch):
    p = _parent([QuantSpec(4, 32)] * 3)
    sep = copy.deepcopy(p)
    fused = fuse_layers(p, QKV)
    calls = []
    real = FusedQuantLinear.forward
    monkeypatch.setattr(FusedQuantLinear, "forward", lambda self, x: (calls.append(1), real(self, x))[1])
    x, x2 = torch.randn(4, 128), torch.randn(4, 128)
    outs = [getattr(p, n)(x) for n in QKV]
    assert len(calls) == 1 and not fused._lp_cache  # one product; freed once all parts took theirs
    assert all(torch.equal(o, getattr(sep, n)(x)) for n, o in zip(QKV, outs))
    # another input between the parts: each gets its own input's product
    q = p.q_proj(x)
    k2 = p.k_proj(x2)
    assert torch.equal(q, sep.q_proj(x)) and torch.equal(k2, sep.k_proj(x2))
    # the same tensor modified in place between the parts: recomputed (version counter)
    fused.clear_cache()
    x3 = x.clone()
    p.q_proj(x3)
    x3.mul_(2)
    assert torch.equal(p.k_proj(x3), sep.k_proj(x3))
    # a part called twice on one input is not served its earlier result twice by mistake
    fused.clear_cache()
    n0 = len(calls)
    p.q_proj(x), p.q_proj(x)
    assert len(calls) == n0 + 2
    # grad mode is part of the key: a product cached without a graph is not reused with one
    fused.clear_cache()
    xg = torch.randn(4, 128, requires_grad=True)
    with torch.no_grad():
        p.q_proj(xg)
    (p.k_proj(xg).sum() + p.v_proj(xg).square().sum()).backward()
    xs = xg.detach().clone().requires_grad_(True)
    (sep.k_proj(xs).sum() + sep.v_proj(xs).square().sum()).backward()
    torch.testing.assert_close(xg.grad, xs.grad, rtol=1e-5, atol=1e-5)


def test_no_fusion_when_not_exact():
    # mixed precision: q and k fuse, v (8 bits) stays apart, with the reason
    p = _parent([QuantSpec(4, 32), QuantSpec(4, 32), QuantSpec(8, 32)])
    from layerpress.flows.fusion import _classes
    classes, alone = _classes(p, QKV)
    assert classes == [["q_proj", "k_proj"], ["v_proj"]] and not alone
    why = fusion_problem([p.q_proj, p.v_proj], ["q_proj", "v_proj"])
    assert "spec" in why and "'bits': 8" in why
    # per-IC groups of a whole column span each part's N: not fusable
    p = _parent([QuantSpec(4, -1, axis="ic")] * 3)
    assert "group_size=-1" in fusion_problem([p.q_proj, p.k_proj], ["q_proj", "k_proj"])
    with pytest.raises(ValueError, match="group_size=-1"):
        fuse_layers(p, QKV)
    assert isinstance(p.q_proj, QuantLinear) and not hasattr(p, "fused_q_k_v")
    # per-IC groups that would straddle parts (N not a multiple of the N-group)
    with pytest.raises(ValueError, match="straddle|not divisible"):
        FusedQuantLinear(128, [96, 64], ["a", "b"], QuantSpec(4, 64, axis="ic"))
    # side paths, input permutations, bias on some parts only
    p = _parent([QuantSpec(4, 32)] * 3)
    p.k_proj.set_side_paths(lorc_a=torch.zeros(2, 128, dtype=torch.float16),
                            lorc_b=torch.zeros(64, 2, dtype=torch.float16))
    assert "side paths" in fusion_problem([p.q_proj, p.k_proj], ["q_proj", "k_proj"])
    p.v_proj.set_in_perm(torch.randperm(128))
    assert "in_perm" in fusion_problem([p.q_proj, p.v_proj], ["q_proj", "v_proj"])
    p.q_proj.bias = None
    assert "bias" in fusion_problem([p.q_proj, p.v_proj][::-1], ["v_proj", "q_proj"])


@pytest.fixture(scope="module")
def llama_pair():
    """A tiny Llama quantised (RTN, per-OC W4 g32) with and without fused projections."""
    m = tiny_model("llama")
    ids = calib_ids(4, 16)
    plain = copy.deepcopy(m)
    kw = dict(bits=4, group_size=32, axis="oc", method="rtn", calib=ids)
    report = quantize_model(m, **kw)
    quantize_model(plain, fuse_projections=False, **kw)
    return m, plain, report, ids


def test_flow_fuses_and_the_model_computes_the_same(exact_cpu_gemm_variant, llama_pair, monkeypatch):
    fused, plain, report, ids = llama_pair
    attn, mlp = fused.model.layers[0].self_attn, fused.model.layers[0].mlp
    assert isinstance(attn.fused_q_k_v, FusedQuantLinear) and isinstance(mlp.fused_gate_up, FusedQuantLinear)
    assert all(isinstance(getattr(attn, n), FusedSlice) for n in QKV)
    assert not any(isinstance(m, (FusedQuantLinear, FusedSlice)) for m in plain.modules())
    assert sum(len(r["fused"]) for r in report.fusion) == 4 and all(not r["separate"] for r in report.fusion)
    assert [lay.name for lay in report.layers][:3] == [f"model.layers.0.self_attn.{n}" for n in QKV]
    calls = []
    real = FusedQuantLinear.forward
    monkeypatch.setattr(FusedQuantLinear, "forward", lambda self, x: (calls.append(1), real(self, x))[1])
    assert torch.equal(model_output(fused, ids), model_output(plain, ids))
    assert len(calls) == 2 * 2  # one fused product per group and block


def test_save_load_round_trip(exact_cpu_gemm_variant, llama_pair, tmp_path):
    fused, plain, _, ids = llama_pair
    ref = model_output(plain, ids)
    save_quantized(fused, tmp_path / "f")
    save_quantized(plain, tmp_path / "p")
    q = json.loads((tmp_path / "f" / "config.json").read_text())["quantization_config"]
    assert q["format_version"] == 3
    entry = q["layers"]["model.layers.1.self_attn.fused_q_k_v"]
    assert entry["fused"] == {"parts": list(QKV), "part_sizes": [128, 64, 64]}
    assert "model.layers.1.self_attn.q_proj" not in q["layers"]
    assert json.loads((tmp_path / "p" / "config.json").read_text())["quantization_config"]["format_version"] == 2
    back = load_quantized(tmp_path / "f")
    assert isinstance(back.model.layers[1].mlp.up_proj, FusedSlice)
    assert torch.equal(model_output(back, ids), ref)
    assert not any(isinstance(m, FusedSlice) for m in load_quantized(tmp_path / "p").modules())
    # a config whose parts do not add up is refused, naming the layer
    bad = json.loads((tmp_path / "f" / "config.json").read_text())
    bad["quantization_config"]["layers"]["model.layers.0.mlp.fused_gate_up"]["fused"]["part_sizes"] = [256, 128]
    (tmp_path / "f" / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="fused_gate_up.*fused"):
        load_quantized(tmp_path / "f", verify=False)


def test_from_pretrained_round_trip(exact_cpu_gemm_variant, llama_pair, tmp_path):
    import transformers
    fused, plain, _, ids = llama_pair
    ref = model_output(plain, ids)
    save_quantized(fused, tmp_path / "f")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "f")
    assert isinstance(hf.model.layers[0].self_attn.k_proj, FusedSlice)
    assert torch.equal(model_output(hf, ids), ref)
    out = hf.generate(ids[:1, :6], max_new_tokens=4, do_sample=False)
    assert torch.equal(out, plain.generate(ids[:1, :6], max_new_tokens=4, do_sample=False))
    hf.save_pretrained(tmp_path / "s")
    assert torch.equal(model_output(load_quantized(tmp_path / "s"), ids), ref)
    base = transformers.AutoModel.from_pretrained(tmp_path / "f")
    assert isinstance(base.layers[0].mlp.gate_proj, FusedSlice)
    # dequantize() gives the parts back as float linears
    hf.dequantize()
    assert isinstance(hf.model.layers[0].self_attn.q_proj, nn.Linear)
    assert not hasattr(hf.model.layers[0].self_attn, "fused_q_k_v")


def _files(d):
    return {f.name: f.read_bytes() for f in sorted(d.iterdir()) if f.is_file()}


@pytest.mark.parametrize("fmt", ["awq", "gptq", "compressed_tensors", "gguf"])
def test_exports_split_fused_layers_back(tmp_path, fmt):
    from layerpress import interop
    from export_testutils import quantise_linears, tiny_bpe_tokenizer, tiny_decoder
    plain = quantise_linears(tiny_decoder("llama"), [QuantSpec(4, 32)])
    fused = copy.deepcopy(plain)
    assert sum(len(r["fused"]) for r in fuse_projections(fused)) == 4
    export = getattr(interop, f"export_{fmt}")
    if fmt == "gguf":
        tok = tiny_bpe_tokenizer()
        export(plain, tmp_path / "p.gguf", tok)
        export(fused, tmp_path / "f.gguf", tok)
        assert (tmp_path / "p.gguf").read_bytes() == (tmp_path / "f.gguf").read_bytes()
    else:
        export(plain, tmp_path / "p")
        export(fused, tmp_path / "f")
        assert _files(tmp_path / "p") == _files(tmp_path / "f")  # byte-identical tensors and config
    # the model is fused again afterwards
    assert isinstance(fused.model.layers[0].self_attn.fused_q_k_v, FusedQuantLinear)
    assert isinstance(fused.model.layers[0].self_attn.q_proj, FusedSlice)


def test_unfuse_restores_separate_layers(exact_cpu_gemm_variant, llama_pair):
    fused, plain, _, ids = llama_pair
    m = copy.deepcopy(fused)
    assert unfuse(m) == 4
    assert type(m.model.layers[0].self_attn.q_proj) is QuantLinear
    assert torch.equal(model_output(m, ids), model_output(plain, ids))


def test_out_of_core_refuses_fusion(tmp_path):
    from layerpress.flows.out_of_core import quantize_checkpoint
    with pytest.raises(ValueError, match="fuse_projections"):
        quantize_checkpoint(tmp_path / "nope", tmp_path / "out", fuse_projections=True)


def test_slices_from_several_threads(exact_cpu_gemm_variant):
    """Each thread shares products only with itself: threads running the parts on their own
    inputs at once all get their own inputs' results."""
    import threading
    p = _parent([QuantSpec(4, 32)] * 3)
    sep = copy.deepcopy(p)
    fused = fuse_layers(p, QKV)
    xs = [torch.randn(3, 128, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    want = [[getattr(sep, n)(x) for n in QKV] for x in xs]
    bad = []

    def work(i):
        for _ in range(10):
            got = [getattr(p, n)(xs[i]) for n in QKV]
            if not all(torch.equal(a, b) for a, b in zip(got, want[i])):
                bad.append(i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not bad and not fused._lp_cache
