"""Side paths of QuantLinear (16-bit outliers as a sparse matrix, LoRC low-rank correction) and
the flows that produce them (flows/side_paths.py): forward/backward against a float64 reference
built here from the stored tensors, state dict / save-load round trips, torch.compile, the error
reductions, and argument errors."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from layerpress import QuantLinear, QuantSpec
from layerpress import reference as R
from layerpress.flows.quantizers import gptq, rtn
from layerpress.flows.side_paths import (check_side_args, fit_outlier_values, lorc_factors,
                                         mask_outliers, quantise_with_side_paths, select_outliers)

from lp_testutils import (assert_within, cpu_gemm_operands, dequant64, dtype_id, folded_magnitude, gemm_tolerance,
                          spec_id)

pytestmark = pytest.mark.usefixtures("torch_single_thread")

SPECS = [QuantSpec(4, 32, "oc", False, torch.float16), QuantSpec(3, 32, "ic", True, torch.bfloat16)]
K, N = 128, 96


def _problem(seed=0, n=N, k=K, samples=256):
    """A weight with planted large entries and inputs with uneven channel scales."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, k, generator=g) * torch.linspace(0.2, 3.0, k)
    w = torch.randn(n, k, generator=g) * 0.05
    big = torch.randperm(n * k, generator=g)[: n * k // 100]
    w.view(-1)[big] *= 10
    return w, x, (x.t() @ x).double() * (2.0 / samples)


def _out_err(w, w_hat, H):
    d = (w - w_hat).double()
    return ((d @ H) * d).sum().item()


def _side_layer(spec, outliers=0.02, rank=4, side_dtype=torch.float16, bias=True, seed=0):
    w, _, H = _problem(seed)
    res = quantise_with_side_paths(w, spec, lambda w_, s_: rtn(w_, s_), H, outliers=outliers,
                                   lorc_rank=rank, side_dtype=side_dtype)
    b = torch.linspace(-1, 1, N) if bias else None
    side = res.side.kwargs() if hasattr(res, "side") else {}
    return QuantLinear.from_quantized(res.qweight, res.scales, res.zeros, spec, b, **side), res


def _reference_weight64(ql):
    """dequant(W) + S + B·A in float64 from the layer's state dict (independent of its forward)."""
    sd = ql.state_dict()
    spec = ql.spec
    w = dequant64(R.unpack(sd["qweight"], spec.bits), sd["scales"], sd.get("zeros"), spec)
    s = torch.zeros(N, K, dtype=torch.float64)
    if "outlier_idx" in sd:
        for flat, v in zip(sd["outlier_idx"].tolist(), sd["outlier_val"].double().tolist()):
            s[flat // K, flat % K] = v
    low = torch.zeros(N, K, dtype=torch.float64)
    if "lorc_a" in sd:
        low = sd["lorc_b"].double() @ sd["lorc_a"].double()
    codes = R.unpack(sd["qweight"], spec.bits)
    mag = folded_magnitude(codes, sd["scales"], sd.get("zeros"), spec)
    side_mag = s.abs() + (sd["lorc_b"].double().abs() @ sd["lorc_a"].double().abs() if "lorc_a" in sd else 0)
    return w, w + s + low, mag + side_mag


@pytest.mark.parametrize("adtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("parts", ["outliers", "lorc", "both"])
@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
def test_forward_and_backward_match_float64_reference(spec, parts, adtype):
    ql, _ = _side_layer(spec, outliers=0.0 if parts == "lorc" else 0.02,
                        rank=0 if parts == "outliers" else 4)
    assert (ql.outlier_count > 0) == (parts != "lorc") and (ql.lorc_rank > 0) == (parts != "outliers")
    w_main, w_eff, mag = _reference_weight64(ql)
    torch.manual_seed(1)
    x = torch.randn(3, 5, K).to(adtype).requires_grad_()
    y = ql(x)
    assert y.dtype == adtype and y.shape == (3, 5, N)
    b = ql.bias.detach().to(adtype)
    x64 = x.detach().double().reshape(-1, K)
    # the main GEMM's operands as the active CPU variant multiplies them; side terms in fp32
    xk, wk = cpu_gemm_operands(x.detach().reshape(-1, K), w_main, ql.spec)
    main64 = F.linear(xk, wk, b.double())
    y64 = main64 + F.linear(x64, w_eff - w_main)
    eps = torch.finfo(adtype).eps
    # the GEMM's output is rounded to adtype before the fp32 side terms are added: one more rounding
    tol = gemm_tolerance(xk, mag, y64, adtype, b) + eps * main64.abs()
    assert_within(y.detach().reshape(-1, N), y64, tol, "forward")
    # the side terms matter: without them the output is far outside the tolerance
    assert ((main64 - y64).abs() > tol).any()

    gout = torch.randn(3, 5, N).to(adtype)
    y.backward(gout)
    g64 = gout.double().reshape(-1, N)
    gx64 = g64 @ w_eff
    tol_g = gemm_tolerance(g64, mag.t(), gx64, adtype) + eps * (g64 @ w_main).abs()
    assert x.grad.dtype == adtype
    assert_within(x.grad.reshape(-1, K), gx64, tol_g, "grad x")


def test_effective_weight_and_storage_bits():
    spec = SPECS[0]
    ql, res = _side_layer(spec, outliers=0.01, rank=8)
    _, w_eff, _ = _reference_weight64(ql)
    assert torch.allclose(ql.effective_weight().double(), w_eff, rtol=0, atol=1e-6)
    assert torch.equal(ql.effective_weight(), res.weight)  # the flow's effective weight is the layer's
    nnz = round(0.01 * N * K)
    assert ql.outlier_count == nnz and ql.lorc_rank == 8
    # codes + fp16 scales + uint8 zeros + (int32 index + fp16 value) per outlier + fp16 A and B
    want = N * K * 4 + (N * K // 32) * (16 + 8) + nnz * (32 + 16) + 8 * (K + N) * 16
    assert ql.storage_bits() == want
    assert ql.effective_bits() == pytest.approx(want / (N * K))
    plain = QuantLinear.from_linear(nn.Linear(256, 64), QuantSpec(4, 128, "oc"))
    assert plain.effective_bits() == pytest.approx(4 + 24 / 128)


def test_state_dict_round_trip_and_mismatches():
    ql, _ = _side_layer(SPECS[1], outliers=0.02, rank=3, side_dtype=torch.bfloat16)
    sd = ql.state_dict()
    for key in ("outlier_idx", "outlier_val", "lorc_a", "lorc_b"):
        assert key in sd
    assert sd["outlier_idx"].dtype == torch.int32 and sd["outlier_val"].dtype == torch.bfloat16
    fresh = QuantLinear(K, N, SPECS[1], outliers=ql.outlier_count, lorc_rank=3, side_dtype=torch.bfloat16)
    fresh.load_state_dict(sd)
    x = torch.randn(4, K)
    assert torch.equal(fresh(x), ql(x))
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, sd[k]), k

    wrong_count = QuantLinear(K, N, SPECS[1], outliers=ql.outlier_count + 1, lorc_rank=3,
                              side_dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"outlier_idx: expected torch.int32 \[%d\]" % (ql.outlier_count + 1)):
        wrong_count.load_state_dict(sd)
    wrong_dtype = QuantLinear(K, N, SPECS[1], outliers=ql.outlier_count, lorc_rank=3)  # fp16
    with pytest.raises(RuntimeError, match="outlier_val: expected torch.float16"):
        wrong_dtype.load_state_dict(sd)
    no_side = QuantLinear(K, N, SPECS[1])
    with pytest.raises(RuntimeError, match="Unexpected key.*outlier_idx"):
        no_side.load_state_dict(sd)
    only_lorc = {k: v for k, v in sd.items() if not k.startswith("outlier")}
    with pytest.raises(RuntimeError, match="Missing key.*outlier_idx"):
        fresh.load_state_dict(only_lorc)
    bad = dict(sd, outlier_idx=sd["outlier_idx"].flip(0).contiguous())
    with pytest.raises(RuntimeError, match="strictly increasing"):
        fresh.load_state_dict(bad)


def test_moves_keep_side_dtype_and_repr():
    ql, _ = _side_layer(SPECS[0], outliers=0.01, rank=2, side_dtype=torch.float32, bias=False)
    x = torch.randn(2, K)
    y = ql(x)
    ql.half()  # casts floating parameters, not the side paths (like the scales)
    assert ql.outlier_val.dtype == torch.float32 and ql.lorc_a.dtype == torch.float32
    ql.to(torch.float32)
    assert torch.equal(ql(x), y)
    ql.to("cpu")
    r = repr(ql)
    assert f"outliers={ql.outlier_count} (1.00%)" in r and "lorc_rank=2" in r and "side_dtype=float32" in r
    ql.set_side_paths()  # removes them
    assert ql.outlier_count == 0 and ql.lorc_rank == 0 and "outliers" not in repr(ql)
    assert "outlier_idx" not in ql.state_dict()


def test_set_side_paths_rejects_bad_tensors():
    ql = QuantLinear(K, N, SPECS[0])
    idx = torch.tensor([1, 5, 9], dtype=torch.int32)
    val = torch.ones(3, dtype=torch.float16)
    with pytest.raises(ValueError, match="outlier_idx: expected int32"):
        ql.set_side_paths(idx.long(), val)
    with pytest.raises(ValueError, match=r"must lie in \[0, %d\)" % (N * K)):
        ql.set_side_paths(torch.tensor([0, N * K], dtype=torch.int32), val[:2])
    with pytest.raises(ValueError, match="strictly increasing"):
        ql.set_side_paths(torch.tensor([3, 3], dtype=torch.int32), val[:2])
    with pytest.raises(ValueError, match="one value per index"):
        ql.set_side_paths(idx, val[:2])
    with pytest.raises(ValueError, match="given together"):
        ql.set_side_paths(idx, None)
    with pytest.raises(ValueError, match=r"lorc_a: expected \[r, %d\]" % K):
        ql.set_side_paths(lorc_a=torch.zeros(2, K + 1, dtype=torch.float16), lorc_b=torch.zeros(N, 2, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"lorc_b: expected \[%d, 2\]" % N):
        ql.set_side_paths(lorc_a=torch.zeros(2, K, dtype=torch.float16), lorc_b=torch.zeros(N, 3, dtype=torch.float16))
    with pytest.raises(ValueError, match="share one dtype"):
        ql.set_side_paths(idx, val, torch.zeros(2, K), torch.zeros(N, 2))
    with pytest.raises(ValueError, match="NaN or Inf"):
        ql.set_side_paths(idx, torch.tensor([1, float("nan"), 2], dtype=torch.float16))
    with pytest.raises(ValueError, match="lorc_rank must be in"):
        QuantLinear(K, N, SPECS[0], lorc_rank=N + 1)


def test_torch_compile_mlp_with_side_paths_fullgraph():
    """The sparse product is an opaque custom op with a fake and autograd, so the MLP is captured
    as one graph (fullgraph=True) with its backward (AOT autograd); outputs and input gradients
    match eager. (aot_eager rather than inductor keeps the test fast: tests/test_quantlinear.py
    runs inductor on the GEMM op, and the side path adds only this op and plain matmuls.)"""
    torch._dynamo.reset()
    torch.manual_seed(0)
    ql1, _ = _side_layer(SPECS[0], outliers=0.02, rank=4, seed=1)
    ql2, _ = _side_layer(SPECS[1], outliers=0.01, rank=0, seed=2)  # outliers only
    model = nn.Sequential(ql1, nn.GELU(), nn.Linear(N, K), ql2)
    x = torch.randn(6, K)
    xe = x.clone().requires_grad_()
    model(xe).square().sum().backward()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    xc = x.clone().requires_grad_()
    yc = compiled(xc)
    yc.square().sum().backward()
    torch.testing.assert_close(yc, model(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


# ---- flows ----------------------------------------------------------------------------------------

def test_select_and_mask_outliers_against_reference():
    w, _, _ = _problem(3, n=64, k=64)
    spec = QuantSpec(4, 32, "ic", False)
    idx = select_outliers(w, 40)
    want = torch.sort(torch.argsort(w.abs().reshape(-1), descending=True)[:40]).values
    assert torch.equal(idx, want)
    masked = mask_outliers(w, idx, spec)
    kept = set(idx.tolist())
    for k in range(64):  # per-IC groups: 32 consecutive output rows of one column
        for g0 in (0, 32):
            members = [(n, k) for n in range(g0, g0 + 32)]
            rest = [w[n, k].item() for n, k_ in members if n * 64 + k_ not in kept]
            lo, hi = min(rest), max(rest)
            for n, k_ in members:
                v = masked[n, k_].item()
                if n * 64 + k_ in kept:
                    assert v == min(max(w[n, k_].item(), lo), hi)
                else:
                    assert v == w[n, k_].item()


def test_fitted_outlier_values_are_optimal():
    w, _, H = _problem(4)
    spec = SPECS[0]
    idx = select_outliers(w, 150)
    w_hat = rtn(mask_outliers(w, idx, spec), spec).weight
    assert torch.equal(fit_outlier_values(w, w_hat, idx), (w - w_hat).reshape(-1)[idx])  # no H: exact
    s = fit_outlier_values(w, w_hat, idx, H)
    eff = w_hat.clone()
    eff.view(-1)[idx] += s
    # optimality of each row's kept values: the gradient of dᵀ(H + λI)d vanishes on them
    Hd = H + 0.01 * H.diagonal().mean() * torch.eye(K, dtype=H.dtype)
    grad = ((w - eff).double() @ Hd).reshape(-1)[idx]
    assert grad.abs().max() < 1e-4 * ((w - w_hat).double() @ Hd).abs().max()
    exact = w_hat.clone()
    exact.view(-1)[idx] = w.view(-1)[idx]
    assert _out_err(w, eff, H) < _out_err(w, exact, H)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_outliers_lower_the_error(method):
    w, _, H = _problem(5)
    spec = QuantSpec(3, 32, "oc", False)
    q = (lambda w_, s_: rtn(w_, s_)) if method == "rtn" else (lambda w_, s_: gptq(w_, H, s_))
    errs = [_out_err(w, quantise_with_side_paths(w, spec, q, H, outliers=f).weight, H)
            for f in (0.0, 0.005, 0.02)]
    assert errs[0] > errs[1] > errs[2], errs
    assert errs[1] < 0.8 * errs[0]
    if method == "rtn":  # and the plain weight error ‖W − Ŵ‖ (GPTQ minimises the output error)
        base = rtn(w, spec).weight
        with_out = quantise_with_side_paths(w, spec, q, None, outliers=0.005).weight
        assert (w - with_out).norm() < 0.8 * (w - base).norm()


def test_lorc_is_the_best_rank_r_correction_and_monotone():
    w, _, H = _problem(6)
    spec = QuantSpec(3, 32, "oc", False)
    base = rtn(w, spec).weight
    E = (w - base).double()
    sv = torch.linalg.svdvals(E)
    L = torch.linalg.cholesky(H + 0.01 * H.diagonal().mean() * torch.eye(K, dtype=H.dtype))
    svw = torch.linalg.svdvals(E @ L)
    frob, out = [], []
    for r in (1, 2, 4, 8, 16):
        A, B = lorc_factors(E.float(), r)
        resid = (E - B.double() @ A.double()).norm() ** 2  # Eckart-Young: Σ_{i>r} σ_i²
        assert resid.item() == pytest.approx((sv[r:] ** 2).sum().item(), rel=1e-4)
        Aw, Bw = lorc_factors(E.float(), r, H)
        residw = ((E - Bw.double() @ Aw.double()) @ L).norm() ** 2
        assert residw.item() == pytest.approx((svw[r:] ** 2).sum().item(), rel=1e-4)
        res = quantise_with_side_paths(w, spec, lambda w_, s_: rtn(w_, s_), None, lorc_rank=r)
        frob.append((w - res.weight).norm().item())
        resw = quantise_with_side_paths(w, spec, lambda w_, s_: rtn(w_, s_), H, lorc_rank=r)
        out.append(_out_err(w, resw.weight, H))
    base_frob, base_out = (w - base).norm().item(), _out_err(w, base, H)
    assert all(a > b for a, b in zip([base_frob] + frob, frob)), frob
    assert all(a > b for a, b in zip([base_out] + out, out)), out


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match=r"outliers must be a fraction of the weights in \[0, 1\), got 1.0"):
        check_side_args(outliers=1.0)
    with pytest.raises(ValueError, match=r"outliers must be .* got -0.1"):
        check_side_args(outliers=-0.1)
    with pytest.raises(ValueError, match=r"outliers must be .* got True"):
        check_side_args(outliers=True)
    with pytest.raises(ValueError, match=r"lorc_rank must be an integer >= 0 .* got -1"):
        check_side_args(lorc_rank=-1)
    with pytest.raises(ValueError, match=r"lorc_rank must be an integer >= 0 .* got 2.5"):
        check_side_args(lorc_rank=2.5)
    with pytest.raises(ValueError, match="side_dtype must be one of"):
        check_side_args(side_dtype=torch.int8)
    with pytest.raises(ValueError, match="outlier criterion must be one of"):
        check_side_args(criterion="random")
    w, _, _ = _problem(7)
    with pytest.raises(ValueError, match=r"lorc_rank must be in \[0, min\(out_features, in_features\) = 96\] "
                                         r"for a \[96, 128\] weight, got 97"):
        quantise_with_side_paths(w, SPECS[0], lambda w_, s_: rtn(w_, s_), None, lorc_rank=97)
    with pytest.raises(ValueError, match="overflows side_dtype"):
        quantise_with_side_paths(w * 1e6, QuantSpec(4, 32, "oc", scale_dtype=torch.float32),
                                 lambda w_, s_: rtn(w_, s_), None, outliers=0.01)


# ---- whole model: quantize_model, save, load ---------------------------------------------------

def test_quantize_model_save_load_with_side_paths(tmp_path):
    from flows_testutils import calib_ids, tiny_model

    from layerpress.flows import load_quantized, quantize_model, save_quantized

    ids = calib_ids()
    plain = tiny_model("llama", layers=1)
    rep0 = quantize_model(plain, bits=3, group_size=32, axis="oc", method="rtn", calib=ids)
    model = tiny_model("llama", layers=1)
    rep = quantize_model(model, bits=3, group_size=32, axis="oc", method="rtn", calib=ids,
                         outliers=0.01, lorc_rank=4)
    qls = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert qls and all(m.outlier_count == round(0.01 * m.in_features * m.out_features) and m.lorc_rank == 4
                       for m in qls.values())
    assert all(a.rel_error < b.rel_error for a, b in zip(rep.layers, rep0.layers))
    assert rep.quantized_bytes == sum(m.storage_bits() for m in qls.values()) // 8
    with pytest.raises(ValueError, match=r"outliers must be a fraction of the weights in \[0, 1\)"):
        quantize_model(tiny_model("llama", layers=1), bits=3, calib=ids, outliers=1.5)
    with pytest.raises(ValueError, match=r"lorc_rank must be in \[0, min\(out_features, in_features\)\] "
                                         r"for every linear, got 129; model.layers.0.self_attn.q_proj is \[128, 128\]"):
        quantize_model(tiny_model("llama", layers=1), bits=3, calib=ids, lorc_rank=129)

    x = torch.randint(0, 256, (2, 12))
    want = model(input_ids=x).logits
    save_quantized(model, tmp_path / "q")
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    entry = cfg["quantization_config"]["layers"]["model.layers.0.mlp.up_proj"]
    assert entry["lorc_rank"] == 4 and entry["outliers"] == qls["model.layers.0.mlp.up_proj"].outlier_count
    assert entry["side_dtype"] == "float16"
    loaded = load_quantized(tmp_path / "q")
    assert torch.equal(loaded(input_ids=x).logits, want)

    # a config that does not match the tensors is refused with the reason
    for change, pattern in (({"lorc_rank": 5}, r"lorc_a: expected torch.float16 \[5, 128\]"),
                            ({"outliers": entry["outliers"] - 1}, r"outlier_idx: expected torch.int32"),
                            ({"outliers": 0, "lorc_rank": 0}, r"unexpected.*outlier_idx"),
                            ({"side_dtype": "int8"}, r"side_dtype 'int8' is not one of")):
        bad = json.loads(json.dumps(cfg))
        bad["quantization_config"]["layers"]["model.layers.0.mlp.up_proj"].update(change)
        (tmp_path / "q" / "config.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=pattern):
            load_quantized(tmp_path / "q")


@pytest.mark.parametrize("side", [{}, {"outliers": 4, "lorc_rank": 2}], ids=["plain", "side-paths"])
def test_meta_construction_to_empty_and_load(side):
    """A QuantLinear built on the meta device (before its weights exist), with or without side
    paths, moves off it with Module.to_empty and then loads a state dict exactly."""
    torch.manual_seed(0)
    spec = QuantSpec(bits=4, group_size=32)
    real = QuantLinear(64, 32, spec, **side)
    real.load_state_dict(QuantLinear.from_linear(torch.nn.Linear(64, 32), spec).state_dict(), strict=False)
    if side:
        real.set_side_paths(torch.tensor([1, 70, 200, 1000], dtype=torch.int32),
                            torch.randn(4, dtype=torch.float16), torch.randn(2, 64, dtype=torch.float16),
                            torch.randn(32, 2, dtype=torch.float16))
    m = QuantLinear(64, 32, spec, device="meta", **side)
    assert m.qweight.is_meta and sorted(m.state_dict()) == sorted(real.state_dict())
    m.to_empty(device="cpu")
    m.load_state_dict(real.state_dict())
    x = torch.randn(3, 64)
    assert torch.equal(m(x), real(x))
