"""Python face of the WTA-CRS ops (``torch.ops.layerpress.wtacrs_*``, issue 6): fake (meta)
implementations for ``torch.compile``/``opcheck`` and thin typed wrappers.

Schemas live in cpp/ops/wtacrs_registration.cpp, kernels in cpp/ops/wtacrs_cpu_ops.cpp and
cuda/ops/wtacrs_cuda_ops.cpp. The estimator they implement: for ``Z = H Wᵀ`` the weight gradient
``∇W = Σ_i ∇Z_iᵀ H_i`` over the tokens ``i`` is replaced by ``Σ_{j<k} scale_j ∇Z_{idx_j}ᵀ H_{idx_j}``,
where the ``c`` winners (largest ``‖H_i‖``) keep scale 1 and the other ``k − c`` rows are drawn with
replacement from the rest, scale ``(1 − P_C)/((k − c) p_j)``: unbiased.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .._errors import typed_errors
from .quant import register_no_gradient

_ops = torch.ops.layerpress

__all__ = ["budget", "check_ratio", "draw_seed", "draw_seed_tensor", "row_norms", "select",
           "gather_scale", "wgrad", "sample", "sample_t"]


# ---- fakes ---------------------------------------------------------------------------------------

def _tokens(x):
    n = 1
    for s in x.shape[:-1]:
        n = n * s
    return n


@torch.library.register_fake("layerpress::wtacrs_row_norms")
def _(x):
    return x.new_empty((_tokens(x),), dtype=torch.float32)


@torch.library.register_fake("layerpress::wtacrs_select")
def _(norms, k, seed):
    m = torch.sym_min(k, norms.shape[0])
    return norms.new_empty((m,), dtype=torch.int64), norms.new_empty((m,), dtype=torch.float32)


@torch.library.register_fake("layerpress::wtacrs_gather_scale")
def _(x, idx, scales=None):
    return x.new_empty((idx.shape[0], x.shape[-1]))


@torch.library.register_fake("layerpress::wtacrs_wgrad")
def _(grad, rows, idx, scales=None):
    return grad.new_empty((grad.shape[-1], rows.shape[-1]))


# ---- wrappers ------------------------------------------------------------------------------------

def budget(tokens: int, ratio: float = 0.3, min_k: int = 10) -> int:
    """The sample budget ``k = min(max(ceil(ratio · tokens), min_k), tokens)``."""
    check_ratio(ratio)
    return int(min(max(math.ceil(ratio * tokens), min_k), tokens))


def check_ratio(ratio: float) -> None:
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not (0.0 < ratio <= 1.0):
        raise ValueError(f"ratio must be a number in (0, 1], got {ratio!r}")


def draw_seed(generator: Optional[torch.Generator] = None) -> int:
    """A 62-bit seed for :func:`select` from ``generator`` (default: torch's global CPU
    generator, so ``torch.manual_seed`` makes a run reproducible)."""
    return int(torch.randint(0, 2 ** 62, (), generator=generator).item())


@typed_errors
def row_norms(x: torch.Tensor) -> torch.Tensor:
    """``‖x[m, :]‖₂`` of every row (token) of ``x [..., D]``, float32 ``[tokens]``."""
    return _ops.wtacrs_row_norms(x)


@typed_errors
def select(norms: torch.Tensor, k: int, seed: int):
    """Winner-take-all column-row selection of ``k`` of the ``M`` rows with probabilities
    ``∝ norms``. Returns ``(idx int64 [min(k, M)], scales float32 [min(k, M)])``; ``k >= M`` gives
    every row with scale 1 (the exact product)."""
    return _ops.wtacrs_select(norms, k, seed)


@typed_errors
def gather_scale(x: torch.Tensor, idx: torch.Tensor, scales: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Compact rows ``scales[i] · x[idx[i], :]`` of ``x [..., D]`` as ``[k, D]`` (dtype of ``x``)."""
    return _ops.wtacrs_gather_scale(x, idx, scales)


@typed_errors
def wgrad(grad: torch.Tensor, rows: torch.Tensor, idx: torch.Tensor,
          scales: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sampled weight gradient ``Σ_i scales[i] · grad[idx[i], :]ᵀ rows[i, :]`` ``[N, D]``."""
    return _ops.wtacrs_wgrad(grad, rows, idx, scales)


def sample(x: torch.Tensor, k: int, seed: int):
    """Norms, selection and compact (unscaled) rows in one call: ``(rows, idx, scales)``."""
    idx, scales = select(row_norms(x), k, seed)
    return gather_scale(x, idx, None), idx, scales


# The modules' entry point: :func:`sample` with the seed in a 0-d int64 tensor, as one opaque op.
# Under torch.compile a Python int seed would be baked into the graph as a constant (one
# recompilation per step); a tensor is a graph input like any other.
@torch.library.custom_op("layerpress::wtacrs_sample", mutates_args=())
def sample_t(x: torch.Tensor, k: int, seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`sample` with ``seed`` a 0-d integer tensor (see :func:`draw_seed_tensor`)."""
    rows, idx, scales = sample(x, k, int(seed.item()))
    return rows, idx, scales


@sample_t.register_fake
def _(x, k, seed):
    m = torch.sym_min(k, _tokens(x))
    return (x.new_empty((m, x.shape[-1])), x.new_empty((m,), dtype=torch.int64),
            x.new_empty((m,), dtype=torch.float32))


def draw_seed_tensor(generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """:func:`draw_seed` as a 0-d int64 CPU tensor."""
    return torch.randint(0, 2 ** 62, (), generator=generator, dtype=torch.int64)


for _name in ("wtacrs_row_norms", "wtacrs_select", "wtacrs_gather_scale", "wtacrs_wgrad",
              "wtacrs_sample"):  # sampling and the sampled weight gradient: used inside backward
    register_no_gradient(f"layerpress::{_name}")
