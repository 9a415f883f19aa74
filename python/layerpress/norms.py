"""``layerpress.norms``, the documented path of the fused-norm modules: the same module object as
:mod:`layerpress.nn.norm` (an alias, so that both names see one module and its state)."""
import sys

from .nn import norm as _module

sys.modules[__name__] = _module
