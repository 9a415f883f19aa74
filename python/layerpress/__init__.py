"""layerpress: low-bit GEMM, per-input-channel quantisation and compression flows for PyTorch.

Importing the package loads the C++/CUDA extension, which registers ``torch.ops.layerpress.*``.
"""
import torch  # noqa: F401  (loads libtorch before the extension)

from . import _C  # noqa: F401  (registers the ops)
from . import ops
from .spec import QuantSpec, Layout
from .nn import QuantLinear, quantize_linear
from .norms import FusedLayerNorm, FusedRMSNorm  # noqa: F401  (also registers the norm ops' fakes/autograd)
from .wtacrs import WTACRSLinear, LoRALinear, apply_wtacrs, apply_lora  # noqa: F401  (also registers the WTA-CRS ops' fakes)

__version__ = _C.build_info()["version"]

# Hugging Face transformers learns the "layerpress" quantisation method when (and only if) it
# loads its quantiser registry; nothing is imported here (see layerpress/integrations).
from .integrations import install_hf_hook as _install_hf_hook  # noqa: E402

_install_hf_hook()


def build_info() -> dict:
    """Version, the torch it was built against, CUDA on/off and architectures, CPU features
    found at run time, and the kernel variant chosen per op."""
    info = dict(_C.build_info())
    info["torch_runtime_version"] = torch.__version__
    return info


__all__ = ["QuantSpec", "Layout", "QuantLinear", "quantize_linear", "ops", "build_info", "__version__"]
