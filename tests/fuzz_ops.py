"""Fuzz targets for every ``torch.ops.layerpress`` op (tests/fuzz_harness.py runs them).

Each case draws shapes (0-size, 1, odd, large), strides (transposed, sliced, expanded,
overlapping rows), dtypes, integer arguments out of range (bits, group size, axis, layout,
out_features, k, seeds) and NaN/Inf values. The op must either give the right result --
against the plain-PyTorch reference (layerpress.reference, float64 products) or, for a layout
the op copies, the result on a contiguous copy -- or raise one of the API's exceptions with a
message that names an argument.
"""
from __future__ import annotations

import math

import torch
from hypothesis import strategies as st

import layerpress
from layerpress import QuantSpec
from layerpress import reference as R

from fuzz_harness import API_ERRORS, FuzzFailure
from lp_testutils import folded_magnitude, gemm_tolerance
from test_norms import ref_norm

_ops = torch.ops.layerpress
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64, "int32": torch.int32, "uint8": torch.uint8}
FLOATS = ("float32", "bfloat16", "float16")
VARIANTS = list(layerpress.build_info()["cpu_gemm_variants"])
LAYOUTS = ("contiguous", "transposed", "sliced", "expanded", "overlapping")
SPECIALS = ("none", "none", "nan", "inf", "huge", "zero")
ODD_INTS = (-(2 ** 63), -(2 ** 31), -1, 0, 1, 5, 7, 16, 33, 2 ** 31, 2 ** 40)


def _names(op, msg: str) -> bool:
    """The message names one of the op's arguments (or the shape rule that involves them)."""
    schema = getattr(_ops, op).default._schema
    words = [a.name for a in schema.arguments] + ["in_features", "out_features", "K=", "N=", "group"]
    return any(w in msg for w in words)


def _expect_error(op, fn, why):
    try:
        fn()
    except API_ERRORS as e:
        if not str(e).strip() or not _names(op, str(e)):
            raise FuzzFailure(f"{op}: {why}: {type(e).__name__} names no argument: {e}") from None
        return e
    raise FuzzFailure(f"{op}: {why}: no error")


def _call(op, fn, valid: bool, why: str = "invalid arguments"):
    """``fn()``; an error is right only for invalid arguments and must name one."""
    try:
        return fn(), None
    except API_ERRORS as e:
        if valid:
            raise FuzzFailure(f"{op}: valid arguments raised {type(e).__name__}: {e}") from None
        if not str(e).strip() or not _names(op, str(e)):
            raise FuzzFailure(f"{op}: {why}: {type(e).__name__} names no argument: {e}") from None
        return None, e


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _layout(t: torch.Tensor, how: str) -> torch.Tensor:
    """``t`` (2-D) with the same values in another memory layout."""
    if t.dim() != 2 or t.numel() == 0:
        return t
    if how == "transposed":
        return t.t().contiguous().t()
    if how == "sliced":
        wide = torch.zeros(t.shape[0], t.shape[1] * 2, dtype=t.dtype)
        wide[:, ::2] = t
        return wide[:, ::2]
    if how == "expanded":  # every row the same memory (stride 0)
        return t[:1].expand(t.shape[0], t.shape[1])
    if how == "overlapping" and t.shape[1] > 1:  # rows overlapping by all but one element
        flat = torch.cat([t[:1, :].reshape(-1), torch.zeros(t.shape[0], dtype=t.dtype)])
        return flat.as_strided(t.shape, (1, 1))
    return t


def _values(shape, dtype, special, g):
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    if special == "huge":
        x = x * 1e30
    elif special == "zero":
        x = torch.zeros(shape, dtype=torch.float64)
    elif special in ("nan", "inf") and x.numel():
        flat = x.view(-1)
        flat[torch.randint(0, flat.numel(), (max(1, flat.numel() // 50),), generator=g)] = (
            float("nan") if special == "nan" else float("inf"))
    if dtype.is_floating_point:
        return x.to(dtype)
    return x.clamp(-100, 100).to(dtype)


def _valid_spec(bits, group, axis, n, k):
    if bits not in (2, 3, 4, 8) or group not in (32, 64, 128, 256, -1) or axis not in (0, 1):
        return False
    if k < 32 or k % 32 or n < 1:
        return False
    g = group if group != -1 else (k if axis == 0 else n)
    return (k % g == 0) if axis == 0 else (n % g == 0)


def _spec(bits, group, axis, sym, scale_dtype):
    return QuantSpec(bits=bits, group_size=group, axis="oc" if axis == 0 else "ic", symmetric=sym,
                     scale_dtype=scale_dtype)


# ---- quantize / pack / unpack / dequantize / repack / unrepack ------------------------------------

@st.composite
def quant_case(draw):
    return {
        "n": draw(st.sampled_from([0, 1, 3, 32, 33, 64, 96, 256])),
        "k": draw(st.sampled_from([0, 1, 31, 32, 64, 96, 128, 256])),
        "bits": draw(st.sampled_from([2, 3, 4, 8, 2, 3, 4, 8, 0, 1, 5, 16, -1])),
        "group": draw(st.sampled_from([32, 64, 128, 256, -1, 32, -1, 0, 48, 16, 512, -2])),
        "axis": draw(st.sampled_from([0, 1, 0, 1, 2, -1])),
        "sym": draw(st.booleans()),
        "scale_dtype": draw(st.sampled_from(["float16", "bfloat16", "float32", "float64"])),
        "wdtype": draw(st.sampled_from(FLOATS + ("float32", "float64", "int32"))),
        "special": draw(st.sampled_from(SPECIALS)),
        "layout": draw(st.sampled_from(LAYOUTS)),
        "seed": draw(st.integers(0, 2 ** 16)),
    }


def run_quant(c):
    g = _gen(c["seed"])
    n, k, bits, group, axis = c["n"], c["k"], c["bits"], c["group"], c["axis"]
    wdt, sdt = DTYPES[c["wdtype"]], DTYPES[c["scale_dtype"]]
    w0 = _values((n, k), wdt, c["special"], g)
    w = _layout(w0, c["layout"])
    finite = bool(torch.isfinite(w.double()).all())
    valid = (_valid_spec(bits, group, axis, n, k) and wdt in (torch.float32, torch.bfloat16, torch.float16)
             and sdt != torch.float64 and finite and w.is_contiguous())
    out, err = _call("quantize", lambda: _ops.quantize(w, bits, group, axis, c["sym"], sdt), valid and c["special"] != "huge")
    if out is None:
        return
    if not valid:  # accepted although not "valid": only a layout the op copies
        if not (w.is_contiguous() or _valid_spec(bits, group, axis, n, k)) or not finite:
            raise FuzzFailure(f"quantize accepted invalid input ({c})")
        again = _ops.quantize(w.contiguous(), bits, group, axis, c["sym"], sdt)
        if not all(torch.equal(a, b) for a, b in zip(out, again)):
            raise FuzzFailure("quantize of a strided weight differs from its contiguous copy")
        return
    spec = _spec(bits, group, axis, c["sym"], sdt)
    codes, s, z = out
    rc, rs, rz = R.quantize(w, spec)
    if not (torch.equal(codes, rc) and torch.equal(s, rs) and (c["sym"] or torch.equal(z, rz))):
        raise FuzzFailure("quantize differs from the reference")
    zz = None if c["sym"] else z
    q = _ops.pack(codes, bits)
    if not torch.equal(q, R.pack(codes, bits)):
        raise FuzzFailure("pack differs from the reference")
    if not torch.equal(_ops.unpack(q, bits), codes):
        raise FuzzFailure("unpack(pack(codes)) != codes")
    for out_dt in (torch.float32, torch.bfloat16):
        d = _ops.dequantize(q, s, zz, bits, group, axis, out_dt)
        if not torch.equal(d, R.dequantize(codes, s, zz, spec, out_dt)):
            raise FuzzFailure(f"dequantize ({out_dt}) differs from the reference")
    layout = 1
    rq, rs2, rz2 = _ops.repack(q, s, zz, bits, group, axis, layout)
    back = _ops.unrepack(rq, rs2, rz2 if zz is not None else None, bits, group, axis, layout, n)
    if not (torch.equal(back[0], q) and torch.equal(back[1], s) and (zz is None or torch.equal(back[2], zz))):
        raise FuzzFailure("unrepack(repack(w)) != w")
    # corrupted integer arguments on the packed weight: an error naming the argument, or (for a
    # different but consistent spec) a result of the right shape
    for name, bad in (("bits", bits + 1), ("group_size", 7), ("axis", 3), ("layout", 9)):
        args = dict(bits=bits, group_size=group, axis=axis, layout=layout)
        args[name] = bad
        _expect_error("repack", lambda: _ops.repack(q, s, zz, args["bits"], args["group_size"], args["axis"],
                                                     args["layout"]), f"{name}={bad}")
    # out_features beyond what the (padded) kernel layout holds
    _expect_error("unrepack", lambda: _ops.unrepack(rq, rs2, rz2 if zz is not None else None, bits, group, axis,
                                                    layout, n + 4096), "out_features off")
    # unpack/pack with codes too large for the width, wrong dtypes
    if bits < 8:
        big = codes.clone()
        big.view(-1)[0] = 2 ** bits
        _expect_error("pack", lambda: _ops.pack(big, bits), "a code >= 2^bits")
    _expect_error("pack", lambda: _ops.pack(codes.to(torch.int32), bits), "int32 codes")
    _expect_error("dequantize", lambda: _ops.dequantize(q.to(torch.int64), s, zz, bits, group, axis, None),
                  "int64 qweight")


# ---- gemm / gemm_t ---------------------------------------------------------------------------------

@st.composite
def gemm_case(draw):
    axis = draw(st.sampled_from([0, 1]))
    return {
        "n": draw(st.sampled_from([1, 3, 32, 33, 64, 96, 128] if axis == 0 else [32, 64, 96, 128])),
        "k": draw(st.sampled_from([32, 64, 96, 160, 256])),
        "m": draw(st.sampled_from([0, 1, 2, 3, 5, 7, 8, 15, 16, 17, 31, 33, 64, 100])),
        "batch": draw(st.sampled_from([None, None, 1, 2, 3])),
        "bits": draw(st.sampled_from([2, 3, 4, 8])),
        "group": draw(st.sampled_from([32, -1, 32, 64])),
        "axis": axis,
        "sym": draw(st.booleans()),
        "scale_dtype": draw(st.sampled_from(["float16", "bfloat16", "float32"])),
        "xdtype": draw(st.sampled_from(FLOATS + ("float32", "float64", "int32"))),
        "layout": draw(st.sampled_from(LAYOUTS)),
        "special": draw(st.sampled_from(("none", "none", "none", "nan", "inf", "zero"))),
        "bias": draw(st.sampled_from(["none", "ok", "ok", "wrong_dtype", "wrong_shape"])),
        "mutate": draw(st.sampled_from(["none"] * 6 + ["bits", "group_size", "axis", "layout", "out_features",
                                                       "k_mismatch", "scales_shape", "zeros_dtype"])),
        "odd_int": draw(st.sampled_from(ODD_INTS)),
        "variant": draw(st.sampled_from(VARIANTS)),
        "transposed": draw(st.booleans()),
        "seed": draw(st.integers(0, 2 ** 16)),
    }


def _weight(c, g):
    n, k = c["n"], c["k"]
    group = c["group"]
    if not _valid_spec(c["bits"], group, c["axis"], n, k):
        group = -1
    spec = _spec(c["bits"], group, c["axis"], c["sym"], DTYPES[c["scale_dtype"]])
    w = torch.randn(n, k, generator=g) * 0.1
    codes, s, z = layerpress.ops.quantize(w, spec)
    q = layerpress.ops.pack(codes, spec.bits)
    return spec, codes, s, z, q


def run_gemm(c):
    g = _gen(c["seed"])
    spec, codes, s, z, q = _weight(c, g)
    n, k, bits, axis = c["n"], c["k"], spec.bits, c["axis"]
    group = spec.group_size
    rq, rs, rz = _ops.repack(q, s, z, bits, group, axis, 1)
    if z is None:
        rz = None  # symmetric: repack's third output is an empty placeholder
    xdt = DTYPES[c["xdtype"]]
    inner = n if c["transposed"] else k
    x2 = _values((c["m"], inner), xdt, c["special"], g)
    if c["special"] == "zero":
        x2 = x2 + 0
    x2 = _layout(x2, c["layout"])
    x = x2 if c["batch"] is None else (x2.unsqueeze(0).expand(c["batch"], *x2.shape) if c["layout"] == "expanded"
                                       else x2.repeat(c["batch"], 1, 1) if x2.numel() else x2.reshape(c["batch"], 0, inner))
    out_n = k if c["transposed"] else n
    bias = None
    if c["bias"] != "none" and not c["transposed"] and xdt.is_floating_point:
        bias = torch.randn(n + (1 if c["bias"] == "wrong_shape" else 0), generator=g).to(
            torch.float64 if c["bias"] == "wrong_dtype" and xdt != torch.float64 else xdt)
    args = {"bits": bits, "group_size": group, "axis": axis, "layout": 1, "out_features": n}
    qq, ss, zz = rq, rs, rz
    mut = c["mutate"]
    if mut in args:
        args[mut] = c["odd_int"] if c["odd_int"] != args[mut] else args[mut] + 1
    elif mut == "k_mismatch":
        x = x[..., :-1] if x.shape[-1] > 1 else torch.cat([x, x], -1)
    elif mut == "scales_shape":
        ss = rs.reshape(-1)[:-1] if rs.numel() > 1 else rs.repeat(2)
    elif mut == "zeros_dtype":
        zz = (rz.to(torch.int32) if rz is not None else torch.zeros(1, dtype=torch.float32))
    valid = (mut == "none" and xdt in (torch.float32, torch.bfloat16, torch.float16)
             and c["bias"] in ("none", "ok"))
    op = "gemm_t" if c["transposed"] else "gemm"
    layerpress.set_cpu_gemm_variant(c["variant"])
    try:
        if c["transposed"]:
            fn = lambda: _ops.gemm_t(x, qq, ss, zz, args["bits"], args["group_size"], args["axis"],  # noqa: E731
                                     args["layout"], args["out_features"])
        else:
            fn = lambda: _ops.gemm(x, qq, ss, zz, bias, args["bits"], args["group_size"], args["axis"],  # noqa: E731
                                   args["layout"], args["out_features"])
        y, err = _call(op, fn, valid)
    finally:
        layerpress.set_cpu_gemm_variant("")
    if y is None:
        return
    if not valid:
        # accepted: must be a harmless mutation (e.g. a bias absent for gemm_t); compare below
        if mut != "none" and mut in ("bits", "group_size", "axis", "layout", "out_features", "k_mismatch",
                                     "scales_shape", "zeros_dtype"):
            raise FuzzFailure(f"{op} accepted a mutated argument ({mut})")
    if y.shape != (*x.shape[:-1], out_n) or y.dtype != x.dtype:
        raise FuzzFailure(f"{op}: output {y.dtype} {list(y.shape)}, expected {x.dtype} {[*x.shape[:-1], out_n]}")
    if y.numel() == 0:
        return
    wd = R.dequantize(codes, s, z, spec).double()  # [n, k]
    x64 = x.reshape(-1, inner).double()
    y64 = y.reshape(-1, out_n).double()
    ref = x64 @ (wd if c["transposed"] else wd.t())
    if bias is not None:
        ref = ref + bias.double()
    mag = folded_magnitude(codes, s, z, spec)
    tol = gemm_tolerance(x.reshape(-1, inner), mag.t() if c["transposed"] else mag, ref, x.dtype,
                         bias if bias is not None else None)
    rows_ok = torch.isfinite(x64).all(-1)
    # rows with NaN/Inf inputs: non-finite wherever the reference is; the other rows: unaffected
    nf = ~torch.isfinite(ref)
    if (torch.isfinite(y64) & nf).any():
        raise FuzzFailure(f"{op}: a finite output where the reference is NaN/Inf")
    fine = rows_ok[:, None] & torch.isfinite(ref) & (ref.abs() < torch.finfo(x.dtype).max / 2)
    bad = fine & ((y64 - ref).abs() > tol)
    if bad.any():
        i = bad.nonzero()[0].tolist()
        raise FuzzFailure(f"{op}: out of tolerance at {i}: got {y64[tuple(i)].item()!r}, ref {ref[tuple(i)].item()!r}, "
                          f"tol {tol[tuple(i)].item():.3g} ({int(bad.sum())} elements)")


# ---- norms -------------------------------------------------------------------------------------------

@st.composite
def norm_case(draw):
    return {
        "kind": draw(st.sampled_from(["rms", "add_rms", "layer", "add_layer", "rms_bwd", "layer_bwd"])),
        "rows": draw(st.sampled_from([0, 1, 2, 3, 7, 33])),
        "cols": draw(st.sampled_from([0, 1, 2, 5, 15, 16, 17, 31, 64, 100, 257])),
        "batch": draw(st.sampled_from([None, None, 2])),
        "dtype": draw(st.sampled_from(FLOATS + ("float64", "int32"))),
        "layout": draw(st.sampled_from(LAYOUTS)),
        "special": draw(st.sampled_from(("none", "none", "nan", "inf", "zero", "huge"))),
        "weight": draw(st.sampled_from(["ok", "ok", "none", "wrong_dtype", "wrong_shape"])),
        "eps": draw(st.sampled_from([1e-6, 1e-5, 0.0, -1.0, float("nan"), float("inf"), 1e30])),
        "variant": draw(st.sampled_from(["generic", "avx512"])),
        "seed": draw(st.integers(0, 2 ** 16)),
    }


NORM_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}


def run_norm(c):
    import os
    g = _gen(c["seed"])
    dt = DTYPES[c["dtype"]]
    shape = (c["rows"], c["cols"]) if c["batch"] is None else (c["batch"], c["rows"], c["cols"])
    x = _values(shape, dt, c["special"], g)
    if x.dim() == 2:
        x = _layout(x, c["layout"])
    r = _values(shape, dt, "none", g)
    cols = c["cols"]
    w = b = None
    if c["weight"] != "none":
        wdt = torch.float64 if (c["weight"] == "wrong_dtype" and dt != torch.float64) else (torch.float32 if c["weight"] == "wrong_dtype" else dt)
        w = _values((cols + (1 if c["weight"] == "wrong_shape" else 0),), wdt, "none", g)
        b = _values((cols,), dt, "none", g)
    eps = c["eps"]
    kind = c["kind"]
    valid = (dt in NORM_TOL and x.numel() > 0 and c["weight"] in ("ok", "none")
             and (kind.endswith("_bwd") or (math.isfinite(eps) and eps > 0)))
    if c["variant"] == "avx512" and "avx512f" not in layerpress.build_info()["cpu_features"]:
        return
    os.environ["LAYERPRESS_CPU_NORM_KERNEL"] = c["variant"]
    try:
        if kind == "rms":
            op, fn = "rms_norm", lambda: _ops.rms_norm(x, w, eps)
        elif kind == "add_rms":
            op, fn = "add_rms_norm", lambda: _ops.add_rms_norm(x, r, w, eps)
        elif kind == "layer":
            op, fn = "layer_norm", lambda: _ops.layer_norm(x, w, b, eps)
        elif kind == "add_layer":
            op, fn = "add_layer_norm", lambda: _ops.add_layer_norm(x, r, w, b, eps)
        elif kind == "rms_bwd":
            op = "rms_norm_backward"
            rstd = torch.ones(shape[:-1], dtype=torch.float64 if dt == torch.float64 else torch.float32)
            gy = _values(shape, dt, "none", g)
            fn = lambda: _ops.rms_norm_backward(gy, x, w, rstd, None, w is not None)  # noqa: E731
        else:
            op = "layer_norm_backward"
            st_dt = torch.float64 if dt == torch.float64 else torch.float32
            mean, rstd = torch.zeros(shape[:-1], dtype=st_dt), torch.ones(shape[:-1], dtype=st_dt)
            gy = _values(shape, dt, "none", g)
            fn = lambda: _ops.layer_norm_backward(gy, x, w, mean, rstd, None, w is not None, w is not None)  # noqa: E731
        out, err = _call(op, fn, valid)
        again = fn() if out is not None else None  # the same variant twice: the same bits
    finally:
        os.environ.pop("LAYERPRESS_CPU_NORM_KERNEL", None)
    if out is None:
        return
    if not valid:
        raise FuzzFailure(f"{op} accepted invalid arguments ({c})")
    if not all(torch.equal(a, b_) or (a.shape == b_.shape and torch.equal(a.isnan(), b_.isnan())
                                      and torch.equal(a.nan_to_num(), b_.nan_to_num()))
               for a, b_ in zip(out, again)):
        raise FuzzFailure(f"{op}: two calls differ")
    if kind.endswith("_bwd"):
        return
    if not valid:
        raise FuzzFailure(f"{op} accepted invalid arguments ({c})")
    y = out[0]
    ref, h = ref_norm(kind, x, r, w, b, eps)
    if y.shape != x.shape or y.dtype != dt:
        raise FuzzFailure(f"{op}: output {y.dtype} {list(y.shape)}")
    rows_ok = torch.isfinite(x.double()).all(-1, keepdim=True)
    if kind.startswith("add_"):
        rows_ok = rows_ok & torch.isfinite(h).all(-1, keepdim=True)
    # fp32 accumulation: a row whose sum of squares overflows fp32 (|x| >~ 1e19) is out of the
    # kernels' range (as it is for torch's fp32 norms); only its finiteness is not checked
    v64 = h if h is not None else x.double()
    in_range = (v64.pow(2).sum(-1, keepdim=True) < torch.finfo(torch.float32).max / 4) | (dt == torch.float64)
    fine = (rows_ok & in_range).expand_as(ref) & torch.isfinite(ref)
    tol = NORM_TOL[dt] * (1 + ref.abs())
    err = (y.double() - ref).abs()
    if (fine & ~(err <= tol)).any():
        i = (fine & ~(err <= tol)).nonzero()[0].tolist()
        raise FuzzFailure(f"{op}: out of tolerance at {i}: got {y.double()[tuple(i)].item()!r}, ref {ref[tuple(i)].item()!r}")
    if (~rows_ok.expand_as(ref) & torch.isfinite(y.double())).all(-1).any() and c["special"] in ("nan",):
        raise FuzzFailure(f"{op}: a row with NaN input has an all-finite output")


# ---- WTA-CRS -----------------------------------------------------------------------------------------

@st.composite
def wtacrs_case(draw):
    return {
        "op": draw(st.sampled_from(["row_norms", "select", "gather_scale", "wgrad", "sample"])),
        "m": draw(st.sampled_from([0, 1, 2, 5, 17, 64, 200])),
        "d": draw(st.sampled_from([0, 1, 3, 16, 33])),
        "n": draw(st.sampled_from([1, 4, 9])),
        "k": draw(st.sampled_from([-5, -1, 0, 1, 2, 10, 63, 64, 10 ** 6, 2 ** 40])),
        "seed_val": draw(st.sampled_from([0, 1, -1, 2 ** 62, -(2 ** 63), 12345])),
        "dtype": draw(st.sampled_from(FLOATS + ("float64", "int32"))),
        "norms": draw(st.sampled_from(["ok", "ok", "zeros", "nan", "negative", "inf", "wrong_dtype", "2d"])),
        "idx": draw(st.sampled_from(["ok", "ok", "negative", "too_large", "wrong_dtype", "2d", "duplicate"])),
        "layout": draw(st.sampled_from(LAYOUTS)),
        "scales": draw(st.sampled_from(["none", "ok", "ok", "wrong_shape", "nan"])),
        "seed": draw(st.integers(0, 2 ** 16)),
    }


def run_wtacrs(c):
    g = _gen(c["seed"])
    dt = DTYPES[c["dtype"]]
    m, d = c["m"], c["d"]
    x = _layout(_values((m, d), dt, "none", g), c["layout"])
    floating = dt in (torch.float32, torch.bfloat16, torch.float16)
    op = c["op"]
    if op == "row_norms":
        out, _ = _call("wtacrs_row_norms", lambda: _ops.wtacrs_row_norms(x), floating and d > 0 and m > 0)
        if out is not None:
            if not floating:
                raise FuzzFailure(f"wtacrs_row_norms accepted {dt}")
            ref = x.double().norm(dim=-1)
            if out.shape != (m,) or not torch.allclose(out.double(), ref, rtol=1e-5, atol=1e-6):
                raise FuzzFailure("wtacrs_row_norms differs from the reference")
        return
    norms = torch.rand(m, generator=g) + 0.1
    kind = c["norms"] if m > 0 or c["norms"] in ("wrong_dtype", "2d") else "ok"
    if kind == "zeros":
        norms = torch.zeros(m)
    elif kind == "nan" and m:
        norms[0] = float("nan")
    elif kind == "negative" and m:
        norms[-1] = -1.0
    elif kind == "inf" and m:
        norms[0] = float("inf")
    elif kind == "wrong_dtype":
        norms = norms.double()
    elif kind == "2d":
        norms = norms.reshape(1, m)
    k, seed = c["k"], c["seed_val"]
    if op in ("select", "sample"):
        sel_valid = kind in ("ok", "zeros") and 0 < k and m > 0
        out, _ = _call("wtacrs_select", lambda: _ops.wtacrs_select(norms, k, seed), False)
        if out is None:
            return
        if kind in ("nan", "negative", "inf", "2d") or k < 1:
            raise FuzzFailure(f"wtacrs_select accepted norms={kind} k={k}")
        idx, sc = out
        want = min(k, m) if k > 0 else 0
        if idx.shape != (want,) or sc.shape != (want,) or idx.dtype != torch.int64:
            raise FuzzFailure(f"wtacrs_select: idx {list(idx.shape)} for k={k}, M={m}")
        # the sampled part draws with replacement: indices may repeat; a zero-mass row gets scale 0
        if want and (idx.min() < 0 or idx.max() >= m):
            raise FuzzFailure("wtacrs_select: indices out of range")
        if want and not (torch.isfinite(sc).all() and (sc >= 0).all()):
            raise FuzzFailure("wtacrs_select: scales not finite and >= 0")
        again = _ops.wtacrs_select(norms, k, seed)
        if not (torch.equal(again[0], idx) and torch.equal(again[1], sc)):
            raise FuzzFailure("wtacrs_select is not deterministic for a seed")
        del sel_valid
        return
    kk = max(1, min(m, 8)) if m else 0
    idx = torch.randperm(max(m, 1), generator=g)[:kk] if m else torch.zeros(0, dtype=torch.int64)
    ik = c["idx"] if kk or c["idx"] in ("wrong_dtype", "2d") else "ok"  # no index to corrupt
    if ik == "negative" and kk:
        idx[0] = -1
    elif ik == "too_large" and kk:
        idx[0] = m
    elif ik == "wrong_dtype":
        idx = idx.to(torch.float32)
    elif ik == "2d":
        idx = idx.reshape(1, -1)
    elif ik == "duplicate" and kk > 1:
        idx[1] = idx[0]
    scales = None
    if c["scales"] != "none":
        scales = torch.rand(idx.shape[-1] + (1 if c["scales"] == "wrong_shape" else 0), generator=g) + 0.5
        if c["scales"] == "nan" and scales.numel():
            scales[0] = float("nan")
    good_idx = ik in ("ok", "duplicate")
    good_scales = c["scales"] in ("none", "ok", "nan")
    if op == "gather_scale":
        out, _ = _call("wtacrs_gather_scale", lambda: _ops.wtacrs_gather_scale(x, idx, scales), False)
        if out is None:
            return
        if not (good_idx and good_scales and floating):
            raise FuzzFailure(f"wtacrs_gather_scale accepted idx={ik} scales={c['scales']} {dt}")
        ref = x.double()[idx] * (scales.double()[:, None] if scales is not None else 1)
        if out.shape != ref.shape or not torch.allclose(out.double(), ref.to(dt).double(), rtol=1e-2, atol=1e-3, equal_nan=True):
            raise FuzzFailure("wtacrs_gather_scale differs from the reference")
        return
    # wgrad: grad [M, N], rows [k, D]
    n = c["n"]
    grad = _values((m, n), dt, "none", g)
    rows = _values((idx.shape[-1] if idx.dim() else 0, d), dt, "none", g)
    out, _ = _call("wtacrs_wgrad", lambda: _ops.wtacrs_wgrad(grad, rows, idx, scales), False)
    if out is None:
        return
    if not (good_idx and good_scales and floating):
        raise FuzzFailure(f"wtacrs_wgrad accepted idx={ik} scales={c['scales']} {dt}")
    gsel = grad.double()[idx] * (scales.double()[:, None] if scales is not None else 1)
    ref = gsel.t() @ rows.double()
    tol = 1e-2 if dt in (torch.bfloat16, torch.float16) else 1e-5
    if out.shape != ref.shape or not torch.allclose(out.double(), ref, rtol=tol, atol=tol * max(1, d), equal_nan=True):
        raise FuzzFailure("wtacrs_wgrad differs from the reference")


TARGETS = {
    "ops.quantize_pack_repack": (quant_case, run_quant),
    "ops.gemm": (gemm_case, run_gemm),
    "ops.norms": (norm_case, run_norm),
    "ops.wtacrs": (wtacrs_case, run_wtacrs),
}
