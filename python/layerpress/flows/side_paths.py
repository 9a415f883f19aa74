"""Side paths of a quantised linear beyond the papers: outlier retention and LoRC.

**Outliers.** A fraction of the weights of a layer is kept in 16 bits as a sparse matrix ``S``
(``QuantLinear``'s ``outlier_idx`` / ``outlier_val``). Which ones (``criterion``):

* ``"magnitude"`` (default) -- the largest ``|w|``. With min-max groups the few extreme weights
  of a group set its range, so removing them shrinks every other weight's step; on MiniLM this
  beat the Hessian criterion below at W3/W4 (see docs/flows.md).
* ``"saliency"`` -- the largest OBS saliency ``w² / [H⁻¹]_kk`` (damped ``H``): weights whose
  input channel matters most to the output.

The kept weights are removed from quantisation: before the quantiser runs, each one is replaced
by its value clamped to the range of the *other* members of its group (so it widens no range and
its code stays as close as the group allows); the quantiser (RTN or GPTQ) then works on that
weight. Finally the kept values are fitted: with a Hessian ``H`` of the layer inputs, the values
of row ``n`` at its kept positions ``O`` minimise the row's output error given the quantised rest,
``s_O = H_OO⁻¹ (H e)_O`` with ``e = w − ŵ`` (``H`` damped as in GPTQ) -- this also repairs what GPTQ
compensated for the placeholder values; without ``H``, ``s_O = e_O`` (the weight is exact).

**LoRC** (Yao et al., ZeroQuant-V2): a rank-``r`` correction ``B·A`` of the remaining error
``E = W − ŵ − S`` by truncated SVD. Activation-weighted (default when ``H`` is given): the rank-``r``
``B·A`` minimising ``‖(E − BA)·L‖_F`` with ``H + λI = L·Lᵀ``, i.e. the output error on the
calibration inputs: SVD of ``E·L = UΣVᵀ``, ``B = U_r Σ_r^½``, ``A = Σ_r^½ V_rᵀ L⁻¹``. Unweighted:
SVD of ``E`` itself (the Frobenius-optimal ``Ŵ``). Factors are stored in ``side_dtype``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..nn import SIDE_DTYPES
from ..spec import QuantSpec
from .quantizers import QuantResult

__all__ = ["SidePaths", "check_side_args", "outlier_count", "select_outliers",
           "mask_outliers", "fit_outlier_values", "lorc_factors", "quantise_with_side_paths",
           "OUTLIER_CRITERIA"]

OUTLIER_CRITERIA = ("magnitude", "saliency")
DAMP = 0.01  # λ = DAMP · mean diag H, as GPTQ


@dataclass
class SidePaths:
    """Side-path tensors of one linear, in the layout ``QuantLinear.set_side_paths`` takes."""
    outlier_idx: Optional[torch.Tensor] = None  # int32 [nnz], flat n·K + k, increasing
    outlier_val: Optional[torch.Tensor] = None  # side dtype [nnz]
    lorc_a: Optional[torch.Tensor] = None       # [r, K]
    lorc_b: Optional[torch.Tensor] = None       # [N, r]

    def kwargs(self) -> dict:
        return {"outlier_idx": self.outlier_idx, "outlier_val": self.outlier_val,
                "lorc_a": self.lorc_a, "lorc_b": self.lorc_b}

    def dense(self, n: int, k: int, device=None) -> torch.Tensor:
        """``S + B·A`` as a dense fp32 ``[N, K]``."""
        d = torch.zeros(n * k, dtype=torch.float32, device=device)
        if self.outlier_idx is not None:
            d.index_add_(0, self.outlier_idx.long().to(d.device), self.outlier_val.float().to(d.device))
        d = d.view(n, k)
        if self.lorc_a is not None:
            d += self.lorc_b.float().to(d.device) @ self.lorc_a.float().to(d.device)
        return d

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.kwargs().values() if t is not None)


def check_side_args(outliers: float = 0.0, lorc_rank: int = 0, side_dtype=torch.float16,
                    criterion: str = "magnitude") -> None:
    """Validates the side-path arguments of the flows (ValueError naming the argument)."""
    if isinstance(outliers, bool) or not isinstance(outliers, (int, float)) or not 0.0 <= outliers < 1.0:
        raise ValueError(f"outliers must be a fraction of the weights in [0, 1), got {outliers!r}")
    if isinstance(lorc_rank, bool) or not isinstance(lorc_rank, int) or lorc_rank < 0:
        raise ValueError(f"lorc_rank must be an integer >= 0 (0 = no LoRC), got {lorc_rank!r}")
    if side_dtype not in SIDE_DTYPES:
        raise ValueError(f"side_dtype must be one of {[str(d) for d in SIDE_DTYPES]}, got {side_dtype!r}")
    if criterion not in OUTLIER_CRITERIA:
        raise ValueError(f"outlier criterion must be one of {OUTLIER_CRITERIA}, got {criterion!r}")


def outlier_count(fraction: float, n: int, k: int) -> int:
    """Number of weights kept for a fraction of an ``[N, K]`` weight (rounded to nearest)."""
    return int(round(fraction * n * k))


def _damped(H: torch.Tensor) -> torch.Tensor:
    H = H.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    H += DAMP * torch.mean(torch.diag(H)) * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    return H


def select_outliers(w: torch.Tensor, count: int, H: Optional[torch.Tensor] = None,
                    criterion: str = "magnitude") -> torch.Tensor:
    """Flat indices (int64, increasing) of the ``count`` weights of ``w [N, K]`` to keep."""
    n, k = w.shape
    if count <= 0:
        return torch.zeros(0, dtype=torch.long, device=w.device)
    if criterion == "magnitude":
        score = w.detach().float().abs()
    elif criterion == "saliency":
        if H is None:
            raise ValueError("outlier criterion 'saliency' needs the layer's Hessian")
        hinv_diag = torch.diag(torch.cholesky_inverse(torch.linalg.cholesky(_damped(H)))).float()
        score = w.detach().float().pow(2) / hinv_diag.to(w.device)[None, :]
    else:
        raise ValueError(f"outlier criterion must be one of {OUTLIER_CRITERIA}, got {criterion!r}")
    idx = torch.topk(score.reshape(-1), count, sorted=False).indices
    return torch.sort(idx).values


def _group_view(t: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``[G, g]`` view of the quantisation groups of an ``[N, K]`` tensor (a copy for per-IC)."""
    n, k = t.shape
    g = spec.group_for(n, k)
    if spec.axis == "oc":
        return t.reshape(n * k // g, g)
    return t.t().contiguous().reshape(k * n // g, g)


def _ungroup(v: torch.Tensor, spec: QuantSpec, n: int, k: int) -> torch.Tensor:
    if spec.axis == "oc":
        return v.reshape(n, k)
    return v.reshape(k, n).t().contiguous()


def mask_outliers(w: torch.Tensor, idx: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``w`` with each kept weight clamped to the range of the other members of its group, so no
    group's min/max (or absmax) is set by a kept weight; a group made only of kept weights
    gets zeros."""
    n, k = w.shape
    w = w.detach().float()
    if idx.numel() == 0:
        return w.clone()
    mask = torch.zeros(n * k, dtype=torch.bool, device=w.device)
    mask[idx.to(w.device)] = True
    mask = mask.view(n, k)
    gw, gm = _group_view(w, spec), _group_view(mask, spec)
    inf = torch.tensor(float("inf"), device=w.device)
    lo = torch.where(gm, inf, gw).amin(-1, keepdim=True)
    hi = torch.where(gm, -inf, gw).amax(-1, keepdim=True)
    if spec.symmetric:
        a = torch.maximum(lo.abs(), hi.abs())
        lo, hi = -a, a
    lo = torch.where(torch.isfinite(lo), lo, torch.zeros_like(lo))
    hi = torch.where(torch.isfinite(hi), hi, torch.zeros_like(hi))
    out = torch.where(gm, torch.minimum(torch.maximum(gw, lo), hi), gw)
    return _ungroup(out, spec, n, k)


def fit_outlier_values(w: torch.Tensor, w_hat: torch.Tensor, idx: torch.Tensor,
                       H: Optional[torch.Tensor] = None, max_elems: int = 1 << 24) -> torch.Tensor:
    """Values (fp32) of the kept weights that, added to ``w_hat`` at ``idx``, minimise each row's
    output error ``(w − ŵ − s) H (w − ŵ − s)ᵀ`` (damped ``H``); ``w − ŵ`` there without ``H``."""
    n, k = w.shape
    e = (w.detach().float() - w_hat.float())
    idx = idx.long().to(w.device)
    if H is None or idx.numel() == 0:
        return e.reshape(-1)[idx]
    Hd = _damped(H).to(w.device)
    he = (e.double() @ Hd)                                  # [N, K]: (H e)_k per row
    rows, cols = idx // k, idx % k
    counts = torch.bincount(rows, minlength=n)
    starts = torch.cumsum(counts, 0) - counts
    out = torch.empty(idx.numel(), dtype=torch.float64, device=w.device)
    # rows with the same number of kept weights are solved together as one batched system
    for m in torch.unique(counts).tolist():
        if m == 0:
            continue
        rs = torch.nonzero(counts == m).flatten()
        for chunk in rs.split(max(1, max_elems // (m * m))):
            pos = starts[chunk][:, None] + torch.arange(m, device=w.device)[None, :]  # [R, m]
            c = cols[pos]                                                         # [R, m]
            Hoo = Hd[c[:, :, None], c[:, None, :]]                                # [R, m, m]
            rhs = he[chunk[:, None], c]                                           # [R, m]
            out[pos.reshape(-1)] = torch.linalg.solve(Hoo, rhs).reshape(-1)
    return out.float()


def lorc_factors(E: torch.Tensor, rank: int, H: Optional[torch.Tensor] = None):
    """Rank-``rank`` factors ``(A [r, K], B [N, r])`` (fp32) with ``B·A ≈ E [N, K]``: truncated SVD
    of ``E``, or of ``E·L`` mapped back through ``L⁻¹`` (``H + λI = L·Lᵀ``) when ``H`` is given."""
    n, k = E.shape
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(n, k):
        raise ValueError(f"lorc_rank must be in [1, min(out_features, in_features) = {min(n, k)}] "
                         f"for a [{n}, {k}] weight, got {rank!r}")
    E = E.detach().double()
    if H is None:
        U, S, Vh = torch.linalg.svd(E, full_matrices=False)
        root = S[:rank].sqrt()
        return (root[:, None] * Vh[:rank]).float(), (U[:, :rank] * root[None, :]).float()
    L = torch.linalg.cholesky(_damped(H).to(E.device))
    U, S, Vh = torch.linalg.svd(E @ L, full_matrices=False)
    root = S[:rank].sqrt()
    # A = Σ^½ Vᵀ L⁻¹  <=>  A L = Σ^½ Vᵀ  <=>  Lᵀ Aᵀ = V Σ^½
    At = torch.linalg.solve_triangular(L.t(), (Vh[:rank].t() * root[None, :]), upper=True)
    return At.t().contiguous().float(), (U[:, :rank] * root[None, :]).float()


def _to_side_dtype(t: torch.Tensor, dtype: torch.dtype, what: str) -> torch.Tensor:
    out = t.to(dtype)
    if not bool(torch.isfinite(out).all()):
        raise ValueError(f"{what} overflows side_dtype {dtype}: use torch.bfloat16 or torch.float32")
    return out


def quantise_with_side_paths(w: torch.Tensor, spec: QuantSpec,
                             quantise: Callable[[torch.Tensor, QuantSpec], QuantResult],
                             H: Optional[torch.Tensor] = None, outliers: float = 0.0,
                             lorc_rank: int = 0, side_dtype: torch.dtype = torch.float16,
                             criterion: str = "magnitude", lorc_weighted: bool = True):
    """Quantises ``w [N, K]`` with ``quantise(w, spec)`` plus the requested side paths (see the
    module doc). Returns the quantiser's own result when there are none, else a copy of it
    whose ``weight`` is the effective fp32 weight ``ŵ + S + B·A`` and whose extra attribute
    ``side`` holds the :class:`SidePaths`.
    ``H``: the layer's input Hessian (any positive multiple of ``XᵀX``), used by the saliency
    criterion, the outlier fit and weighted LoRC."""
    check_side_args(outliers, lorc_rank, side_dtype, criterion)
    n, k = w.shape
    if lorc_rank > min(n, k):
        raise ValueError(f"lorc_rank must be in [0, min(out_features, in_features) = {min(n, k)}] "
                         f"for a [{n}, {k}] weight, got {lorc_rank}")
    count = outlier_count(outliers, n, k)
    if count == 0 and lorc_rank == 0:
        return quantise(w, spec)
    w = w.detach().float()
    idx = select_outliers(w, count, H, criterion)
    res = quantise(mask_outliers(w, idx, spec) if count else w, spec)
    eff = res.weight.float().clone()
    side = SidePaths()
    if count:
        val = _to_side_dtype(fit_outlier_values(w, res.weight, idx, H), side_dtype, "an outlier value")
        side.outlier_idx, side.outlier_val = idx.to(torch.int32), val
        eff.view(-1).index_add_(0, idx, val.float())
    if lorc_rank:
        A, B = lorc_factors(w - eff, lorc_rank, H if lorc_weighted else None)
        side.lorc_a = _to_side_dtype(A, side_dtype, "a LoRC factor")
        side.lorc_b = _to_side_dtype(B, side_dtype, "a LoRC factor")
        eff += side.lorc_b.float() @ side.lorc_a.float()
    out = dataclasses.replace(res, weight=eff)  # keeps any field a quantiser's result adds
    out.side = side
    return out
