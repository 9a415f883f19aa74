"""The modules: ``torch.nn`` layers that run on the op faces (:mod:`layerpress.ops`).

- :mod:`layerpress.nn.quant_linear`: :class:`QuantLinear` and :func:`quantize_linear`.
- :mod:`layerpress.nn.fused`: :class:`FusedQuantLinear` (q/k/v, gate/up as one product) and its
  :class:`FusedSlice` parts; ``fuse_layers``, ``unfuse``.
- :mod:`layerpress.nn.norm`: the fused norms (also importable as ``layerpress.norms``).
- :mod:`layerpress.nn.wtacrs`: WTA-CRS linears, LoRA and ``apply_wtacrs``/``apply_lora`` (also
  ``layerpress.wtacrs``); they build on ``QuantLinear``, never the other way round.
- :mod:`layerpress.nn.linears`: which modules count as a linear (``nn.Linear``, HF ``Conv1D``).
"""
from .quant_linear import SIDE_DTYPES, QuantLinear, layout_for, quantize_linear
from .fused import FusedQuantLinear, FusedSlice, fuse_layers, unfuse
from .norm import FusedLayerNorm, FusedRMSNorm
from .wtacrs import LoRALinear, WTACRSConv1D, WTACRSLinear

__all__ = ["QuantLinear", "quantize_linear", "layout_for", "SIDE_DTYPES", "FusedQuantLinear", "FusedSlice",
           "fuse_layers", "unfuse", "FusedLayerNorm",
           "FusedRMSNorm", "WTACRSLinear", "WTACRSConv1D", "LoRALinear"]
