"""Rotated quantisation in the flows (flows/rotation.py, quantize_model(rotate=...)), rotated
QuantLinear layers, their saved format (version 2; version-1 files still load), the
transformers integration and the exporters' refusal. Tiny config-built models, no download."""
from __future__ import annotations

import json
import math

import pytest
import torch

from flows_testutils import calib_ids, model_output, tiny_model
from layerpress import QuantLinear, QuantSpec, ops
from layerpress.flows import load_quantized, quantize_model, save_quantized
from layerpress.flows.quantizers import gptq, rtn
from layerpress.flows.rotation import layer_seed, quantise_rotated, rotated_spec, rotation_block_for
from layerpress.ops.rotation import hadamard, random_signs

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module", autouse=True)
def _one_thread(torch_single_thread):
    yield


_out = model_output


def _dense_r(k, block, signs):
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < block:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return signs.double()[:, None] * torch.block_diag(*[h / math.sqrt(block)] * (k // block))


def _quant_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def test_rotation_block_for():
    assert rotation_block_for(384, 128) == 128
    assert rotation_block_for(96, 128) == 32
    assert rotation_block_for(1536, 512) == 512
    assert rotation_block_for(24, 128) == 0  # no power of two >= 16 divides it
    assert layer_seed(0, "a.b") == layer_seed(0, "a.b") != layer_seed(1, "a.b")


def test_quantise_rotated_is_gptq_of_w_r_on_rt_h_r():
    """W·R is quantised with the Hessian RᵀHR (checked against the dense matrices), and the
    result's weight is mapped back to the original basis."""
    torch.manual_seed(0)
    n, k = 32, 256
    W = torch.randn(n, k)
    X = torch.randn(512, k) * torch.linspace(0.1, 3, k)
    H = X.t() @ X / 512 + 0.01 * torch.eye(k)
    spec = rotated_spec(QuantSpec(4, 64, "oc"), k, 128, seed=11)
    seen = {}

    def quantise(w_, sp_, h_):
        seen.update(w=w_, h=h_, spec=sp_)
        return gptq(w_, h_, sp_)

    res = quantise_rotated(W, H, spec, quantise)
    R = _dense_r(k, 128, random_signs(k, 11))
    torch.testing.assert_close(seen["w"].double(), W.double() @ R, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(seen["h"].double(), R.t() @ H.double() @ R, rtol=1e-5, atol=1e-4)
    assert seen["spec"] is spec and res.spec.rotated
    deq = ops.dequantize(res.qweight, res.scales, res.zeros, spec, torch.float32)
    torch.testing.assert_close(res.weight.double(), deq.double() @ R.t(), rtol=1e-5, atol=1e-5)
    assert torch.equal(res.rot_signs, random_signs(k, 11))


def _outlier_problem(seed=0, n=64, k=256):
    """A weight with a few large entries and activations with a few large channels: the case
    incoherence processing is for."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n, k, generator=g)
    W.view(-1)[torch.randperm(n * k, generator=g)[:40]] *= 12
    X = torch.randn(1024, k, generator=g)
    X[:, torch.randperm(k, generator=g)[:6]] *= 15
    return W, X


def _out_err(W, X, weight):
    return ((X @ (W - weight).t()).norm() / (X @ W.t()).norm()).item()


def test_rotation_lowers_gptq_error_on_outliers():
    W, X = _outlier_problem()
    k = W.shape[1]
    H = 2 * X.t() @ X / X.shape[0]
    H += 0.01 * torch.diag(H).mean() * torch.eye(k)
    spec = QuantSpec(3, 128, "oc")
    plain = gptq(W, H, spec)
    rot = quantise_rotated(W, H, rotated_spec(spec, k, 128, 3), lambda w_, s_, h_: gptq(w_, h_, s_))
    e_plain, e_rot = _out_err(W, X, plain.weight), _out_err(W, X, rot.weight)
    assert e_rot < 0.8 * e_plain, (e_rot, e_plain)
    rot_rtn = quantise_rotated(W, H, rotated_spec(spec, k, 128, 3),
                               lambda w_, s_, h_: rtn(w_, s_, clip=True, hdiag=torch.diag(h_)))
    assert _out_err(W, X, rot_rtn.weight) < _out_err(W, X, rtn(W, spec).weight)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_quantize_model_rotate_hadamard(family, method):
    model = tiny_model(family)
    ids = calib_ids()
    y0 = _out(model, ids[:2])
    rep = quantize_model(model, bits=4, calib=ids, method=method, axis="auto", rotate="hadamard",
                         rotate_block=64)
    layers = _quant_layers(model)
    assert len(layers) == len(rep.layers) > 0
    for layer in rep.layers:
        m = layers[layer.name]
        assert layer.rotation == "hadamard" and m.spec.rotated and m.spec.rotation_block == 64
        assert m.spec.axis == layer.axis and set(layer.axis_mse) <= {"oc+hadamard", "ic+hadamard"}
        assert 0 <= layer.rel_error < 0.2
    y1 = _out(model, ids[:2])
    assert ((y1 - y0).norm() / y0.norm()).item() < 0.2
    json.dumps(rep.to_dict())


def test_quantize_model_rotate_auto_keeps_the_lowest_error():
    model = tiny_model("llama")
    rep = quantize_model(model, bits=3, calib=calib_ids(), method="gptq", axis="auto", rotate="auto",
                         fuse_projections=False)  # the layers are looked up by name below
    layers = _quant_layers(model)
    rotated = 0
    for layer in rep.layers:
        axes = {a for a in layer.axis_mse if "+" not in a}  # the valid axes (k_proj: N=64 < g, oc only)
        assert axes and set(layer.axis_mse) == axes | {a + "+hadamard" for a in axes}, layer.name
        key = layer.axis + ("+hadamard" if layer.rotation == "hadamard" else "")
        assert layer.axis_mse[key] == min(layer.axis_mse.values()), layer.name
        assert layers[layer.name].spec.rotated == (layer.rotation == "hadamard")
        rotated += layer.rotation == "hadamard"
    assert 0 < rotated  # on random weights the rotation wins somewhere (it is measured, not assumed)


def test_rotate_with_rtn_selection_and_awq():
    for kw in (dict(method="gptq", select_with="rtn", rotate="auto"), dict(method="awq", rotate="hadamard")):
        model = tiny_model("llama")
        rep = quantize_model(model, bits=4, calib=calib_ids(), axis="oc", **kw)
        assert all(0 <= layer.rel_error < 0.2 for layer in rep.layers), kw


def test_rotate_bad_arguments():
    model = tiny_model("llama")
    for kw, match in [(dict(rotate="random"), "rotate must be one of"),
                      (dict(rotate="hadamard", rotate_block=100), "rotate_block must be a power of two"),
                      (dict(rotate="hadamard", lorc_rank=4), "not supported together with outliers/lorc_rank")]:
        with pytest.raises(ValueError, match=match):
            quantize_model(model, calib=calib_ids(), **kw)


# ---- the module and the format ----------------------------------------------------------------------

def _rotated_layer(n=48, k=256, block=64, bias=True):
    torch.manual_seed(0)
    lin = torch.nn.Linear(k, n, bias=bias)
    spec = QuantSpec(4, 64, "oc", rotation="hadamard", rotation_block=block, rotation_seed=5)
    signs = random_signs(k, 5)
    wr = hadamard(lin.weight.detach(), block, signs)
    codes, s, z = ops.quantize(wr, spec)
    q = QuantLinear.from_quantized(ops.pack(codes, 4), s, z, spec, lin.bias.detach() if bias else None,
                                   rot_signs=signs)
    return lin, q


def test_rotated_quantlinear_forward_and_weight():
    lin, q = _rotated_layer()
    x = torch.randn(5, 256)
    y = q(x)
    ref = x.double() @ q.dequantized_weight(torch.float64).t() + lin.bias.double()
    # (relative to the output: the default CPU variant may compute in bf16, e.g. avx512_bf16)
    assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-2
    assert ((y - lin(x)).norm() / lin(x).norm()).item() < 0.1  # W4 of W·R, rotated back
    assert "rotation=hadamard(64)" in repr(q)
    h = q.half()
    assert h.rot_signs.dtype == torch.float32 and h.scales.dtype == torch.float16
    x.requires_grad_()
    q(x).sum().backward()
    g_ref = q.dequantized_weight(torch.float64).sum(0).expand(5, -1)
    assert ((x.grad.double() - g_ref).norm() / g_ref.norm()).item() < 1e-2


def test_rotated_quantlinear_state_dict():
    _, q = _rotated_layer()
    sd = q.state_dict()
    assert torch.equal(sd["rot_signs"], q.rot_signs)
    fresh = QuantLinear(256, 48, q.spec)
    fresh.load_state_dict(sd)
    x = torch.randn(3, 256)
    assert torch.equal(fresh(x), q(x))
    del sd["rot_signs"]
    with pytest.raises(RuntimeError, match="rot_signs"):
        QuantLinear(256, 48, q.spec).load_state_dict(sd)
    with pytest.raises(ValueError, match="must all be \\+1 or -1"):
        q.set_rot_signs(torch.full((256,), 0.5))
    with pytest.raises(ValueError, match="has no rotation"):
        QuantLinear(256, 48, QuantSpec()).set_rot_signs(random_signs(256, 0))


def test_spec_rotation_fields():
    s = QuantSpec(3, 32, "ic", rotation="hadamard", rotation_block=128, rotation_seed=1)
    assert QuantSpec.from_dict(s.to_dict()) == s and s.rotated
    assert "rotation" not in QuantSpec().to_dict()  # unrotated specs keep the format-1 keys
    for kw, match in [(dict(rotation="givens"), "rotation must be one of"),
                      (dict(rotation="hadamard", rotation_block=24), "power of two >= 16"),
                      (dict(rotation_block=64), "need rotation='hadamard'")]:
        with pytest.raises(ValueError, match=match):
            QuantSpec(**kw)
    with pytest.raises(ValueError, match="not a multiple of rotation_block=128"):
        s.check_shape(64, 96)


def test_save_load_rotated_and_version_1(tmp_path):
    ids = calib_ids()
    model = tiny_model("llama")
    # unfused: a format-2 file (fused projections make it format 3)
    quantize_model(model, bits=4, calib=ids, method="rtn", rotate="auto", fuse_projections=False)
    saved = save_quantized(model, tmp_path / "rot")
    cfg = json.loads((saved / "config.json").read_text())["quantization_config"]
    assert cfg["format_version"] == 2
    assert any(info["spec"].get("rotation") == "hadamard" for info in cfg["layers"].values())
    again = load_quantized(saved, model=tiny_model("llama", seed=3))
    assert torch.equal(_out(again, ids[:2]), _out(model, ids[:2]))
    hf = transformers.AutoModelForCausalLM.from_pretrained(saved)
    assert torch.equal(_out(hf, ids[:2]), _out(model, ids[:2]))
    # a version-1 directory (no rotation) still loads, through both paths
    plain = tiny_model("llama")
    quantize_model(plain, bits=4, calib=ids, method="rtn", fuse_projections=False)
    v1 = save_quantized(plain, tmp_path / "v1")
    raw = json.loads((v1 / "config.json").read_text())
    raw["quantization_config"]["format_version"] = 1
    (v1 / "config.json").write_text(json.dumps(raw))
    assert torch.equal(_out(load_quantized(v1, model=tiny_model("llama", seed=3)), ids[:2]), _out(plain, ids[:2]))
    assert torch.equal(_out(transformers.AutoModelForCausalLM.from_pretrained(v1), ids[:2]), _out(plain, ids[:2]))


def test_exporters_refuse_rotated_layers(tmp_path):
    from layerpress.interop import export_awq, export_gptq
    model = tiny_model("llama")
    quantize_model(model, bits=4, calib=calib_ids(), method="rtn", axis="oc", rotate="hadamard")
    with pytest.raises(ValueError, match="is rotated"):
        export_awq(model, tmp_path / "awq")
    with pytest.raises(ValueError, match="is rotated"):
        export_gptq(model, tmp_path / "gptq")
    assert not (tmp_path / "awq").exists() and not (tmp_path / "gptq").exists()


# ---- folded rotations (QuaRot) ------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "qwen2", "opt", "gpt2"])
def test_fold_rotations_keeps_the_outputs(family):
    """Pre-RMSNorm decoders directly, Pre-LN GPT-2/OPT through the Pre-RMSNorm conversion: the
    folded fp32 model's logits equal the original's to fp32 rounding (folding computed in fp64)."""
    from layerpress.flows.rotation import fold_rotations
    model = tiny_model(family)
    ids = calib_ids(2, 16)
    y0 = _out(model, ids)
    emb0 = model.get_input_embeddings().weight.detach().clone()
    info = fold_rotations(model, seed=3)
    assert info["residual_block"] == 128 and info["head_layers"] == (0 if family == "gpt2" else 2)
    y1 = _out(model, ids)
    err = (y1 - y0).abs().max() / y0.abs().max()
    assert err < 1e-5, err.item()
    # the rotation really happened: the embeddings are mixed, their norms kept
    emb1 = model.get_input_embeddings().weight.detach()
    assert (emb1 - emb0).abs().max() > 0.1 * emb0.abs().max()
    torch.testing.assert_close(emb1.norm(dim=1), (emb0 - (emb0.mean(1, keepdim=True) if family in ("gpt2", "opt")
                                                          else 0)).norm(dim=1), rtol=1e-5, atol=1e-6)
    # and the folded model quantises like any other
    rep = quantize_model(model, bits=4, calib=calib_ids(), method="gptq", axis="oc")
    assert all(layer.rel_error < 0.2 for layer in rep.layers)


def test_fold_rotations_refuses_unsupported_models():
    from layerpress.flows.rotation import fold_rotations
    with pytest.raises(NotImplementedError, match="no norm adapter for model_type 'bert'"):
        fold_rotations(tiny_model("bert"))


def test_cli_rotate_flags():
    from layerpress.cli.main import build_parser
    args = build_parser().parse_args(["quantize", "--rotate", "auto", "--rotate-block", "64"])
    assert (args.rotate, args.rotate_block) == ("auto", 64)
    assert build_parser().parse_args(["quantize"]).rotate == "none"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["quantize", "--rotate", "givens"])


def test_rotated_run_resumes_to_the_same_result(tmp_path):
    """Per-block checkpoints carry the rotated layers (spec and signs): an interrupted
    rotate="auto" run resumes to the uninterrupted result bit for bit."""
    class Interrupt(Exception):
        pass

    def stop_after_0(i):
        if i == 0:
            raise Interrupt

    args = dict(bits=3, group_size=32, axis="oc", method="gptq", rotate="auto", calib=calib_ids())
    whole = tiny_model("llama", layers=2)
    rep_a = quantize_model(whole, **args)
    assert any(layer.rotation == "hadamard" for layer in rep_a.layers)
    with pytest.raises(Interrupt):
        quantize_model(tiny_model("llama", layers=2), checkpoint_dir=tmp_path, on_block_done=stop_after_0, **args)
    resumed = tiny_model("llama", layers=2)
    rep_b = quantize_model(resumed, checkpoint_dir=tmp_path, resume=True, **args)
    sa, sb = whole.state_dict(), resumed.state_dict()
    assert sa.keys() == sb.keys() and any(k.endswith("rot_signs") for k in sa)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert [la.rotation for la in rep_a.layers] == [lb.rotation for lb in rep_b.layers]
