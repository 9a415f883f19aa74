"""The op faces: the Python side of ``torch.ops.layerpress.*``, one module per op family.

Each module registers its ops' fakes (meta kernels for ``torch.compile``) and autograd once, when
it is first imported, and holds the typed wrappers:

- :mod:`layerpress.ops.quant`: quantize, pack, unpack, dequantize, repack, unrepack and the GEMM
  (``gemm``, ``gemm_t``); the names below are re-exported from it (``layerpress.ops.gemm``, ...).
- :mod:`layerpress.ops.norm`: the fused norms (also importable as ``layerpress.norm_ops``).
- :mod:`layerpress.ops.wtacrs`: the WTA-CRS sampling ops (also ``layerpress.wtacrs_ops``).
- :mod:`layerpress.ops.rotation`: the randomised Walsh–Hadamard transform (``hadamard``).
"""
from .quant import (TILE_ROWS, _BELOW_AUTOGRAD, call_below_autograd_if_no_grad, dequantize, gemm,
                    gemm_t, pack, quantize, register_no_gradient, repack, unpack, unrepack)
from ..spec import Layout, QuantSpec  # noqa: F401  (layerpress.ops.Layout/QuantSpec, as before)
from . import norm, wtacrs  # noqa: F401  (register the norm and WTA-CRS ops' fakes and autograd)
from . import rotation  # noqa: F401  (registers the hadamard op's fake and autograd)

__all__ = ["TILE_ROWS", "call_below_autograd_if_no_grad", "register_no_gradient", "quantize",
           "pack", "unpack", "dequantize", "repack", "unrepack", "gemm", "gemm_t"]
