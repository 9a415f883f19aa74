"""AWQ / GPTQ import and export (layerpress.interop).

Checkpoints are built here from known integer codes, scales and zero points with packers written
in this file (numpy, one bit at a time -- independent of the importer's vectorised code); the
imported layers are checked against the float64 dequantisation of those known values, exactly for
the weights and within the fp32-accumulation bound for the outputs. Whole tiny Llama / OPT models
(built from configs) go through export -> import with bit-identical logits.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from layerpress import QuantLinear, QuantSpec
from layerpress import reference as R
from layerpress.interop import (awq_to_quantlinear, export_awq, export_gptq, gptq_to_quantlinear,
                                load_awq, load_checkpoint, load_gptq, quantlinear_to_awq,
                                quantlinear_to_gptq)

from flows_testutils import calib_ids, tiny_model
from lp_testutils import assert_within, cpu_gemm_operands, gemm_tolerance

pytestmark = pytest.mark.usefixtures("torch_single_thread")

safetensors_torch = pytest.importorskip("safetensors.torch")


# ---- independent packers (plain numpy bit manipulation) -------------------------------------------

def stream_pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Each row of ``codes [R, C]`` as one little-endian bit stream of int32 words: bit ``b`` of
    code ``i`` is stream bit ``i*bits + b``, i.e. bit ``(i*bits + b) % 32`` of word ``// 32``."""
    r, c = codes.shape
    assert c * bits % 32 == 0
    words = np.zeros((r, c * bits // 32), dtype=np.uint64)
    for i in range(c):
        for b in range(bits):
            pos = i * bits + b
            words[:, pos // 32] |= ((codes[:, i].astype(np.uint64) >> np.uint64(b)) & np.uint64(1)) \
                << np.uint64(pos % 32)
    return words.astype(np.uint32).view(np.int32)


AWQ_NIBBLE_CHANNELS = [0, 2, 4, 6, 1, 3, 5, 7]  # nibble i of a word holds channel 8j + this[i]


def awq_pack(codes: np.ndarray) -> np.ndarray:
    """``codes [R, N]`` (4-bit) -> AWQ int32 ``[R, N/8]``."""
    r, n = codes.shape
    words = np.zeros((r, n // 8), dtype=np.uint64)
    for j in range(n // 8):
        for i, ch in enumerate(AWQ_NIBBLE_CHANNELS):
            words[:, j] |= codes[:, 8 * j + ch].astype(np.uint64) << np.uint64(4 * i)
    return words.astype(np.uint32).view(np.int32)


def t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


def test_packers_against_hand_worked_words():
    """The test's packers themselves, on words worked out by hand from SPEC §4 / docs/format.md."""
    # AWQ: channels 0..7 hold codes 1..8; nibbles in order hold channels 0,2,4,6,1,3,5,7.
    assert awq_pack(np.arange(1, 9)[None]).view(np.uint32)[0, 0] == 0x86427531
    # GPTQ/canonical 3-bit: code 10 straddles words 0/1, code 21 words 1/2 (format.md §3 table).
    codes = np.zeros((1, 32), dtype=np.int64)
    codes[0, 10], codes[0, 21], codes[0, 31] = 0b101, 0b011, 0b111
    w = stream_pack(codes, 3).view(np.uint32)[0]
    assert w[0] == 0b01 << 30 and w[1] == (1 | (1 << 31)) and w[2] == (0b01 | (0b111 << 29))


# ---- known quantised layers ----------------------------------------------------------------------

def known_layer(n, k, bits, gf, seed, scale_dtype=torch.float16, g_idx=None, zero_range=None):
    """Random codes [N, K], per-group scales/zeros [ceil(K/gf), N] and g_idx [K] (default k // gf)."""
    rng = np.random.default_rng(seed)
    ng = -(-k // gf)
    codes = rng.integers(0, 2 ** bits, size=(n, k))
    lo, hi = zero_range or (0, 2 ** bits - 1)
    zeros = rng.integers(lo, hi + 1, size=(ng, n))
    mag = rng.uniform(0.002, 0.05, size=(ng, n)) * rng.choice([-1.0, 1.0], size=(ng, n))
    scales = torch.tensor(mag).to(scale_dtype)
    if g_idx is None:
        g_idx = np.arange(k) // gf
    return codes, zeros, scales, np.asarray(g_idx)


def reference_weight(codes, zeros, scales, g_idx) -> torch.Tensor:
    """float64 [N, K]: (q − z[g_idx[k], n]) · s[g_idx[k], n]."""
    s = scales.to(torch.float64).numpy()
    w = (codes - zeros[g_idx].T) * s[g_idx].T
    return torch.from_numpy(w)


def check_layer(ql: QuantLinear, codes, zeros, scales, g_idx, bias=None, m=5, seed=0):
    """Dequantised weight exactly the reference; outputs within the fp32-accumulation bound."""
    w_ref = reference_weight(codes, zeros, scales, g_idx)
    assert torch.equal(ql.dequantized_weight().to(torch.float64), w_ref)
    x = torch.randn(m, ql.in_features, generator=torch.Generator().manual_seed(seed))
    b = None if bias is None else bias.to(torch.float64)
    xk, wk = cpu_gemm_operands(x, w_ref, ql.spec)  # as the active CPU variant multiplies them
    y_ref = xk @ wk.t() + (0 if b is None else b)
    mag = torch.from_numpy((codes + zeros[g_idx].T) * np.abs(scales.to(torch.float64).numpy())[g_idx].T)
    with torch.no_grad():
        y = ql(x)
    assert_within(y, y_ref, gemm_tolerance(xk, mag, y_ref, torch.float32, b), "layer output")


def act_order_g_idx(k, gf, seed):
    """A GPTQ act-order g_idx: groups of gf channels taken in a random channel order."""
    perm = np.random.default_rng(seed).permutation(k)
    g = np.empty(k, dtype=np.int64)
    g[perm] = np.arange(k) // gf
    return g


# ---- AWQ layers ----------------------------------------------------------------------------------

@pytest.mark.parametrize("k,n,group", [(128, 48, 32), (256, 16, 128), (192, 24, 96), (96, 8, -1)],
                         ids=["g32", "g128", "g96-split", "whole-row"])
def test_awq_import_exact(k, n, group):
    gf = k if group == -1 else group
    codes, zeros, scales, g_idx = known_layer(n, k, 4, gf, seed=k + n)
    bias = torch.randn(n, dtype=torch.float16)
    ql = awq_to_quantlinear(t(awq_pack(codes.T)), t(awq_pack(zeros)), scales, group, bias)
    assert ql.spec == QuantSpec(4, {96: 32}.get(group, group), "oc", False, torch.float16)
    assert ql.in_perm is None and torch.equal(ql.bias, bias)
    check_layer(ql, codes, zeros, scales, g_idx, bias)


def test_awq_round_trip_exact():
    codes, zeros, scales, g_idx = known_layer(40, 128, 4, 64, seed=3)
    qw, qz = t(awq_pack(codes.T)), t(awq_pack(zeros))
    ql = awq_to_quantlinear(qw, qz, scales, 64)
    out = quantlinear_to_awq(ql)
    assert set(out) == {"qweight", "qzeros", "scales"}
    assert torch.equal(out["qweight"], qw) and torch.equal(out["qzeros"], qz)
    assert torch.equal(out["scales"], scales)
    # a symmetric layer exports explicit zero points 8 and comes back with the same weights
    sym = QuantLinear.from_linear(nn.Linear(64, 16), QuantSpec(4, 32, symmetric=True))
    again = awq_to_quantlinear(**{k: v for k, v in quantlinear_to_awq(sym).items()}, group_size=32)
    assert torch.equal(again.dequantized_weight(), sym.dequantized_weight())
    assert torch.equal(again.bias, sym.bias)


# ---- GPTQ layers ---------------------------------------------------------------------------------

GPTQ_CASES = [  # bits, k, n, group
    (4, 128, 48, 32), (3, 96, 32, 32), (2, 256, 32, 128), (8, 128, 20, 64), (3, 64, 64, -1),
    (4, 160, 16, 128),  # K % G != 0: a last, shorter group (AutoGPTQ's ceil(K/G) rows)
]


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("bits,k,n,group", GPTQ_CASES, ids=[f"w{c[0]}-k{c[1]}-g{c[3]}" for c in GPTQ_CASES])
def test_gptq_import_exact(bits, k, n, group, version):
    gf = k if group == -1 else group
    # v1 stores z − 1, so z ranges over 1..qmax there
    codes, zeros, scales, g_idx = known_layer(n, k, bits, gf, seed=bits * k + n,
                                              zero_range=(1 if version == 1 else 0, 2 ** bits - 1))
    stored = zeros - (1 if version == 1 else 0)
    bias = torch.randn(n, dtype=torch.float16)
    ql = gptq_to_quantlinear(gptq_qweight(codes, bits), t(stream_pack(stored, bits)), scales,
                             t(g_idx.astype(np.int32)), bits, group, version, sym=False, bias=bias)
    assert ql.spec.bits == bits and not ql.spec.symmetric and ql.in_perm is None
    check_layer(ql, codes, zeros, scales, g_idx, bias)


def gptq_qweight(codes, bits):
    """GPTQ qweight [K*bits/32, N]: column n = bit stream of codes[n, :] along K."""
    return t(stream_pack(codes, bits).T)


@pytest.mark.parametrize("bits,group", [(4, 32), (3, 32), (8, 64), (4, 96)])
def test_gptq_act_order_exact(bits, group):
    k, n = 192, 32
    g_idx = act_order_g_idx(k, group, seed=bits)
    codes, zeros, scales, _ = known_layer(n, k, bits, group, seed=7, g_idx=g_idx)
    ql = gptq_to_quantlinear(gptq_qweight(codes, bits), t(stream_pack(zeros, bits)), scales,
                             t(g_idx.astype(np.int32)), bits, group, version=2)
    assert ql.in_perm is not None and "in_perm=True" in repr(ql)
    # stored in group order: the gathered channels' groups are contiguous, sorted
    assert torch.equal(torch.from_numpy(g_idx)[ql.in_perm], torch.arange(k) // group)
    check_layer(ql, codes, zeros, scales, g_idx)
    # export -> import: same tensors as the checkpoint, same layer, bit-identical outputs
    out = quantlinear_to_gptq(ql, version=2)
    assert torch.equal(out["qweight"], gptq_qweight(codes, bits))
    if group == ql.spec.group_size:  # (G = 96 is stored as groups of 32, so its g_idx differs)
        assert torch.equal(out["g_idx"], t(g_idx.astype(np.int32)))
    again = gptq_to_quantlinear(out["qweight"], out["qzeros"], out["scales"], out["g_idx"], bits,
                                ql.spec.group_size, 2)
    check_layer(again, codes, zeros, scales, g_idx)
    assert torch.equal(again.in_perm, ql.in_perm)
    x = torch.randn(3, k)
    with torch.no_grad():
        assert torch.equal(again(x), ql(x))


def test_gptq_sym_becomes_symmetric_spec_and_round_trips():
    k, n, bits = 128, 32, 4
    codes, _, scales, g_idx = known_layer(n, k, bits, 32, seed=1)
    zeros = np.full((k // 32, n), 8)
    for version, stored in ((1, zeros - 1), (2, zeros)):
        ql = gptq_to_quantlinear(gptq_qweight(codes, bits), t(stream_pack(stored, bits)), scales,
                                 None, bits, 32, version, sym=True)
        assert ql.spec.symmetric and ql.zeros is None
        check_layer(ql, codes, zeros, scales, g_idx)
        out = quantlinear_to_gptq(ql, version)
        assert torch.equal(out["qzeros"], t(stream_pack(stored, bits)))
        assert torch.equal(out["qweight"], gptq_qweight(codes, bits))
    # sym=True in the config but other zero points: imported asymmetric, values exact
    codes, zeros, scales, g_idx = known_layer(n, k, bits, 32, seed=2)
    ql = gptq_to_quantlinear(gptq_qweight(codes, bits), t(stream_pack(zeros, bits)), scales, None,
                             bits, 32, 2, sym=True)
    assert not ql.spec.symmetric
    check_layer(ql, codes, zeros, scales, g_idx)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_export_round_trip_from_rtn(bits):
    """A layerpress RTN layer -> GPTQ tensors (checked against the test's own packer) -> back."""
    torch.manual_seed(bits)
    ql = QuantLinear.from_linear(nn.Linear(128, 64), QuantSpec(bits, 64))
    q, s, z = ql.canonical()
    codes = R.unpack(q, bits).to(torch.int64).numpy()  # the plain-PyTorch reference unpacker
    for version in (1, 2):
        out = quantlinear_to_gptq(ql, version)
        assert torch.equal(out["qweight"], gptq_qweight(codes, bits))
        stored = z.t().numpy().astype(np.int64) - (version == 1)
        assert torch.equal(out["qzeros"], t(stream_pack(stored, bits)))
        again = gptq_to_quantlinear(out["qweight"], out["qzeros"], out["scales"], out["g_idx"], bits, 64,
                                    version, bias=out["bias"])
        for a, b in zip(again.canonical(), ql.canonical()):
            assert torch.equal(a, b)
        assert again.spec == ql.spec and torch.equal(again.bias, ql.bias)


# ---- errors --------------------------------------------------------------------------------------

def test_g_idx_not_representable():
    k, n = 128, 32
    codes, zeros, scales, _ = known_layer(n, k, 4, 32, seed=0)
    g_idx = np.arange(k) // 32
    g_idx[0] = 1  # group 0 now has 31 members, group 1 has 33
    with pytest.raises(ValueError, match=r"g_idx: group 0 has 31 input channels, expected 32"):
        gptq_to_quantlinear(gptq_qweight(codes, 4), t(stream_pack(zeros, 4)), scales,
                            t(g_idx.astype(np.int32)), 4, 32, 2, name="blk.q")
    g_idx[0] = 9
    with pytest.raises(ValueError, match=r"g_idx: values must lie in \[0, 4\)"):
        gptq_to_quantlinear(gptq_qweight(codes, 4), t(stream_pack(zeros, 4)), scales,
                            t(g_idx.astype(np.int32)), 4, 32, 2)


def test_layer_errors():
    codes, zeros, scales, _ = known_layer(32, 128, 4, 32, seed=0, zero_range=(1, 15))
    qw, qz = gptq_qweight(codes, 4), t(stream_pack(zeros, 4))
    with pytest.raises(ValueError, match=r"bits=5 is not supported"):
        gptq_to_quantlinear(qw, qz, scales, None, 5, 32)
    with pytest.raises(ValueError, match=r"L\.scales: expected \[4, 32\], got \[4, 31\]"):
        gptq_to_quantlinear(qw, qz, scales[:, :31], None, 4, 32, name="L")
    with pytest.raises(ValueError, match=r"L\.qzeros: expected int32 \[4, 4\], got int32 \[4, 3\]"):
        gptq_to_quantlinear(qw, qz[:, :3], scales, None, 4, 32, name="L")
    with pytest.raises(ValueError, match=r"group_size 48 with in_features 128 cannot be represented"):
        gptq_to_quantlinear(qw, t(stream_pack(np.zeros((3, 32), dtype=np.int64), 4)), scales[:3], None, 4, 48)
    # v1: a stored 15 means z = 16, which no 4-bit zero point can be
    bad = zeros.copy()
    bad[2, 5] = 16
    with pytest.raises(ValueError, match=r"zero point 16 \(group 2, output 5\) exceeds 15"):
        gptq_to_quantlinear(qw, t(stream_pack(bad - 1, 4)), scales, None, 4, 32, version=1)
    # AWQ
    with pytest.raises(ValueError, match=r"L\.qzeros: expected int32 \[4, 4\]"):
        awq_to_quantlinear(t(awq_pack(codes.T)), t(awq_pack(zeros))[:2], scales, 32, name="L")
    with pytest.raises(ValueError, match=r"in_features 128 is not a multiple of group_size 96"):
        awq_to_quantlinear(t(awq_pack(codes.T)), t(awq_pack(zeros)), scales, 96)


def test_export_errors():
    per_ic = QuantLinear.from_linear(nn.Linear(64, 32), QuantSpec(4, 32, "ic"))
    with pytest.raises(ValueError, match=r"blk\.up: per-IC"):
        quantlinear_to_gptq(per_ic, name="blk.up")
    w3 = QuantLinear.from_linear(nn.Linear(64, 32), QuantSpec(3, 32))
    with pytest.raises(ValueError, match=r"AWQ 'gemm' checkpoints are 4-bit, this layer has bits=3"):
        quantlinear_to_awq(w3)
    lin = nn.Linear(64, 32)
    with torch.no_grad():
        lin.weight[:, :32] = lin.weight[:, :32].abs()  # an all-positive group: z = 0
    z0 = QuantLinear.from_linear(lin, QuantSpec(4, 32))
    assert (z0.canonical()[2] == 0).any()
    with pytest.raises(ValueError, match=r"zero points 0, which GPTQ v1 cannot store.*version=2"):
        quantlinear_to_gptq(z0, version=1)
    quantlinear_to_gptq(z0, version=2)  # fine
    bf = QuantLinear.from_linear(nn.Linear(64, 32), QuantSpec(4, 32, scale_dtype=torch.float32))
    with pytest.raises(ValueError, match=r"float32 scales are not all representable in float16"):
        quantlinear_to_awq(bf, name="x")
    ql = QuantLinear.from_linear(nn.Linear(64, 32), QuantSpec(4, 32))
    permuted = QuantLinear.from_quantized(*ql.canonical(), ql.spec, in_perm=torch.randperm(64))
    with pytest.raises(ValueError, match=r"has an input permutation .*export it as GPTQ"):
        quantlinear_to_awq(permuted)
    with pytest.raises(ValueError, match=r"version must be 1 or 2, got 3"):
        quantlinear_to_gptq(ql, version=3)


# ---- in_perm through QuantLinear's state dict and the layerpress save/load ------------------------

def test_in_perm_state_dict_and_io(tmp_path):
    k, n = 64, 32
    codes, zeros, scales, g_idx = known_layer(n, k, 4, 32, seed=4, g_idx=act_order_g_idx(64, 32, 4))
    ql = gptq_to_quantlinear(gptq_qweight(codes, 4), t(stream_pack(zeros, 4)), scales,
                             t(g_idx.astype(np.int32)), 4, 32, 2)
    sd = ql.state_dict()
    assert torch.equal(sd["in_perm"], ql.in_perm)
    fresh = QuantLinear(k, n, ql.spec, bias=False)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.in_perm, ql.in_perm)
    x = torch.randn(4, k)
    with torch.no_grad():
        assert torch.equal(fresh(x), ql(x))
    # a state dict without it clears it; a bad one is refused with the reason
    fresh.load_state_dict({k_: v for k_, v in sd.items() if k_ != "in_perm"})
    assert fresh.in_perm is None
    with pytest.raises(RuntimeError, match=r"in_perm: not a permutation of 0\.\.63"):
        fresh.load_state_dict({**sd, "in_perm": torch.zeros(k, dtype=torch.int64)})
    with pytest.raises(ValueError, match=r"in_perm: expected an integer tensor \[64\]"):
        QuantLinear.from_quantized(*ql.canonical(), ql.spec, in_perm=torch.arange(32))
    # layerpress's own save/load carries it
    from layerpress.flows.io import load_quantized, save_quantized
    model = nn.Sequential(ql)
    save_quantized(model, tmp_path / "lp")
    again = load_quantized(tmp_path / "lp", model=nn.Sequential(nn.Linear(k, n, bias=False)))
    assert torch.equal(again[0].in_perm, ql.in_perm)
    with torch.no_grad():
        assert torch.equal(again(x), ql(x))


# ---- whole models --------------------------------------------------------------------------------

def rtn_model(family, spec):
    m = tiny_model(family)
    for name, mod in list(m.named_modules()):
        if isinstance(mod, nn.Linear) and name != "lm_head":
            parent, _, child = name.rpartition(".")
            setattr(m.get_submodule(parent), child, QuantLinear.from_linear(mod, spec))
    return m


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("fmt", ["awq", "gptq1", "gptq2"])
def test_model_export_import_identical(tmp_path, family, fmt):
    spec = QuantSpec(4, 64, symmetric=(fmt == "gptq1" and family == "opt"))
    model = rtn_model(family, spec)
    ids = calib_ids(2, 12)
    y = logits(model, ids)
    out = tmp_path / "ckpt"
    if fmt == "awq":
        export_awq(model, out)
    else:
        export_gptq(model, out, version=int(fmt[-1]))
    cfg = json.loads((out / "config.json").read_text())
    q = cfg["quantization_config"]
    if fmt == "awq":
        assert q == {"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True,
                     "version": "gemm", "modules_to_not_convert": ["lm_head"]}
    else:
        assert (q["quant_method"], q["bits"], q["group_size"], q["desc_act"], q["sym"],
                q["checkpoint_format"]) == ("gptq", 4, 64, False, spec.symmetric,
                                            "gptq" if fmt == "gptq1" else "gptq_v2")
        assert json.loads((out / "quantize_config.json").read_text()) == q
    assert cfg["architectures"] == [type(model).__name__]
    again = load_checkpoint(out)
    assert type(again) is type(model)
    layers = {n: m for n, m in again.named_modules() if isinstance(m, QuantLinear)}
    assert set(layers) == {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    for name, m in layers.items():
        ref = model.get_submodule(name)
        assert m.spec == (ref.spec if fmt != "awq" else QuantSpec(4, 64)), name
        assert torch.equal(m.dequantized_weight(), ref.dequantized_weight()), name
    assert torch.equal(logits(again, ids), y)
    if family == "opt":  # tied embeddings: stored once, re-tied
        assert again.lm_head.weight is again.model.decoder.embed_tokens.weight


def write_gptq_checkpoint(path, model, bits, group, act_order_layers, seed=0):
    """A GPTQ v1 checkpoint of ``model``'s architecture written by the test from known codes:
    returns {layer: (codes, zeros, scales, g_idx, bias)}."""
    path.mkdir()
    tensors, known = {}, {}
    quantised = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    for i, name in enumerate(quantised):
        lin = model.get_submodule(name)
        k, n = lin.in_features, lin.out_features
        g_idx = act_order_g_idx(k, group, seed + i) if name in act_order_layers else None
        codes, zeros, scales, g_idx = known_layer(n, k, bits, group, seed + i, g_idx=g_idx,
                                                  zero_range=(1, 2 ** bits - 1))
        tensors[f"{name}.qweight"] = gptq_qweight(codes, bits)
        tensors[f"{name}.qzeros"] = t(stream_pack(zeros - 1, bits))
        tensors[f"{name}.scales"] = scales
        tensors[f"{name}.g_idx"] = t(g_idx.astype(np.int32))
        bias = None
        if lin.bias is not None:
            bias = torch.randn(n, dtype=torch.float16)
            tensors[f"{name}.bias"] = bias
        known[name] = (codes, zeros, scales, g_idx, bias)
    for k_, v in model.state_dict().items():
        if k_.rpartition(".")[0] not in known:
            tensors[k_] = v.to(torch.float16).contiguous()
    if model.config.model_type == "llama":  # older checkpoints store it per layer; it is ignored
        tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(16)
    safetensors_torch.save_file(tensors, str(path / "model.safetensors"))
    cfg = model.config.to_dict()
    cfg["architectures"] = [type(model).__name__]
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": bits, "group_size": group,
                                  "desc_act": bool(act_order_layers), "sym": False}
    (path / "config.json").write_text(json.dumps(cfg))
    return known


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_model_import_from_known_gptq_checkpoint(exact_cpu_gemm_variant, tmp_path, family):
    """A hand-written act-order GPTQ v1 checkpoint: every layer's weight exactly, the logits of the
    whole model against the same model with those float weights (on an exact CPU GEMM variant: a
    bf16 one would blur the 1e-4 comparison), and save/re-export round trips."""
    base = tiny_model(family, layers=1)
    act = {n for n, m in base.named_modules() if n.endswith(("q_proj", "down_proj", "fc2"))}
    known = write_gptq_checkpoint(tmp_path / "gptq", base, 4, 32, act)
    model = load_gptq(tmp_path / "gptq")
    for name, (codes, zeros, scales, g_idx, bias) in known.items():
        ql = model.get_submodule(name)
        assert isinstance(ql, QuantLinear) and (ql.in_perm is not None) == (name in act), name
        check_layer(ql, codes, zeros, scales, g_idx, bias)
    # the float32 model with exactly those weights and the checkpoint's other (fp16) tensors
    ckpt = safetensors_torch.load_file(str(tmp_path / "gptq" / "model.safetensors"))
    ref = tiny_model(family, layers=1)
    ref.load_state_dict({k: v for k, v in ckpt.items()
                         if not k.endswith(("qweight", "qzeros", "scales", "g_idx"))}, strict=False)
    for name, (codes, zeros, scales, g_idx, bias) in known.items():
        ref.get_submodule(name).weight.data = reference_weight(codes, zeros, scales, g_idx).float()
    ids = calib_ids(2, 8)
    y, y_ref = logits(model.float(), ids), logits(ref, ids)
    assert (y - y_ref).abs().max() <= 1e-4 * y_ref.abs().max()
    # GPTQ re-export: the very same tensors; layerpress save/load: the very same model
    export_gptq(model, tmp_path / "again", version=1)
    a = safetensors_torch.load_file(str(tmp_path / "again" / "model.safetensors"))
    for name in known:
        for key in ("qweight", "qzeros", "g_idx"):
            orig = safetensors_torch.load_file(str(tmp_path / "gptq" / "model.safetensors"))
            assert torch.equal(a[f"{name}.{key}"], orig[f"{name}.{key}"]), (name, key)
    from layerpress.flows.io import save_quantized
    save_quantized(model, tmp_path / "lp")
    assert torch.equal(logits(load_checkpoint(tmp_path / "lp"), ids), y)


def test_model_level_errors(tmp_path):
    model = rtn_model("llama", QuantSpec(4, 64))
    export_gptq(model, tmp_path / "g")
    cfg_path = tmp_path / "g" / "config.json"
    cfg = json.loads(cfg_path.read_text())

    def with_q(**changes):
        c = json.loads(json.dumps(cfg))
        c["quantization_config"].update(changes)
        cfg_path.write_text(json.dumps(c))

    with_q(bits=5)
    with pytest.raises(ValueError, match=r"GPTQ bits=5 is not supported"):
        load_checkpoint(tmp_path / "g")
    with_q(checkpoint_format="marlin")
    with pytest.raises(ValueError, match=r"checkpoint_format 'marlin' is not supported"):
        load_gptq(tmp_path / "g")
    with_q(quant_method="awq")
    with pytest.raises(ValueError, match=r"quant_method is 'awq', not 'gptq'"):
        load_gptq(tmp_path / "g")
    with_q(quant_method="bitsandbytes")
    with pytest.raises(ValueError, match=r"quant_method 'bitsandbytes' is not supported"):
        load_checkpoint(tmp_path / "g")
    # a model whose layers are not the checkpoint's
    with_q()
    small = tiny_model("llama")
    small.model.layers[0].mlp.up_proj = nn.Linear(128, 128, bias=False)
    with pytest.raises(ValueError, match=r"up_proj\.qweight has shape \[16, 256\], but the model's "
                                         r"layer is \[out 128, in 128\]"):
        load_gptq(tmp_path / "g", model=small)
    # truncated / missing tensors
    w = tmp_path / "g" / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"truncated or corrupt"):
        load_gptq(tmp_path / "g")
    sd = safetensors_torch.load(data)
    safetensors_torch.save_file({**sd, "model.extra.weight": torch.ones(2)}, str(w))
    with pytest.raises(ValueError, match=r"tensors the model does not have: \['model\.extra\.weight'\]"):
        load_gptq(tmp_path / "g")
    del sd["model.norm.weight"]
    safetensors_torch.save_file(sd, str(w))
    with pytest.raises(ValueError, match=r"lacks tensors the model needs: \['model\.norm\.weight'\]"):
        load_gptq(tmp_path / "g")
    # AWQ settings
    export_awq(model, tmp_path / "a")
    a_cfg = tmp_path / "a" / "config.json"
    base = json.loads(a_cfg.read_text())
    for change, msg in (({"version": "gemv"}, r"AWQ version 'gemv' is not supported"),
                        ({"zero_point": False}, r"zero_point=false is not supported"),
                        ({"bits": 3}, r"AWQ bits=3 is not supported")):
        c = json.loads(json.dumps(base))
        c["quantization_config"].update(change)
        a_cfg.write_text(json.dumps(c))
        with pytest.raises(ValueError, match=msg):
            load_awq(tmp_path / "a")
    # exporting: per-IC layer named; mixed group sizes; refusing to overwrite
    mixed = rtn_model("llama", QuantSpec(4, 64))
    mixed.model.layers[1].mlp.down_proj = QuantLinear.from_linear(nn.Linear(256, 128, bias=False),
                                                                  QuantSpec(4, 32, "ic"))
    with pytest.raises(ValueError, match=r"layer 'model\.layers\.1\.mlp\.down_proj' is quantised per "
                                         r"input channel"):
        export_gptq(mixed, tmp_path / "x")
    mixed.model.layers[1].mlp.down_proj = QuantLinear.from_linear(nn.Linear(256, 128, bias=False),
                                                                  QuantSpec(4, 128))
    with pytest.raises(ValueError, match=r"one group_size for all layers"):
        export_awq(mixed, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    with pytest.raises(FileExistsError):
        export_awq(model, tmp_path / "a")


def test_sharded_weights_side_config_and_dtype(tmp_path):
    """Shards listed in model.safetensors.index.json; AutoGPTQ's quantize_config.json instead of
    a quantization_config entry; dtype= casting the non-quantised tensors."""
    model = rtn_model("opt", QuantSpec(4, 64))
    out = tmp_path / "g"
    export_gptq(model, out, version=2)
    sd = safetensors_torch.load_file(str(out / "model.safetensors"))
    (out / "model.safetensors").unlink()
    keys = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for fname, ks in shards.items():
        safetensors_torch.save_file({k: sd[k] for k in ks}, str(out / fname))
    index = {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    cfg = json.loads((out / "config.json").read_text())
    del cfg["quantization_config"]
    (out / "config.json").write_text(json.dumps(cfg))
    ids = calib_ids(2, 8)
    again = load_checkpoint(out)
    assert torch.equal(logits(again, ids), logits(model, ids))
    half = load_gptq(out, dtype=torch.bfloat16)
    assert half.model.decoder.embed_tokens.weight.dtype == torch.bfloat16
    q_proj = half.model.decoder.layers[0].self_attn.q_proj
    assert q_proj.scales.dtype == torch.float16 and q_proj.bias.dtype == torch.bfloat16
    # an index naming a tensor its shard does not hold
    index["weight_map"]["model.ghost.weight"] = "model-00001-of-00002.safetensors"
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"lists tensors its shards do not hold: \['model\.ghost\.weight'\]"):
        load_gptq(out)


def test_gpt2_conv1d_round_trip(tmp_path):
    """GPT-2 keeps its linears as Conv1D (weight [in, out]); GPTQ stores them like any linear."""
    from layerpress import ops
    from layerpress.flows.models import is_conv1d

    model, spec = tiny_model("gpt2"), QuantSpec(4, 32)
    for name, mod in list(model.named_modules()):
        if is_conv1d(mod):
            codes, s, z = ops.quantize(mod.weight.detach().t().contiguous(), spec)
            ql = QuantLinear.from_quantized(ops.pack(codes, 4), s, z, spec, bias=mod.bias.detach())
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, ql)
    ids = calib_ids(2, 8)
    export_gptq(model, tmp_path / "g", version=2)
    again = load_checkpoint(tmp_path / "g")
    attn = again.transformer.h[0].attn.c_attn
    assert isinstance(attn, QuantLinear) and (attn.in_features, attn.out_features) == (128, 384)
    assert torch.equal(logits(again, ids), logits(model, ids))
