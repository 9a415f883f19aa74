"""GGUF K-quant quantisers (Q4_K, Q5_K, Q6_K) in numpy, vectorised over every super-block of a
tensor: the ``gguf`` package dequantises these types but cannot quantise them. docs/interop.md.

Byte layouts (ggml's ``block_q4_K`` / ``block_q5_K`` / ``block_q6_K``; the field order is the one
``gguf.quants`` dequantises), super-blocks of ``QK_K = 256`` weights of one row:

* ``Q4_K`` (144 bytes): ``d``, ``dmin`` (fp16), 12 bytes of eight 6-bit sub-block scales ``sc``
  and eight 6-bit mins ``m`` (bytes 0-3: ``sc[0..3]`` in the low 6 bits, ``sc[4..7] >> 4`` in the
  top 2; bytes 4-7 the same for ``m``; bytes 8-11: ``sc[4+i] & 15`` low nibble, ``m[4+i] & 15``
  high nibble), then 128 bytes of 4-bit codes: byte ``32·c + l`` holds weight ``64·c + l`` in its
  low nibble and ``64·c + 32 + l`` in its high nibble. Sub-blocks of 32;
  ``w = d·sc_j·q − dmin·m_j``, ``q`` in 0..15.
* ``Q5_K`` (176 bytes): ``d``, ``dmin``, the same 12 scale bytes, 32 bytes ``qh`` (bit ``j`` of
  byte ``l`` is bit 4 of weight ``32·j + l``), the 128 low-nibble bytes as in Q4_K; ``q`` in 0..31.
* ``Q6_K`` (210 bytes): 128 bytes ``ql`` (byte ``64·h + l``: low nibble of weight ``128·h + l``,
  high nibble that of ``128·h + 64 + l``), 64 bytes ``qh`` (byte ``32·h + l``, bits ``2k..2k+1``:
  the top 2 bits of weight ``128·h + 32·k + l``), 16 int8 sub-block scales, ``d`` (fp16). Sub-blocks
  of 16; ``w = d·sc_j·(q − 32)``, ``q`` in 0..63.

Quantisation follows ggml's reference quantisers: each sub-block's scale (and min, clamped so the
block's offset is ≤ 0 as ggml does) is chosen by a small search over candidate scales that
minimises the weighted squared error (``make_qkx2_quants``: weights ``rms(x) + |x|``, candidates
``(nmax + rmin + rdelta·i)/(max − min)`` each refitted by weighted least squares; Q6_K:
``make_qx_quants`` with weights ``x²`` and 18 candidates around ``nmax/amax``), then the
sub-block scales (and mins) are quantised to 6 bits (Q6_K: int8) against the fp16 super-block
``d`` (and ``dmin``), and the codes are re-derived with the quantised scales. ``search=False``
gives the naive min-max quantiser of the same format (used by the tests as a baseline).
"""
from __future__ import annotations

from typing import Dict, Tuple

import numpy as np

__all__ = ["KQUANT_TYPES", "FALLBACK", "QK_K", "quantize", "pack", "decode"]

QK_K = 256
#: K-quant type -> (sub-block size, largest code, bytes per super-block)
_LAYOUT = {"Q4_K": (32, 15, 144), "Q5_K": (32, 31, 176), "Q6_K": (16, 63, 210)}
KQUANT_TYPES = tuple(_LAYOUT)
#: the legacy type a K-quant falls back to for rows whose length is not a multiple of 256
#: (llama.cpp's ``llama_tensor_get_type`` makes the same choice)
FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
_CHUNK = 8192  # sub-blocks per vectorised step (bounds the candidates' memory)
_EPS = 1e-15   # ggml's GROUP_MAX_EPS


def _fp16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).astype(np.float32)


def _qkx2(x: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int, search: bool):
    """ggml's ``make_qkx2_quants`` over sub-blocks ``x [B, n]``: ``(scale [B], min [B])`` with
    ``w ≈ scale·L − min`` and ``min ≥ 0``."""
    w = np.sqrt(np.mean(x * x, axis=1, keepdims=True)) + np.abs(x)
    lo = np.minimum(x.min(axis=1), 0.0)
    hi = x.max(axis=1)
    rng = hi - lo
    flat = rng <= 0
    rng = np.where(flat, 1.0, rng)
    # the min-max candidate (ggml's starting point)
    scale = rng / nmax
    mn = lo.copy()
    if search:
        L0 = np.clip(np.rint((nmax / rng)[:, None] * (x - lo[:, None])), 0, nmax)
        best = np.sum(w * (scale[:, None] * L0 + lo[:, None] - x) ** 2, axis=1)
        steps = rmin + rdelta * np.arange(nstep + 1, dtype=np.float32) + nmax  # [S]
        isc = steps[None, :] / rng[:, None]                                     # [B, S]
        L = np.clip(np.rint(isc[:, :, None] * (x - lo[:, None])[:, None, :]), 0, nmax)  # [B, S, n]
        wb = w[:, None, :]
        xb = x[:, None, :]
        sw = w.sum(axis=1)[:, None]
        sx = (w * x).sum(axis=1)[:, None]
        sl = (wb * L).sum(axis=2)
        sl2 = (wb * L * L).sum(axis=2)
        sxl = (wb * L * xb).sum(axis=2)
        D = sw * sl2 - sl * sl
        ok = D > 0
        Ds = np.where(ok, D, 1.0)
        tsc = (sw * sxl - sx * sl) / Ds
        tmn = (sl2 * sx - sl * sxl) / Ds
        pos = tmn > 0
        tsc = np.where(pos, np.divide(sxl, sl2, out=np.zeros_like(sxl), where=sl2 > 0), tsc)
        tmn = np.where(pos, 0.0, tmn)
        err = np.sum(wb * (tsc[:, :, None] * L + tmn[:, :, None] - xb) ** 2, axis=2)
        err = np.where(ok, err, np.inf)
        i = np.argmin(err, axis=1)
        e = err[np.arange(len(x)), i]
        better = e < best
        scale = np.where(better, tsc[np.arange(len(x)), i], scale)
        mn = np.where(better, tmn[np.arange(len(x)), i], mn)
    scale = np.where(flat, 0.0, scale)
    return scale.astype(np.float32), (-mn).astype(np.float32)


def _qx(x: np.ndarray, nmax: int, search: bool) -> np.ndarray:
    """ggml's ``make_qx_quants`` (``rmse_type`` 1: weights ``x²``) over sub-blocks ``x [B, n]``:
    the signed scale [B] with ``w ≈ scale·L``, ``L`` in ``−nmax..nmax−1``."""
    B = len(x)
    j = np.argmax(np.abs(x), axis=1)
    mx = x[np.arange(B), j]
    zero = np.abs(mx) < _EPS
    mx = np.where(zero, 1.0, mx)
    if not search:
        return np.where(zero, 0.0, -mx / nmax).astype(np.float32)
    steps = np.array([0.0] + [0.1 * i for i in range(-9, 10) if i], dtype=np.float32) + nmax
    isc = -steps[None, :] / mx[:, None]                                           # [B, S]
    L = np.clip(np.rint(isc[:, :, None] * x[:, None, :]), -nmax, nmax - 1)        # [B, S, n]
    w = (x * x)[:, None, :]
    slx = (w * x[:, None, :] * L).sum(axis=2)
    sl2 = (w * L * L).sum(axis=2)
    # best candidate maximises slx²/sl2 (the squared error is Σw x² − slx²/sl2)
    score = np.where(sl2 > 0, slx * slx / np.where(sl2 > 0, sl2, 1.0), -np.inf)
    i = np.argmax(score, axis=1)
    a = np.arange(B)
    scale = np.where(sl2[a, i] > 0, slx[a, i] / np.where(sl2[a, i] > 0, sl2[a, i], 1.0), 0.0)
    return np.where(zero, 0.0, scale).astype(np.float32)


def _quantize_chunk(x: np.ndarray, qtype: str, search: bool) -> Dict[str, np.ndarray]:
    """Super-blocks ``x [S, 256]`` (float32) -> the fields of the chosen quantisation."""
    sub, nmax, _ = _LAYOUT[qtype]
    S = len(x)
    xs = x.reshape(S * (QK_K // sub), sub)
    if qtype == "Q6_K":
        sc = _qx(xs, 32, search).reshape(S, -1)                    # signed sub-block scales
        j = np.argmax(np.abs(sc), axis=1)
        mx = sc[np.arange(S), j]
        zero = np.abs(mx) < _EPS
        isc = np.where(zero, 0.0, -128.0 / np.where(zero, 1.0, mx))
        ls = np.minimum(127, np.rint(isc[:, None] * sc)).astype(np.int8)
        d = np.where(zero, 0.0, _fp16(1.0 / np.where(zero, 1.0, isc))).astype(np.float32)
        dl = (d[:, None] * ls.astype(np.float32)).reshape(-1, 1)
        q = np.clip(np.rint(xs / np.where(dl == 0, 1.0, dl)), -32, 31)
        q = np.where(dl == 0, 0, q).reshape(S, QK_K).astype(np.int8)
        return {"d": d.astype(np.float16), "sc": ls, "q": q}
    rmin, nstep = (-1.0, 20) if qtype == "Q4_K" else (-0.5, 15)
    scale, mn = _qkx2(xs, nmax, rmin, 0.1, nstep, search)
    scale = np.maximum(scale, 0.0).reshape(S, -1)
    mn = mn.reshape(S, -1)
    ms, mm = scale.max(axis=1), mn.max(axis=1)
    inv_s = np.where(ms > 0, 63.0 / np.where(ms > 0, ms, 1.0), 0.0)
    inv_m = np.where(mm > 0, 63.0 / np.where(mm > 0, mm, 1.0), 0.0)
    ls = np.minimum(63, np.rint(inv_s[:, None] * scale)).astype(np.uint8)
    lm = np.minimum(63, np.rint(inv_m[:, None] * mn)).astype(np.uint8)
    d = _fp16(ms / 63.0)
    dmin = _fp16(mm / 63.0)
    dl = (d[:, None] * ls.astype(np.float32)).reshape(-1, 1)
    dm = (dmin[:, None] * lm.astype(np.float32)).reshape(-1, 1)
    q = np.clip(np.rint((xs + dm) / np.where(dl == 0, 1.0, dl)), 0, nmax)
    q = np.where(dl == 0, 0, q).reshape(S, QK_K).astype(np.uint8)
    return {"d": d.astype(np.float16), "dmin": dmin.astype(np.float16), "sc": ls, "m": lm, "q": q}


def _check(w: np.ndarray, qtype: str) -> np.ndarray:
    if qtype not in _LAYOUT:
        raise ValueError(f"qtype {qtype!r} is not a K-quant (expected one of {KQUANT_TYPES})")
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2 or w.shape[1] % QK_K:
        raise ValueError(f"{qtype}: the weight must be 2-D with rows a multiple of {QK_K} long, "
                         f"got shape {list(w.shape)}")
    if not np.isfinite(w).all():
        raise ValueError(f"{qtype}: the weight has non-finite values")
    return w


def quantize(w: np.ndarray, qtype: str, search: bool = True) -> Tuple[np.ndarray, Dict[str, np.ndarray]]:
    """Quantises ``w [N, K]`` (``K`` a multiple of 256) to ``qtype``: ``(blocks uint8
    [N, K/256·bytes], fields)``. ``fields`` are the chosen values per super-block (``S = N·K/256``
    rows, row-major): ``d`` (fp16 [S]), ``sc`` (sub-block scales), ``q`` (codes [S, 256]) and, for
    Q4_K / Q5_K, ``dmin`` and ``m``; :func:`decode` maps them to the weights."""
    w = _check(w, qtype)
    n, k = w.shape
    x = w.reshape(-1, QK_K)
    sub = _LAYOUT[qtype][0]
    step = max(1, _CHUNK // (QK_K // sub))
    parts = [_quantize_chunk(x[i:i + step], qtype, search) for i in range(0, len(x), step)]
    fields = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    return pack(fields, qtype).reshape(n, -1), fields


def _pack_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins ``[S, 8]`` -> ggml's 12 bytes ``[S, 12]``."""
    lo = (sc[:, :4] & 0x3F) | ((sc[:, 4:] >> 4) << 6)
    mid = (m[:, :4] & 0x3F) | ((m[:, 4:] >> 4) << 6)
    hi = (sc[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4)
    return np.concatenate([lo, mid, hi], axis=1).astype(np.uint8)


def _f16b(d: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(d.astype(np.float16)).view(np.uint8).reshape(-1, 2)


def pack(fields: Dict[str, np.ndarray], qtype: str) -> np.ndarray:
    """The fields of :func:`quantize` -> ggml's bytes, one super-block a row ``[S, bytes]``."""
    q = fields["q"]
    S = len(q)
    if qtype == "Q6_K":
        u = (q.astype(np.int16) + 32).astype(np.uint8).reshape(S, 2, 128)
        ql = (u[:, :, :64] & 0x0F) | ((u[:, :, 64:] & 0x0F) << 4)                    # [S, 2, 64]
        top = (u >> 4).reshape(S, 2, 4, 32)
        qh = top[:, :, 0] | (top[:, :, 1] << 2) | (top[:, :, 2] << 4) | (top[:, :, 3] << 6)
        out = [ql.reshape(S, 128), qh.reshape(S, 64), fields["sc"].astype(np.int8).view(np.uint8),
               _f16b(fields["d"])]
    else:
        head = [_f16b(fields["d"]), _f16b(fields["dmin"]), _pack_scales(fields["sc"], fields["m"])]
        u = q.astype(np.uint8).reshape(S, 4, 2, 32)
        qs = ((u[:, :, 0] & 0x0F) | ((u[:, :, 1] & 0x0F) << 4)).reshape(S, 128)
        if qtype == "Q5_K":
            bits = (q.reshape(S, 8, 32) >> 4) & 1
            qh = np.zeros((S, 32), dtype=np.uint8)
            for j in range(8):  # eight bit planes, not a loop over blocks
                qh |= (bits[:, j] << j).astype(np.uint8)
            head.append(qh)
        out = head + [qs]
    return np.ascontiguousarray(np.concatenate(out, axis=1).astype(np.uint8))


def decode(fields: Dict[str, np.ndarray], qtype: str) -> np.ndarray:
    """The weights ``[S, 256]`` (float32) the fields stand for, in the order of operations of
    ggml's dequantisation (so a correct packing reads back bit-for-bit equal)."""
    sub = _LAYOUT[qtype][0]
    S = len(fields["q"])
    d = fields["d"].astype(np.float32)[:, None, None]
    ds = (d * fields["sc"].astype(np.float32)[:, :, None])
    if qtype == "Q6_K":
        return (ds * fields["q"].astype(np.float32).reshape(S, -1, sub)).reshape(S, QK_K)
    dm = fields["dmin"].astype(np.float32)[:, None, None] * fields["m"].astype(np.float32)[:, :, None]
    return (ds * fields["q"].astype(np.float32).reshape(S, -1, sub) - dm).reshape(S, QK_K)
