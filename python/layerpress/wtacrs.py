"""``layerpress.wtacrs``, the documented path of the WTA-CRS and LoRA modules: the same module object as
:mod:`layerpress.nn.wtacrs` (an alias, so that both names see one module and its state)."""
import sys

from .nn import wtacrs as _module

sys.modules[__name__] = _module
