"""docs/api.md stays true to the code: every registered op and CLI command has a section with the
registry's schema verbatim (scripts/gen_api_doc.py --check), every Python signature it shows
matches ``inspect.signature`` (names and defaults), and the relative links of the docs resolve."""
from __future__ import annotations

import enum
import importlib.util
import inspect
import re
from pathlib import Path

import pytest
import torch

from layerpress import QuantLinear, QuantSpec, interop, norm_ops, norms, ops, wtacrs, wtacrs_ops
from layerpress.flows import allocate, evaluate, importance, io, quantizers, quantize_model
from lp_testutils import TypedOps

ROOT = Path(__file__).resolve().parents[1]
API = ROOT / "docs" / "api.md"


def _gen_api_doc():
    spec = importlib.util.spec_from_file_location("gen_api_doc", ROOT / "scripts" / "gen_api_doc.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_op_and_command_is_documented_with_its_schema():
    gen = _gen_api_doc()
    assert len(gen.registered_ops()) >= 19  # the registry really was read
    assert gen.check(API) == []


def test_check_reports_a_missing_op_and_a_stale_schema(tmp_path):
    gen = _gen_api_doc()
    text = API.read_text(encoding="utf-8")
    dropped = text.replace("#### `layerpress::pack`", "#### pack")
    stale = text.replace(gen.schema("gemm_t"), gen.schema("gemm_t").replace("int out_features", "int n"))
    (tmp_path / "a.md").write_text(dropped, encoding="utf-8")
    (tmp_path / "b.md").write_text(stale, encoding="utf-8")
    assert [p for p in gen.check(tmp_path / "a.md") if p.startswith("op pack:")]
    assert [p for p in gen.check(tmp_path / "b.md") if p.startswith("op gemm_t: schema")]


def test_check_reports_a_stale_module_map_row(tmp_path):
    gen = _gen_api_doc()
    row = next(r for r in gen.module_map() if r.startswith("| `layerpress.nn.quant_linear` |"))
    assert "`QuantLinear`" in row
    (tmp_path / "c.md").write_text(API.read_text(encoding="utf-8").replace(row, row.replace(
        "`QuantLinear`, ", "")), encoding="utf-8")
    assert gen.check(tmp_path / "c.md") == [f"module map: row not found verbatim: {row}"]


def _fmt_default(v) -> str:
    """A default as docs/api.md writes it: "str", Layout.NAME, 1e-6, QuantSpec(), torch.float16."""
    if isinstance(v, str):
        return f'"{v}"'
    if isinstance(v, enum.Enum):
        return f"{type(v).__name__}.{v.name}"
    if isinstance(v, float) and 0 < abs(v) < 1e-3:
        return f"{v:.0e}".replace("e-0", "e-")
    if isinstance(v, QuantSpec) and v == QuantSpec():
        return "QuantSpec()"
    return repr(v)


def _render(name: str, fn) -> str:
    parts, star = [], False
    for p in inspect.signature(fn).parameters.values():
        if p.name in ("self", "cls"):
            continue
        if p.kind is p.VAR_KEYWORD:
            parts.append("**" + p.name)
            continue
        if p.kind is p.KEYWORD_ONLY and not star:
            parts.append("*")
            star = True
        parts.append(p.name if p.default is p.empty else f"{p.name}={_fmt_default(p.default)}")
    return f"{name}({', '.join(parts)})"


SIGNATURES = {
    "QuantSpec": QuantSpec,
    "quantize": ops.quantize, "dequantize": ops.dequantize, "repack": ops.repack,
    "unrepack": ops.unrepack, "gemm": ops.gemm, "gemm_t": ops.gemm_t,
    "rms_norm": norm_ops.rms_norm, "add_rms_norm": norm_ops.add_rms_norm,
    "layer_norm": norm_ops.layer_norm, "add_layer_norm": norm_ops.add_layer_norm,
    "QuantLinear": QuantLinear, "QuantLinear.from_linear": QuantLinear.from_linear,
    "QuantLinear.from_quantized": QuantLinear.from_quantized,
    "FusedRMSNorm": norms.FusedRMSNorm, "FusedLayerNorm": norms.FusedLayerNorm,
    "WTACRSLinear": wtacrs.WTACRSLinear, "WTACRSLinear.from_linear": wtacrs.WTACRSLinear.from_linear,
    "WTACRSConv1D": wtacrs.WTACRSConv1D, "wtacrs_linear": wtacrs.wtacrs_linear,
    "LoRALinear": wtacrs.LoRALinear, "apply_wtacrs": wtacrs.apply_wtacrs, "apply_lora": wtacrs.apply_lora,
    "budget": wtacrs_ops.budget,
    "quantize_model": quantize_model, "save_quantized": io.save_quantized,
    "load_quantized": io.load_quantized, "sentence_embeddings": evaluate.sentence_embeddings,
    "perplexity": evaluate.perplexity, "quality_of": evaluate.quality_of,
    "importance_vs_random_orders": evaluate.importance_vs_random_orders,
    "lim_scores": importance.lim_scores, "hessian_traces": importance.hessian_traces,
    "allocate_bits": allocate.allocate_bits, "allocate_knapsack": allocate.allocate_knapsack,
    "rtn": quantizers.rtn, "gptq": quantizers.gptq,
    "load_checkpoint": interop.load_checkpoint, "load_awq": interop.load_awq,
    "load_gptq": interop.load_gptq, "export_awq": interop.export_awq, "export_gptq": interop.export_gptq,
    "awq_to_quantlinear": interop.awq_to_quantlinear, "gptq_to_quantlinear": interop.gptq_to_quantlinear,
    "quantlinear_to_gptq": interop.quantlinear_to_gptq,
}


@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_documented_signature_matches_the_code(name):
    doc = re.sub(r"\s+", " ", API.read_text(encoding="utf-8"))
    assert _render(name, SIGNATURES[name]) in doc


def test_render_sees_a_changed_default():
    def quantize_model(model, bits=3):  # noqa: ARG001  (a stand-in with another default)
        pass
    doc = re.sub(r"\s+", " ", API.read_text(encoding="utf-8"))
    assert _render("quantize_model", quantize_model) not in doc


@pytest.mark.parametrize("page", ["README.md", "docs/api.md", "docs/tutorial.md"])
def test_relative_links_resolve(page):
    path = ROOT / page
    text = path.read_text(encoding="utf-8")
    targets = [t.split("#")[0] for t in re.findall(r"\]\(([^)\s]+)\)", text)
               if not re.match(r"[a-z]+:", t) and not t.startswith("#")]
    missing = [t for t in targets if t and not (path.parent / t).exists()]
    assert missing == []
    if page == "README.md":
        assert "docs/api.md" in targets and "docs/tutorial.md" in targets


L = TypedOps()  # the Python API's error types; raw ops carry a "[TypeError] " tag instead
_Q4 = torch.zeros(4, 4, dtype=torch.int32)  # canonical int32 [N=4, K=32] at 4 bits
_S4 = torch.ones(4, 1, dtype=torch.half)

# (call, exception, message exactly as docs/api.md quotes it)
QUOTED_ERRORS = [
    (lambda: L.pack(torch.zeros(4, 32), 4), TypeError, "codes must be uint8, got Float"),
    (lambda: L.pack(torch.zeros(4, 33, dtype=torch.uint8), 4), ValueError,
     "codes: K must be a positive multiple of 32, got K=33"),
    (lambda: L.pack(torch.full((4, 32), 17, dtype=torch.uint8), 4), ValueError,
     "codes must be < 2^bits = 16 for bits=4, got a code 17"),
    (lambda: L.unpack(_Q4, 5), ValueError, "bits must be one of 2, 3, 4, 8, got 5"),
    (lambda: L.dequantize(_Q4, _S4, None, 4, -1, 0, torch.int32), TypeError,
     "out_dtype must be float32, bfloat16, float16 or float64, got Int"),
    (lambda: L.repack(_Q4, _S4, None, 4, -1, 0, 3), ValueError,
     "layout 3 is not a CPU kernel layout; CPU kernels use layout 1 (cpu_bitplane16)"),
    (lambda: L.quantize(torch.randn(4, 32, 1), 4, -1, 0, False, torch.half), ValueError,
     "weight must be 2-D [out_features, in_features], got 3-D"),
    (lambda: L.quantize(torch.randn(4, 32), 4, 48, 0, False, torch.half), ValueError,
     "group_size must be one of 32, 64, 128, 256 or -1 (whole row/column), got 48"),
    (lambda: L.rms_norm(torch.randn(2, 8), None, 0.0), ValueError,
     "eps must be a positive finite number, got 0"),
    (lambda: L.wtacrs_select(torch.ones(5), 0, 1), ValueError, "k must be >= 1, got 0"),
    (lambda: L.wtacrs_select(torch.ones(5, dtype=torch.half), 2, 1), TypeError,
     "norms must be float32 or float64, got Half"),
    (lambda: QuantSpec(bits=5), ValueError, "QuantSpec.bits must be one of (2, 3, 4, 8), got 5"),
    (lambda: wtacrs_ops.check_ratio(0), ValueError, "ratio must be a number in (0, 1], got 0"),
]


@pytest.mark.parametrize("case", range(len(QUOTED_ERRORS)))
def test_quoted_error_messages_are_real(case):
    call, exc, message = QUOTED_ERRORS[case]
    assert message in re.sub(r"\s+", " ", API.read_text(encoding="utf-8"))
    with pytest.raises(exc, match=re.escape(message)):
        call()
