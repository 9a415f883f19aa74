"""Weight quantisers for the compression flows: round-to-nearest (RTN) and GPTQ, both producing
the canonical format of docs/format.md (codes, scales, zeros) that ``QuantLinear.from_quantized``
takes, for both group axes (per-OC and AdaDim's per-IC).

GPTQ (Frantar et al.): ``H = 2XXᵀ/n + λI`` with ``λ = 0.01·mean(diag H)``; the upper Cholesky
factor of ``H⁻¹``; columns quantised one by one, the error of each compensated on the columns not
yet quantised, in lazy blocks of 128 columns. Act-order (columns by decreasing ``diag H``) with
*static* groups for per-OC (each group's scale/zero from the original weight, so no ``g_idx``);
per-IC quantises each column as a vector in groups of ``g`` output channels with scales taken
from the (compensated) column itself, which fits GPTQ's column order with no ``g_idx`` either.
The final codes are produced by ``ops.quantize`` with the chosen scales, so they are exactly
the format's ``clamp(round(w/s) + z)`` of the GPTQ solution.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch

from .. import ops
from ..spec import QuantSpec

__all__ = ["QuantResult", "rtn", "gptq", "minmax_params", "HessianAccumulator"]


@dataclass
class QuantResult:
    """A quantised weight: canonical ``qweight`` (int32 packed), ``scales``, ``zeros`` (None if
    symmetric), the unpacked ``codes`` and the dequantised weight ``[N, K]`` (fp32)."""
    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: Optional[torch.Tensor]
    codes: torch.Tensor
    weight: torch.Tensor
    spec: QuantSpec
    #: GPTQ: the relative dampening (λ / mean diag H) that made H positive definite: the one asked
    #: for, or a larger one when H was not (:func:`damped_cholesky_inverse`); None for RTN
    damp: Optional[float] = None


def _finish(w_or_q: torch.Tensor, spec: QuantSpec, scales, zeros) -> QuantResult:
    codes, s, z = ops.quantize(w_or_q.contiguous(), spec, scales=scales, zeros=zeros)
    q = ops.pack(codes, spec.bits)
    deq = ops.dequantize(q, s, z, spec, torch.float32)
    return QuantResult(q, s, z, codes, deq, spec)


def group_params(w: torch.Tensor, spec: QuantSpec, clip: bool = False,
                 hdiag: Optional[torch.Tensor] = None):
    """Scales and zeros of every group of ``w [N, K]`` in the canonical shapes (``[N, K/g]``
    per-OC, ``[K, N/g]`` per-IC): min-max, or with ``clip`` the :func:`mse_params` search,
    per-OC weighting each input channel's squared error by ``hdiag [K]`` (the Hessian diagonal,
    i.e. the mean squared activation of that channel) when given."""
    N, K = w.shape
    g = spec.group_for(N, K)
    if spec.axis == "oc":
        v = w.reshape(N, K // g, g)
        wt = None if hdiag is None else hdiag.float().reshape(1, K // g, g)
    else:  # a group lies in one input column, so the Hessian weight is constant across it
        v = w.t().reshape(K, N // g, g)
        wt = None
    return mse_params(v, spec, wt) if clip else minmax_params(v, spec)


def rtn(w: torch.Tensor, spec: QuantSpec, clip: bool = False,
        hdiag: Optional[torch.Tensor] = None) -> QuantResult:
    """Round-to-nearest of ``w [N, K]``: min-max scales (exactly ``ops.quantize``), or with
    ``clip`` the per-group clipping search of :func:`group_params`."""
    w = w.detach().float().contiguous()
    spec.check_shape(*w.shape)
    if not clip:
        return _finish(w, spec, None, None)
    s, z = group_params(w, spec, True, hdiag)
    return _finish(w, spec, s, z)


def minmax_params(v: torch.Tensor, spec: QuantSpec):
    """Min-max scale and zero point of each row of ``v [..., g]`` as the format defines them
    (the range always includes 0; scales rounded to ``spec.scale_dtype``; a zero scale becomes 1).
    Returns ``(scales, zeros)`` in the canonical dtypes (zeros None if symmetric)."""
    if spec.symmetric:
        return _params_from_range(None, v.abs().amax(-1), spec)
    return _params_from_range(v.amin(-1).clamp(max=0), v.amax(-1).clamp(min=0), spec)


def _params_from_range(lo, hi, spec: QuantSpec):
    """Scale/zero of the format for the range ``[lo, hi]`` (``lo <= 0 <= hi``; for symmetric
    only ``hi`` = max |v| is used), rounded like :func:`minmax_params`."""
    qmax = 2 ** spec.bits - 1
    if spec.symmetric:
        s = hi / (2 ** (spec.bits - 1) - 1)
    else:
        s = (hi - lo) / qmax
    s = s.to(spec.scale_dtype)
    if not bool(torch.isfinite(s).all()):  # the op's own check would only say "not finite"
        raise ValueError(f"a group's scale overflows scale_dtype={spec.scale_dtype} (the weight range "
                         "is too large for it); use float32 or bfloat16 scales")
    s = torch.where(s == 0, torch.ones_like(s), s)
    if spec.symmetric:
        return s, None
    z = torch.round(-lo / s.float()).clamp(0, qmax).to(torch.uint8)
    return s, z


#: shrink factors of the clipping search (1 = min-max)
CLIP_GRID = tuple(round(1.0 - 0.025 * i, 4) for i in range(25))  # 1.0 ... 0.4


def mse_params(v: torch.Tensor, spec: QuantSpec, weight: Optional[torch.Tensor] = None,
               grid=CLIP_GRID):
    """Clipped scale and zero point of each row of ``v [..., g]``: the range ``[p·min, p·max]``
    for the shrink factor ``p`` in ``grid`` that minimises the row's (``weight``-weighted, if
    given; broadcastable to ``v``) squared quantisation error. ``p = 1`` is :func:`minmax_params`,
    so the result is never worse than min-max on that error (ties keep the larger range).
    Same return as :func:`minmax_params`."""
    v = v.float()
    qmax = 2 ** spec.bits - 1
    if spec.symmetric:
        lo0, hi0 = None, v.abs().amax(-1)
    else:
        lo0, hi0 = v.amin(-1).clamp(max=0), v.amax(-1).clamp(min=0)
    # all shrink factors at once (a leading grid dimension), in chunks to bound the memory
    step = max(1, min(len(grid), (1 << 22) // max(1, v.numel())))
    best_err = best_s = best_z = None
    for c in range(0, len(grid), step):
        p = torch.tensor(grid[c:c + step], dtype=v.dtype, device=v.device)
        p = p.reshape((-1,) + (1,) * hi0.dim())
        s, z = _params_from_range(None if lo0 is None else lo0 * p, hi0 * p, spec)
        sf = s.float()[..., None]
        zf = torch.full_like(sf, 2 ** (spec.bits - 1)) if z is None else z.float()[..., None]
        d = _fake_f(v, sf, zf, qmax) - v
        d = d * d
        err = (d if weight is None else d * weight).sum(-1)  # [P, ...]
        idx = err.argmin(0, keepdim=True)  # first minimum: the widest range among ties
        e, s = err.gather(0, idx)[0], s.gather(0, idx)[0]
        z = None if z is None else z.gather(0, idx)[0]
        if best_err is None:
            best_err, best_s, best_z = e, s, z
            continue
        better = e < best_err
        best_err = torch.where(better, e, best_err)
        best_s = torch.where(better, s, best_s)
        if z is not None:
            best_z = torch.where(better, z, best_z)
    return best_s, best_z


def _fake(v: torch.Tensor, s: torch.Tensor, z: Optional[torch.Tensor], spec: QuantSpec):
    """``(clamp(round(v/s) + z) - z)·s`` in fp32, with ``s``/``z`` broadcastable to ``v``."""
    qmax = 2 ** spec.bits - 1
    sf = s.float()
    zf = torch.full_like(sf, 2 ** (spec.bits - 1)) if z is None else z.float()
    q = (torch.round(v / sf) + zf).clamp(0, qmax)
    return (q - zf) * sf


def _fake_f(v, sf, zf, qmax):
    return ((torch.round(v / sf) + zf).clamp(0, qmax) - zf) * sf


@contextlib.contextmanager
def _single_thread():
    """The column loop is thousands of tiny ops: on a small shared machine every multi-threaded
    region can stall for a scheduler slice, so it runs on one intra-op thread."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class HessianAccumulator:
    """Running ``H = 2/n · Σ xxᵀ`` over the rows of the inputs of one linear (``H`` holds ``Σ xxᵀ``)."""

    def __init__(self, in_features: int, device=None):
        self.H = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(self.H.device, torch.float32)
        self.H += (x.t() @ x).double()  # fp32 product per batch, fp64 running sum
        self.n += x.shape[0]

    def hessian(self) -> torch.Tensor:
        if self.n == 0:
            raise ValueError("no calibration inputs were seen for this layer")
        return (2.0 / self.n) * self.H


@torch.no_grad()
def gptq(w: torch.Tensor, H: torch.Tensor, spec: QuantSpec, blocksize: int = 128,
         percdamp: float = 0.01, act_order: bool = True, clip: bool = False) -> QuantResult:
    """GPTQ of ``w [N, K]`` given the Hessian ``H [K, K]`` of its inputs (see the module doc).

    Per-OC with act-order uses static groups (each group's scale and zero from the original
    weight); per-OC without act-order takes each group's scale and zero when its first column is
    reached (from the compensated weight). Per-IC takes each column's group scales from the
    compensated column. Computation in fp32 (the Cholesky factorisation in fp64), on one
    intra-op thread when on CPU (the column loop is thousands of tiny ops)."""
    if w.device.type == "cpu":
        with _single_thread():
            return _gptq(w, H, spec, blocksize, percdamp, act_order, clip)
    return _gptq(w, H, spec, blocksize, percdamp, act_order, clip)


def _gptq(w, H, spec, blocksize, percdamp, act_order, clip):
    N, K = w.shape
    spec.check_shape(N, K)
    if tuple(H.shape) != (K, K):
        raise ValueError(f"gptq: Hessian must be [{K}, {K}], got {list(H.shape)}")
    dev = w.device
    W = w.detach().float().clone()
    H = H.detach().to(dev, torch.float64).clone()
    g = spec.group_for(N, K)

    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    static = None
    if spec.axis == "oc" and act_order:
        static = group_params(W, spec, clip, torch.diag(H))  # [N, K/g] each

    hdiag = torch.diag(H).float()
    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W = W[:, perm]
        H = H[perm][:, perm]

    Hinv, damp_used = damped_cholesky_inverse(H, percdamp)

    Q = torch.zeros_like(W)
    if spec.axis == "oc":
        shape = spec.scale_shape(N, K)
        S = torch.empty(shape, dtype=spec.scale_dtype, device=dev)
        Z = None if spec.symmetric else torch.empty(shape, dtype=torch.uint8, device=dev)
        if static is not None:
            S, Z = static
    else:  # per-IC: [K, N/g], filled column by column (original column index)
        S = torch.empty((K, N // g), dtype=spec.scale_dtype, device=dev)
        Z = None if spec.symmetric else torch.empty((K, N // g), dtype=torch.uint8, device=dev)

    qmax = 2 ** spec.bits - 1
    if static is not None:  # per-column float scale/zero in the (permuted) column order
        cols = (perm if perm is not None else torch.arange(K, device=dev)) // g
        static_sf = S.float()[:, cols].contiguous()
        static_zf = (torch.full_like(static_sf, 2 ** (spec.bits - 1)) if Z is None
                     else Z.float()[:, cols].contiguous())
    perm_list = perm.tolist() if perm is not None else None
    cur_s = cur_z = None
    for i1 in range(0, K, blocksize):
        i2 = min(i1 + blocksize, K)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            wcol = W1[:, i]
            d = Hinv1[i, i]
            orig = perm_list[col] if perm_list is not None else col
            if spec.axis == "oc":
                if static is not None:
                    qcol = _fake_f(wcol, static_sf[:, col], static_zf[:, col], qmax)
                else:
                    if col % g == 0:  # a new group: params from the compensated weight
                        rest = W[:, i2:col + g] if col + g > i2 else W[:, :0]
                        grp = torch.cat([W1[:, i:i + g], rest], dim=1)[:, :g]
                        cur_s, cur_z = (mse_params(grp, spec, hdiag[col:col + g]) if clip
                                        else minmax_params(grp, spec))
                        S[:, col // g] = cur_s
                        if Z is not None:
                            Z[:, col // g] = cur_z
                    qcol = _fake(wcol, cur_s, cur_z, spec)
            else:
                v = wcol.reshape(N // g, g)
                s, z = mse_params(v, spec) if clip else minmax_params(v, spec)
                S[orig] = s
                if Z is not None:
                    Z[orig] = z
                qcol = _fake(v, s[:, None], None if z is None else z[:, None], spec).reshape(N)
            Q1[:, i] = qcol
            err = (wcol - qcol) / d
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    if perm is not None:
        inv = torch.argsort(perm)
        Q = Q[:, inv]
    res = _finish(Q, spec, S, Z)
    res.damp = damp_used
    return res


#: how far :func:`damped_cholesky_inverse` escalates: the asked dampening times 10**i
DAMP_ESCALATIONS = 8


def damped_cholesky_inverse(H: torch.Tensor, percdamp: float):
    """The upper Cholesky factor of ``(H + λI)⁻¹`` (fp32) with ``λ = percdamp·mean(diag H)``.
    A Hessian that is not positive definite after that (too few calibration rows for its rank,
    round-off, an indefinite input) gets ten times the dampening, up to ``DAMP_ESCALATIONS``
    times; past that (or with a non-finite or non-positive diagonal) the identity stands in for
    H, which makes GPTQ plain rounding. Returns ``(factor, relative dampening used)``; the
    dampening is ``inf`` for the identity fallback."""
    K = H.shape[0]
    eye = torch.eye(K, dtype=H.dtype, device=H.device)
    mean_diag = torch.mean(torch.diag(H))
    if bool(torch.isfinite(H).all()) and float(mean_diag) > 0:
        for i in range(DAMP_ESCALATIONS + 1):
            rel = percdamp * 10.0 ** i
            L, info = torch.linalg.cholesky_ex(H + rel * mean_diag * eye)
            if int(info) != 0:
                continue
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0 and bool(torch.isfinite(U).all()):
                return U.float(), rel
    return eye.float(), float("inf")
