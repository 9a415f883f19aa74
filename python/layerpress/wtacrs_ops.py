"""``layerpress.wtacrs_ops``, the documented path of the WTA-CRS op face: the same module object as
:mod:`layerpress.ops.wtacrs` (an alias, so that both names see one module and its state)."""
import sys

from .ops import wtacrs as _module

sys.modules[__name__] = _module
