"""Every public name that docs/api.md documents imports from where it is documented: the Python
names (the dotted ``layerpress.…`` references of the page, and the names of each documented
module, listed below), the ``torch.ops.layerpress.*`` ops of its op sections, and every CLI
command with every flag its section names."""
from __future__ import annotations

import argparse
import importlib
import json
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
API = ROOT / "docs" / "api.md"

# Module -> the public names docs/api.md documents there (its tables and prose).
DOCUMENTED = {
    "layerpress": ["QuantSpec", "Layout", "QuantLinear", "quantize_linear", "ops", "build_info",
                   "set_cpu_gemm_variant", "__version__", "WTACRSLinear", "LoRALinear",
                   "apply_wtacrs", "apply_lora", "FusedLayerNorm", "FusedRMSNorm"],
    "layerpress.ops": ["quantize", "pack", "unpack", "dequantize", "repack", "unrepack", "gemm",
                       "gemm_t", "call_below_autograd_if_no_grad", "register_no_gradient",
                       "TILE_ROWS"],
    "layerpress.norm_ops": ["rms_norm", "add_rms_norm", "layer_norm", "add_layer_norm"],
    "layerpress.wtacrs_ops": ["row_norms", "select", "gather_scale", "wgrad", "sample", "sample_t",
                              "budget", "check_ratio", "draw_seed", "draw_seed_tensor"],
    "layerpress.nn": ["QuantLinear", "quantize_linear", "FusedRMSNorm", "FusedLayerNorm",
                      "WTACRSLinear", "WTACRSConv1D", "LoRALinear"],
    "layerpress.norms": ["FusedRMSNorm", "FusedLayerNorm", "is_rms_norm", "is_layer_norm",
                         "fused_norm_from"],
    "layerpress.wtacrs": ["WTACRSLinear", "WTACRSConv1D", "wtacrs_linear", "LoRALinear",
                          "apply_wtacrs", "apply_lora", "DEFAULT_TARGETS"],
    "layerpress.flows": ["quantize_model", "QuantReport", "save_quantized", "load_quantized",
                         "fuse_norms", "fold_norm_weights", "convert_pre_ln_to_rmsnorm", "rtn",
                         "gptq", "QuantResult", "adapter_for", "ModelAdapter", "lim_scores",
                         "zd_scores", "allocate_bits", "embedding_fidelity", "perplexity",
                         "sentence_embeddings", "quantize_checkpoint"],
    "layerpress.flows.norms": ["norm_plan"],
    "layerpress.flows.quantize_model": ["quantize_model", "QuantReport", "LayerReport"],
    "layerpress.flows.report": ["layer_table", "block_table", "plot_report", "PlotsUnavailable",
                                "effective_bits", "quantized_layers"],
    "layerpress.flows.io": ["save_quantized", "load_quantized", "quantization_config",
                            "layer_entry", "swap_in_quantlinears"],
    "layerpress.flows.evaluate": ["sentence_embeddings", "embedding_fidelity", "perplexity",
                                  "quality_of", "importance_vs_random_orders"],
    "layerpress.flows.importance": ["lim_scores", "zd_scores", "hessian_traces", "HessianTraces",
                                    "hessian_scores", "importance_order"],
    "layerpress.flows.allocate": ["allocate_bits", "Allocation", "allocate_knapsack",
                                  "KnapsackAllocation", "measure_layer_errors",
                                  "hawq_layer_errors", "bit_pair"],
    "layerpress.flows.calibration": ["default_texts", "load_texts", "tokenize_texts",
                                     "capture_block_inputs", "run_block"],
    "layerpress.flows.out_of_core": ["quantize_checkpoint", "meta_skeleton", "CheckpointTensors"],
    "layerpress.flows.distributed": ["world_size", "rank", "local_batches", "all_reduce_sum",
                                     "compute_by_owner", "check_ranks_agree", "RanksDisagree"],
    "layerpress.interop": ["load_checkpoint", "load_awq", "load_gptq", "export_awq", "export_gptq",
                           "awq_to_quantlinear", "gptq_to_quantlinear", "quantlinear_to_awq",
                           "quantlinear_to_gptq"],
    "layerpress.integrations": ["install_hf_hook"],
    "layerpress.integrations.hf": ["LayerpressConfig", "LayerpressHfQuantizer"],
}
NEEDS = {"layerpress.integrations.hf": "transformers"}


def _text() -> str:
    return API.read_text(encoding="utf-8")


def resolve(dotted: str):
    """The object a dotted path names: the longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


def documented_references() -> list:
    """Each ``layerpress.a.b`` reference on the page (calls cut at ``(``)."""
    return sorted(set(re.findall(r"(?<![\w/.])layerpress(?:\.[A-Za-z_]\w*)+", _text())))


def test_the_page_was_read():
    refs = documented_references()
    assert "layerpress.nn.QuantLinear" in refs and "layerpress.flows.io" in refs
    assert len(refs) >= 15


@pytest.mark.parametrize("dotted", documented_references())
def test_every_dotted_reference_resolves(dotted):
    if any(dotted == m or dotted.startswith(m + ".") for m in NEEDS):
        pytest.importorskip(NEEDS[next(m for m in NEEDS if dotted.startswith(m))])
    resolve(dotted)


@pytest.mark.parametrize("module", sorted(DOCUMENTED))
def test_every_documented_name_imports_from_its_module(module):
    if module in NEEDS:
        pytest.importorskip(NEEDS[module])
    mod = importlib.import_module(module)
    missing = [n for n in DOCUMENTED[module] if not hasattr(mod, n)]
    assert missing == []
    namespace: dict = {}
    exec(f"from {module} import {', '.join(DOCUMENTED[module])}", namespace)  # the import form


def test_old_module_paths_are_the_new_modules():
    """The documented older paths are aliases: one module object, so one state."""
    import layerpress
    from layerpress import norm_ops, norms, wtacrs, wtacrs_ops
    assert norm_ops is layerpress.ops.norm and wtacrs_ops is layerpress.ops.wtacrs
    assert norms is layerpress.nn.norm and wtacrs is layerpress.nn.wtacrs
    assert layerpress.nn.QuantLinear is layerpress.QuantLinear is wtacrs.QuantLinear


def test_every_documented_op_is_registered():
    ops = re.findall(r"^#### `layerpress::(\w+)`", _text(), flags=re.M)
    assert len(ops) >= 19
    for op in ops:
        if op == "cuda_build_info" and not layerpress_cuda_loaded():
            continue  # registered only where the CUDA library loads
        assert hasattr(torch.ops.layerpress, op), op


def layerpress_cuda_loaded() -> bool:
    import layerpress
    return layerpress.build_info()["cuda"]


def _cli_sections() -> dict:
    """{command: its section's text} for every ``### `layerpress <cmd>` `` section."""
    parts = re.split(r"^### `layerpress (\w+)`\s*$", _text(), flags=re.M)
    return {parts[i]: parts[i + 1].split("\n## ", 1)[0] for i in range(1, len(parts), 2)}


def _subparsers(parser: argparse.ArgumentParser) -> dict:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices
    return {}


def _flags(parser: argparse.ArgumentParser) -> set:
    return {s for a in parser._actions for s in a.option_strings}


def _bench_parser() -> argparse.ArgumentParser:
    spec = importlib.util.spec_from_file_location("api_bench_gemm", ROOT / "bench" / "bench_gemm.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.build_parser()


def test_every_documented_command_and_flag_exists():
    from layerpress.cli import build_parser
    sections = _cli_sections()
    assert {"demo", "info", "bench", "quantize", "eval", "inspect"} <= set(sections)
    commands = _subparsers(build_parser())
    for cmd, text in sections.items():
        assert cmd in commands, cmd
        parser = _bench_parser() if cmd == "bench" else commands[cmd]
        documented = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", text))
        if cmd == "quantize":  # the flags were read
            assert {"--checkpoint-dir", "--lorc-rank", "--plots"} <= documented
        assert documented - _flags(parser) == set(), cmd


def test_the_console_script_entry_point():
    """pyproject's ``[project.scripts]`` target is the CLI's main function."""
    target = re.search(r'^layerpress = "([\w.]+):(\w+)"', (ROOT / "pyproject.toml").read_text(),
                       flags=re.M)
    assert target, "no layerpress console script in pyproject.toml"
    main = getattr(importlib.import_module(target.group(1)), target.group(2))
    assert callable(main) and main(["info"]) == 0


def test_python_m_layerpress():
    out = subprocess.run([sys.executable, "-m", "layerpress", "info"], capture_output=True,
                         text=True, check=True).stdout
    assert json.loads(out)["version"]


def test_a_missing_name_is_reported():
    with pytest.raises(AttributeError):
        resolve("layerpress.nn.NoSuchModule")
    with pytest.raises(ModuleNotFoundError):
        resolve("layerpressx.nn")
