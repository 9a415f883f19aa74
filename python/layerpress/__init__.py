"""layerpress: low-bit GEMM, per-input-channel quantisation and compression flows for PyTorch.

Importing the package loads the op library (``layerpress/_C.abi3.so``, built on the LibTorch
stable ABI), which registers ``torch.ops.layerpress.*``, and, with a CUDA build of torch, the CUDA
kernels (``layerpress/liblayerpress_cuda.so``).
"""
import json as _json
import os as _os
import warnings as _warnings

import torch  # noqa: F401  (loads libtorch before the extension)

from . import _C  # noqa: F401  (registers the ops)
from ._errors import typed_errors as _typed_errors


def _load_cuda_library() -> str:
    """Loads the CUDA op library when there is one and torch is a CUDA build; returns why not
    else. Loading needs no GPU and initialises no CUDA context (torch.cuda.is_available() would
    initialise the driver at import, which breaks CUDA in forked children)."""
    path = _os.path.join(_os.path.dirname(_C.__file__), "liblayerpress_cuda.so")
    if not _os.path.exists(path):
        return "not built (no nvcc at build time)"
    if not torch.version.cuda:
        return "not loaded (a CPU build of torch)"
    try:
        torch.ops.load_library(path)
    except OSError as e:  # e.g. torch ships another CUDA runtime major version than the build
        _warnings.warn(f"layerpress: the CUDA kernels could not be loaded ({e}); CUDA tensors will "
                       "fail in layerpress ops. Rebuild layerpress against this torch's CUDA.")
        return f"failed to load: {e}"
    return "loaded"


_cuda_status = _load_cuda_library()

from . import ops  # noqa: E402  (registers every op's fakes and autograd, once)
from .spec import QuantSpec, Layout
from .nn import QuantLinear, quantize_linear
from .nn import FusedLayerNorm, FusedRMSNorm  # noqa: F401
from .nn.wtacrs import WTACRSLinear, LoRALinear, apply_wtacrs, apply_lora  # noqa: F401
from . import norm_ops, norms, wtacrs, wtacrs_ops  # noqa: F401,E402  (the documented older module paths)

__version__ = _json.loads(torch.ops.layerpress.build_info())["version"]

# Hugging Face transformers learns the "layerpress" quantisation method when (and only if) it
# loads its quantiser registry; nothing is imported here (see layerpress/integrations).
from .integrations import install_hf_hook as _install_hf_hook  # noqa: E402

_install_hf_hook()


def build_info() -> dict:
    """Version, the torch it was built against and the stable-ABI target, CUDA on/off (and its
    architectures and runtime), CPU features found at run time, and the kernel variant chosen
    per op."""
    info = _json.loads(torch.ops.layerpress.build_info())
    info["torch_runtime_version"] = torch.__version__
    info["cuda"] = _cuda_status == "loaded"
    info["cuda_library"] = _cuda_status
    info["cuda_archs"] = ""
    if info["cuda"]:
        info.update(_json.loads(torch.ops.layerpress.cuda_build_info()))
    return info


def set_cpu_gemm_variant(name: str) -> None:
    """Forces a CPU GEMM variant by name (``""`` restores the automatic choice); for tests and
    benchmarks, or ``"avx512"`` for the exact fp32 product where the automatic choice is
    ``"avx512_bf16"`` (which multiplies bf16-rounded operands from a few rows on; see
    docs/kernels.md). Raises ValueError for an unknown or unsupported variant."""
    _typed_errors(torch.ops.layerpress.set_cpu_gemm_variant)(name)


__all__ = ["QuantSpec", "Layout", "QuantLinear", "quantize_linear", "ops", "build_info",
           "set_cpu_gemm_variant", "__version__"]
