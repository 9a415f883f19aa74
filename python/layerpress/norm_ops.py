"""``layerpress.norm_ops``, the documented path of the fused-norm op face: the same module object as
:mod:`layerpress.ops.norm` (an alias, so that both names see one module and its state)."""
import sys

from .ops import norm as _module

sys.modules[__name__] = _module
