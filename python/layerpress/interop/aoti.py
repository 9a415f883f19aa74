"""An AOTInductor package (``.pt2``) of a model with :class:`~layerpress.QuantLinear` layers, for
C++ deployment without Python (``cpp/examples/aoti_runner.cpp``; docs/interop.md).

``torch.export`` traces the layers' ``torch.ops.layerpress.gemm`` calls as they are (the op has a
fake kernel), and ``torch._inductor.aoti_compile_and_package`` compiles the rest; the package
calls our op through the dispatcher, so a C++ program must load ``layerpress/_C.abi3.so``
(which registers the ops) before it loads the package.

Tensors beside the package (the reference input and output) use a minimal raw format that a
C++ program reads without a parser: ``b"LPT1"``, int32 dtype code (0 = float32), int32 ndim,
ndim int64 sizes, then the data, all little-endian, row-major.
"""
from __future__ import annotations

import struct
from pathlib import Path
from typing import Sequence, Union

import torch
from torch import nn

__all__ = ["export_aoti", "write_raw_tensor", "read_raw_tensor"]

_MAGIC = b"LPT1"
_DTYPES = {torch.float32: 0}


def write_raw_tensor(t: torch.Tensor, path: Union[str, Path]) -> None:
    if t.dtype not in _DTYPES:
        raise ValueError(f"write_raw_tensor: only float32 tensors, got {t.dtype}")
    t = t.detach().contiguous().cpu()
    with open(path, "wb") as f:
        f.write(_MAGIC + struct.pack("<ii", _DTYPES[t.dtype], t.dim()))
        f.write(struct.pack(f"<{t.dim()}q", *t.shape))
        f.write(t.numpy().tobytes())


def read_raw_tensor(path: Union[str, Path]) -> torch.Tensor:
    data = Path(path).read_bytes()
    if data[:4] != _MAGIC or len(data) < 12:
        raise ValueError(f"{path}: not a raw tensor file (no LPT1 header)")
    code, ndim = struct.unpack_from("<ii", data, 4)
    if code != 0 or not 0 <= ndim <= 8:
        raise ValueError(f"{path}: unsupported dtype code {code} or ndim {ndim}")
    shape = struct.unpack_from(f"<{ndim}q", data, 12)
    body = data[12 + 8 * ndim:]
    n = 1
    for s in shape:
        n *= s
    if len(body) != 4 * n:
        raise ValueError(f"{path}: {len(body)} data bytes, expected {4 * n} for shape {list(shape)}")
    return torch.frombuffer(bytearray(body), dtype=torch.float32).reshape(shape)


def export_aoti(model: nn.Module, example_inputs: Sequence[torch.Tensor], path: Union[str, Path],
                dynamic_batch: bool = True, max_batch: int = 4096, save_reference: bool = True,
                overwrite: bool = False) -> dict:
    """Compiles ``model`` (eval mode, CPU) for ``example_inputs`` with ``torch.export`` and
    ``torch._inductor.aoti_compile_and_package`` into the package ``path`` (``.pt2``). With
    ``dynamic_batch`` the first dimension of every input may vary (1..``max_batch``; the
    example's must be >= 2, as torch.export specialises a size of 1). With ``save_reference``
    the example inputs and the eager outputs are written beside it as ``<stem>.input<i>.lpt`` /
    ``<stem>.output<i>.lpt`` (:func:`write_raw_tensor`), for the C++ runner's check. Returns
    ``{"package", "inputs", "outputs"}`` (paths)."""
    path = Path(path)
    if path.suffix != ".pt2":
        raise ValueError(f"export_aoti: the package path must end in .pt2, got {path}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists (pass overwrite=True to replace it)")
    inputs = tuple(example_inputs)
    if dynamic_batch:
        small = [i for i, x in enumerate(inputs) if x.dim() == 0 or x.shape[0] < 2]
        if small:
            raise ValueError(f"export_aoti: example inputs {small} need a first dimension >= 2 for a "
                             "dynamic batch (torch.export specialises size 1)")
        batch = torch.export.Dim("batch", min=1, max=max_batch)
        dynamic = tuple({0: batch} for _ in inputs)
    else:
        dynamic = None
    model = model.eval()
    with torch.no_grad():
        ep = torch.export.export(model, inputs, dynamic_shapes=dynamic)
        outputs = model(*inputs)
    outputs = list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")  # still ending in .pt2, as aoti_compile_and_package wants
    torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp))
    tmp.replace(path)
    result = {"package": str(path), "inputs": [], "outputs": []}
    if save_reference:
        for kind, ts in (("input", inputs), ("output", outputs)):
            for i, t in enumerate(ts):
                p = path.with_name(f"{path.stem}.{kind}{i}.lpt")
                write_raw_tensor(t.float(), p)
                result[f"{kind}s"].append(str(p))
    return result
