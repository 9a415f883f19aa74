"""Import AWQ and GPTQ checkpoints into :class:`~layerpress.QuantLinear` models, and export
per-OC layerpress models to those formats so other engines can serve them. See docs/interop.md.

* :func:`load_checkpoint` -- any of AWQ, GPTQ, compressed-tensors or layerpress, by
  ``quantization_config.quant_method``;
* :func:`load_compressed_tensors`, :func:`export_compressed_tensors` -- compressed-tensors
  ``pack-quantized`` (vLLM); :func:`export_gguf` -- GGUF (llama.cpp);
* :func:`load_awq`, :func:`load_gptq`, :func:`export_awq`, :func:`export_gptq` -- whole models;
* :func:`awq_to_quantlinear`, :func:`gptq_to_quantlinear`, :func:`quantlinear_to_awq`,
  :func:`quantlinear_to_gptq` -- single layers, from/to their tensors.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from . import _common
from .awq import AWQ_ORDER, awq_to_quantlinear, export_awq, load_awq, quantlinear_to_awq
from .compressed_tensors import export_compressed_tensors, load_compressed_tensors
from .gguf import export_gguf
from .gptq import export_gptq, gptq_to_quantlinear, load_gptq, quantlinear_to_gptq

__all__ = ["load_checkpoint", "load_awq", "load_gptq", "export_awq", "export_gptq",
           "awq_to_quantlinear", "gptq_to_quantlinear", "quantlinear_to_awq", "quantlinear_to_gptq",
           "AWQ_ORDER", "load_compressed_tensors", "export_compressed_tensors", "export_gguf"]


def load_checkpoint(model_dir: Union[str, Path], model: Optional[nn.Module] = None,
                    dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Loads a quantised checkpoint directory according to its ``quantization_config.quant_method``:
    ``"awq"`` (:func:`load_awq`), ``"gptq"`` (:func:`load_gptq`), ``"compressed-tensors"``
    (:func:`load_compressed_tensors`) or ``"layerpress"``
    (:func:`layerpress.flows.io.load_quantized`; ``dtype`` does not apply)."""
    model_dir = Path(model_dir)
    cfg = _common.read_config(model_dir)
    method = str(_common.quant_config(model_dir, cfg).get("quant_method", "")).lower()
    if method == "awq":
        return load_awq(model_dir, model, dtype)
    if method == "gptq":
        return load_gptq(model_dir, model, dtype)
    if method == "compressed-tensors":
        return load_compressed_tensors(model_dir, model, dtype)
    if method == "layerpress":
        from ..flows.io import load_quantized

        return load_quantized(model_dir, model)
    raise ValueError(f"{model_dir / _common.CONFIG}: quant_method {method!r} is not supported "
                     "(expected 'awq', 'gptq', 'compressed-tensors' or 'layerpress')")
