"""Plain-PyTorch reference of the format (no extension code): the definition the kernels are
tested against, written for clarity, not speed."""
from __future__ import annotations

import torch

from .spec import QuantSpec


def _groups_view(w: torch.Tensor, spec: QuantSpec):
    """[N, K] -> [lines, groups, g] with the group members last, plus the inverse."""
    n, k = w.shape
    g = spec.group_for(n, k)
    if spec.axis == "oc":
        v = w.reshape(n, k // g, g)
        return v, lambda t: t.reshape(n, k)
    v = w.t().reshape(k, n // g, g)  # column k, group along N
    return v, lambda t: t.reshape(k, n).t()


def quantize(w: torch.Tensor, spec: QuantSpec, scales=None, zeros=None):
    """RTN codes (uint8 [N, K]), scales and zeros, exactly as docs/format.md defines them."""
    v, back = _groups_view(w.float(), spec)
    qmax = 2 ** spec.bits - 1
    if scales is None:
        if spec.symmetric:
            s = v.abs().amax(-1) / (2 ** (spec.bits - 1) - 1)
        else:
            lo = v.amin(-1).clamp(max=0)
            hi = v.amax(-1).clamp(min=0)
            s = (hi - lo) / qmax
        s = s.to(spec.scale_dtype)
        s = torch.where(s == 0, torch.ones_like(s), s)
        sf = s.float()
        if spec.symmetric:
            z = None
        else:
            z = torch.round(-lo / sf).clamp(0, qmax).to(torch.uint8)
    else:
        s, z, sf = scales, zeros, scales.float()
    zf = torch.full_like(sf, 2 ** (spec.bits - 1)) if spec.symmetric else z.float()
    q = (torch.round(v / sf[..., None]) + zf[..., None]).clamp(0, qmax)
    return back(q).to(torch.uint8), s, z


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """LSB-first bit stream per row, 32-bit words (int32 [N, K*bits/32])."""
    n, k = codes.shape
    c = codes.to(torch.int64)
    bitpos = torch.arange(k, dtype=torch.int64) * bits
    words = torch.zeros(n, k * bits // 32, dtype=torch.int64)
    for b in range(bits):
        pos = bitpos + b
        bit = (c >> b) & 1
        words.index_add_(1, pos // 32, bit << (pos % 32))
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


def unpack(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    n, wpr = qweight.shape
    k = wpr * 32 // bits
    u = qweight.to(torch.int64) & 0xFFFFFFFF
    codes = torch.zeros(n, k, dtype=torch.int64)
    bitpos = torch.arange(k, dtype=torch.int64) * bits
    for b in range(bits):
        pos = bitpos + b
        codes |= ((u[:, pos // 32] >> (pos % 32)) & 1) << b
    return codes.to(torch.uint8)


def dequantize(codes: torch.Tensor, scales, zeros, spec: QuantSpec, dtype=torch.float32):
    """(q - z) * s in fp32 from unpacked codes [N, K]."""
    v, back = _groups_view(codes.float(), spec)
    sf = scales.float()
    zf = torch.full_like(sf, 2 ** (spec.bits - 1)) if zeros is None else zeros.float()
    return back((v - zf[..., None]) * sf[..., None]).to(dtype)


def gemm(x: torch.Tensor, codes, scales, zeros, spec: QuantSpec, bias=None) -> torch.Tensor:
    """float64 reference of Y = X · dequant(W)ᵀ (+ bias)."""
    w = dequantize(codes, scales, zeros, spec).double()
    y = x.double() @ w.t()
    if bias is not None:
        y = y + bias.double()
    return y
