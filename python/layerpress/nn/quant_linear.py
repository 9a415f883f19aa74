"""``QuantLinear``: a linear layer whose weight is stored quantised and runs on ``layerpress::gemm``."""
from __future__ import annotations

import threading
import warnings
from typing import Optional

import torch
from torch import nn

from .. import ops
from ..ops.rotation import hadamard
from ..spec import Layout, QuantSpec

__all__ = ["QuantLinear", "quantize_linear", "layout_for", "SIDE_DTYPES"]

_CANONICAL_KEYS = ("qweight", "scales", "zeros")
#: Optional 16-bit side paths (docs/format.md §8): outliers as a sparse matrix ``S [N, K]`` given by
#: flat row-major indices ``n·K + k`` (int32, strictly increasing) and values; LoRC factors
#: ``A [r, K]``, ``B [N, r]``. Forward: ``y = x·dequant(W)ᵀ + x·Sᵀ + (x·Aᵀ)·Bᵀ + b``.
_SIDE_KEYS = ("outlier_idx", "outlier_val", "lorc_a", "lorc_b")
SIDE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# runtime CSR forms of S and Sᵀ (derived from outlier_idx/outlier_val, not saved)
_CSR_KEYS = ("_csr_crow", "_csr_col", "_csr_val", "_csr_t_crow", "_csr_t_col", "_csr_t_val")
# _apply swaps the layer's buffers (repack for the target device; the scales and side paths set
# aside while torch casts the rest): two threads moving one layer at once would interleave those
# steps (one finds the scales already set aside: KeyError, or a layout that does not match its
# tensors). One lock for every layer: moves are rare and short.
_APPLY_LOCK = threading.RLock()


# ---- sparse side path: x · Sᵀ with S in CSR, as an opaque op (torch.compile traces it whole) -------

@torch.library.custom_op("layerpress_side::csr_matmul_t", mutates_args=())
def _csr_matmul_t(x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, val: torch.Tensor,
                  t_crow: torch.Tensor, t_col: torch.Tensor, t_val: torch.Tensor,
                  n: int) -> torch.Tensor:
    """``x [M, K] · Sᵀ`` -> ``[M, n]`` for ``S [n, K]`` in CSR (``crow``, ``col``, ``val``); the
    ``t_*`` tensors hold ``Sᵀ`` in CSR, used only by the backward. fp32 in and out."""
    with warnings.catch_warnings():  # "sparse CSR support is in beta" (once per process)
        warnings.simplefilter("ignore", UserWarning)
        s = torch.sparse_csr_tensor(crow, col, val.to(x.dtype), (n, x.shape[1]), check_invariants=False)
    # S · xᵀ runs the sparse kernel once over the nonzeros (MKL / cuSPARSE); a gather + index_add
    # formulation materialises [M, nnz] and was 5-40x slower at M >= 16.
    return torch.sparse.mm(s, x.t()).t().contiguous()


@_csr_matmul_t.register_fake
def _(x, crow, col, val, t_crow, t_col, t_val, n):
    return x.new_empty((x.shape[0], n))


def _csr_setup_context(ctx, inputs, output):
    x, crow, col, val, t_crow, t_col, t_val, n = inputs
    ctx.save_for_backward(crow, col, val, t_crow, t_col, t_val)
    ctx.k = x.shape[1]


def _csr_backward(ctx, grad):
    crow, col, val, t_crow, t_col, t_val = ctx.saved_tensors
    gx = None
    if ctx.needs_input_grad[0]:  # d(x·Sᵀ)/dx applied to grad: grad · S = grad · (Sᵀ)ᵀ
        gx = _csr_matmul_t(grad.contiguous(), t_crow, t_col, t_val, crow, col, val, ctx.k)
    return gx, None, None, None, None, None, None, None


torch.library.register_autograd("layerpress_side::csr_matmul_t", _csr_backward,
                                setup_context=_csr_setup_context)


def _csr_from_flat(idx: torch.Tensor, val: torch.Tensor, n: int, k: int, transpose: bool):
    """CSR (crow int32 [rows+1], col int32, val) of S [n, k] (or of Sᵀ) from sorted flat indices.
    On the meta device (a layer built before its weights are loaded) only the shapes are known."""
    if idx.is_meta:
        rows = k if transpose else n
        return (torch.empty(rows + 1, dtype=torch.int32, device="meta"),
                torch.empty(idx.shape[0], dtype=torch.int32, device="meta"), val.contiguous())
    r, c = idx.long() // k, idx.long() % k
    if transpose:
        order = torch.argsort(c * n + r)
        r, c, val = c[order], r[order], val[order]
        n = k
    counts = torch.bincount(r, minlength=n)
    crow = torch.zeros(n + 1, dtype=torch.int32, device=idx.device)
    crow[1:] = torch.cumsum(counts, 0).to(torch.int32)
    return crow, c.to(torch.int32).contiguous(), val.contiguous()


#: output rows per tile of each kernel layout (row_views: whole tiles are dim-0 slices)
_ROW_TILE = {Layout.CPU_BITPLANE16: 16, Layout.CUDA_MMA: 64}


def layout_for(device: torch.device) -> Layout:
    """The weight layout the GEMM kernels of a device read."""
    kind = torch.device(device).type
    if kind == "cpu":
        return Layout.CPU_BITPLANE16
    # meta (and any other device) keeps the canonical layout: what loaders size parameters by
    return Layout.CUDA_MMA if kind == "cuda" else Layout.CANONICAL


class QuantLinear(nn.Module):
    """A linear layer with a low-bit weight: ``y = x · dequant(W)ᵀ + b`` through
    ``torch.ops.layerpress.gemm``, with dequantisation fused into the product.

    The weight is held in the layout the current device's kernel reads (``layout``); the
    ``state_dict`` always carries the canonical layout of docs/format.md (``qweight`` int32
    ``[N, K*bits/32]``, ``scales``, ``zeros`` uint8 when asymmetric), so checkpoints do not depend
    on the device. The weight is frozen; gradients flow to the input (and the bias), so the
    layer can sit inside a model being fine-tuned (e.g. under LoRA adapters).

    Optional side paths in ``side_dtype`` (16-bit by default; docs/format.md §8), set with
    :meth:`set_side_paths` or sized by the constructor for loading: ``outliers`` weights kept as
    a sparse matrix ``S`` (buffers ``outlier_idx`` int32 flat indices ``n·K + k``, strictly
    increasing, and ``outlier_val``) and a rank-``lorc_rank`` correction ``B·A`` (``lorc_a``
    ``[r, K]``, ``lorc_b`` ``[N, r]``): ``y = x·dequant(W)ᵀ + x·Sᵀ + (x·Aᵀ)·Bᵀ + b``, the side
    terms computed in fp32 on the layer's input ``x`` as given (before any ``in_perm``). They
    are frozen like the weight; the input gradient includes them.
    """

    def __init__(self, in_features: int, out_features: int, spec: QuantSpec = QuantSpec(),
                 bias: bool = True, device=None, dtype: Optional[torch.dtype] = None,
                 outliers: int = 0, lorc_rank: int = 0, side_dtype: torch.dtype = torch.float16):
        super().__init__()
        if not isinstance(spec, QuantSpec):
            raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
        spec.check_shape(out_features, in_features)
        self.in_features = in_features
        self.out_features = out_features
        self.spec = spec
        device = torch.device(device) if device is not None else torch.device("cpu")
        shape = spec.scale_shape(out_features, in_features)
        q = torch.zeros(out_features, in_features * spec.bits // 32, dtype=torch.int32, device=device)
        s = torch.ones(shape, dtype=spec.scale_dtype, device=device)
        z = None if spec.symmetric else torch.full(shape, 2 ** (spec.bits - 1), dtype=torch.uint8, device=device)
        self.register_buffer("qweight", None, persistent=False)
        self.register_buffer("scales", None, persistent=False)
        self.register_buffer("zeros", None, persistent=False)
        # Optional input-channel permutation (e.g. a GPTQ act-order g_idx made contiguous):
        # the layer computes x[..., in_perm] · dequant(W)ᵀ; None means the identity.
        self.register_buffer("in_perm", None, persistent=False)
        # The input rotation of a spec with rotation="hadamard": float32 ±1 signs [K] (the stored
        # weight is W·R; forward rotates x's rows inside the GEMM launcher).
        self.register_buffer("rot_signs", None, persistent=False)
        if spec.rotated:
            self.rot_signs = torch.ones(in_features, dtype=torch.float32, device=device)
        self.layout = Layout.CANONICAL
        self._set_canonical(q, s, z)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype or torch.float32))
        else:
            self.register_parameter("bias", None)
        for key in _SIDE_KEYS + _CSR_KEYS:
            self.register_buffer(key, None, persistent=False)
        self.side_dtype = side_dtype
        if outliers or lorc_rank:  # placeholders of the right shapes (valid, all-zero), e.g. for loading
            if isinstance(outliers, bool) or not isinstance(outliers, int) or not 0 <= outliers <= in_features * out_features:
                raise ValueError(f"outliers must be a count in [0, {in_features * out_features}], got {outliers!r}")
            if isinstance(lorc_rank, bool) or not isinstance(lorc_rank, int) or not 0 <= lorc_rank <= min(in_features, out_features):
                raise ValueError(f"lorc_rank must be in [0, min(in_features, out_features) = "
                                 f"{min(in_features, out_features)}], got {lorc_rank!r}")
            zf = dict(dtype=side_dtype, device=device)
            self.set_side_paths(
                torch.arange(outliers, dtype=torch.int32, device=device) if outliers else None,
                torch.zeros(outliers, **zf) if outliers else None,
                torch.zeros(lorc_rank, in_features, **zf) if lorc_rank else None,
                torch.zeros(out_features, lorc_rank, **zf) if lorc_rank else None)

    # ---- construction ----------------------------------------------------------------------------
    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: QuantSpec = QuantSpec()) -> "QuantLinear":
        """Round-to-nearest quantisation of an ``nn.Linear`` (calibrated quantisers live in the
        compression flows)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        mod = cls(linear.in_features, linear.out_features, spec, bias=linear.bias is not None,
                  device=w.device, dtype=w.dtype if w.is_floating_point() else None)
        codes, s, z = ops.quantize(w.contiguous(), spec)
        mod._set_canonical(ops.pack(codes, spec.bits), s, z)
        if linear.bias is not None:
            mod.bias.data.copy_(linear.bias.detach())
        return mod

    @classmethod
    def from_quantized(cls, qweight, scales, zeros, spec: QuantSpec, bias=None,
                       in_perm=None, *, outlier_idx=None, outlier_val=None, lorc_a=None,
                       lorc_b=None, rot_signs=None) -> "QuantLinear":
        """From canonical tensors (e.g. produced by a calibrated quantiser). ``in_perm`` (integer
        ``[K]``, a permutation): the stored weight's input channels are ``x[..., in_perm]``.
        ``rot_signs``: the ±1 signs of a rotated ``spec`` (required exactly then)."""
        n = qweight.shape[0]
        k = qweight.shape[1] * 32 // spec.bits
        mod = cls(k, n, spec, bias=bias is not None, device=qweight.device,
                  dtype=bias.dtype if bias is not None else None)
        mod._set_canonical(qweight, scales, zeros)
        mod.set_in_perm(in_perm)
        if spec.rotated or rot_signs is not None:
            mod.set_rot_signs(rot_signs)
        if bias is not None:
            mod.bias.data.copy_(bias)
        if any(t is not None for t in (outlier_idx, outlier_val, lorc_a, lorc_b)):  # side paths
            mod.set_side_paths(outlier_idx, outlier_val, lorc_a, lorc_b)
        return mod

    # ---- side paths ------------------------------------------------------------------------------
    def _check_side(self, idx, val, a, b, where: str = ""):
        n, k = self.out_features, self.in_features
        if (idx is None) != (val is None):
            raise ValueError(f"{where}outlier_idx and outlier_val must be given together")
        if (a is None) != (b is None):
            raise ValueError(f"{where}lorc_a and lorc_b must be given together")
        dtypes = {t.dtype for t in (val, a, b) if t is not None}
        if len(dtypes) > 1:
            raise ValueError(f"{where}side-path tensors must share one dtype, got {sorted(map(str, dtypes))}")
        if dtypes and next(iter(dtypes)) not in SIDE_DTYPES:
            raise ValueError(f"{where}side-path dtype must be one of {[str(d) for d in SIDE_DTYPES]}, "
                             f"got {next(iter(dtypes))}")
        if idx is not None:
            if idx.dtype != torch.int32 or idx.dim() != 1:
                raise ValueError(f"{where}outlier_idx: expected int32 [nnz], got {idx.dtype} {list(idx.shape)}")
            if val.dim() != 1 or val.shape[0] != idx.shape[0]:
                raise ValueError(f"{where}outlier_val: expected [{idx.shape[0]}] (one value per "
                                 f"index), got {list(val.shape)}")
            if idx.numel() and not idx.is_meta:  # meta tensors have no values to check
                if int(idx.min()) < 0 or int(idx.max()) >= n * k:
                    raise ValueError(f"{where}outlier_idx: flat indices n*K + k must lie in "
                                     f"[0, {n * k}), got [{int(idx.min())}, {int(idx.max())}]")
                if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
                    raise ValueError(f"{where}outlier_idx must be strictly increasing (sorted, no duplicates)")
            if not val.is_meta and not bool(torch.isfinite(val).all()):
                raise ValueError(f"{where}outlier_val holds NaN or Inf")
        if a is not None:
            r = a.shape[0] if a.dim() == 2 else -1
            if a.dim() != 2 or a.shape[1] != k or not 1 <= r <= min(n, k):
                raise ValueError(f"{where}lorc_a: expected [r, {k}] with 1 <= r <= {min(n, k)}, got {list(a.shape)}")
            if tuple(b.shape) != (n, r):
                raise ValueError(f"{where}lorc_b: expected [{n}, {r}], got {list(b.shape)}")
            if not a.is_meta and not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
                raise ValueError(f"{where}lorc_a/lorc_b hold NaN or Inf")

    def set_side_paths(self, outlier_idx=None, outlier_val=None, lorc_a=None, lorc_b=None) -> None:
        """Sets (or, with all None, removes) the side paths. ``outlier_idx`` int32 ``[nnz]``:
        flat indices ``n·K + k`` (in the order of the layer's input ``x``), strictly increasing;
        ``outlier_val`` ``[nnz]``; ``lorc_a`` ``[r, K]``, ``lorc_b`` ``[N, r]``; all float
        tensors of one dtype in ``SIDE_DTYPES``. An empty outlier set is stored as none."""
        self._check_side(outlier_idx, outlier_val, lorc_a, lorc_b)
        device = self.qweight.device
        if outlier_idx is not None and outlier_idx.numel() == 0:
            outlier_idx = outlier_val = None
        mv = lambda t: None if t is None else t.detach().to(device).contiguous()  # noqa: E731
        self.outlier_idx, self.outlier_val = mv(outlier_idx), mv(outlier_val)
        self.lorc_a, self.lorc_b = mv(lorc_a), mv(lorc_b)
        for t in (outlier_val, lorc_a):
            if t is not None:
                self.side_dtype = t.dtype
        if self.outlier_idx is None:
            csr = (None,) * len(_CSR_KEYS)
        else:
            n, k = self.out_features, self.in_features
            csr = (_csr_from_flat(self.outlier_idx, self.outlier_val, n, k, False)
                   + _csr_from_flat(self.outlier_idx, self.outlier_val, n, k, True))
        for key, t in zip(_CSR_KEYS, csr):
            setattr(self, key, t)

    @property
    def outlier_count(self) -> int:
        return 0 if self.outlier_idx is None else int(self.outlier_idx.numel())

    @property
    def lorc_rank(self) -> int:
        return 0 if self.lorc_a is None else int(self.lorc_a.shape[0])

    def side_config(self) -> dict:
        """What a saved config records about the side paths (empty when there are none)."""
        if not (self.outlier_count or self.lorc_rank):
            return {}
        return {"outliers": self.outlier_count, "lorc_rank": self.lorc_rank,
                "side_dtype": str(self.side_dtype).replace("torch.", "")}

    def effective_weight(self, dtype=torch.float32) -> torch.Tensor:
        """``dequant(W) + S + B·A`` as a dense ``[N, K]`` tensor (computed in fp32): what the
        layer multiplies its input by."""
        w = self.dequantized_weight(torch.float32)
        if self.outlier_idx is not None:
            w.view(-1).index_add_(0, self.outlier_idx.long(), self.outlier_val.float())
        if self.lorc_a is not None:
            w += self.lorc_b.float() @ self.lorc_a.float()
        return w.to(dtype)

    def storage_bits(self) -> int:
        """Total bits stored for the weight: packed codes, scales, zeros and side paths (not the
        bias, an input permutation, nor a rotation's signs), as in the canonical state dict."""
        total = self.out_features * self.in_features * self.spec.bits
        for t in list(self.canonical()[1:]) + [getattr(self, k) for k in _SIDE_KEYS]:
            if t is not None:
                total += t.numel() * t.element_size() * 8
        return total

    def effective_bits(self) -> float:
        """:meth:`storage_bits` per weight (``N·K``): e.g. 4.1875 for W4 g128 with fp16 scales,
        uint8 zeros and no side paths; outliers add 48 bits each (int32 index + fp16 value)."""
        return self.storage_bits() / (self.out_features * self.in_features)

    def set_in_perm(self, in_perm) -> None:
        """Sets (or, with None, clears) the input permutation; checks it is a permutation of K."""
        if in_perm is not None:
            k = self.in_features
            if (not isinstance(in_perm, torch.Tensor) or in_perm.dtype.is_floating_point
                    or in_perm.dtype == torch.bool or tuple(in_perm.shape) != (k,)):
                got = (f"{in_perm.dtype} {list(in_perm.shape)}" if isinstance(in_perm, torch.Tensor)
                       else type(in_perm).__name__)
                raise ValueError(f"in_perm: expected an integer tensor [{k}], got {got}")
            in_perm = in_perm.to(device=self.qweight.device, dtype=torch.int64)
            if not torch.equal(torch.sort(in_perm).values, torch.arange(k, device=in_perm.device)):
                raise ValueError(f"in_perm: not a permutation of 0..{k - 1}")
        self.in_perm = in_perm

    def set_rot_signs(self, signs) -> None:
        """Sets the rotation's signs (float ±1 ``[K]``) of a layer whose spec is rotated."""
        k = self.in_features
        if not self.spec.rotated:
            raise ValueError(f"rot_signs given but the spec has no rotation (spec {self.spec.to_dict()})")
        if (not isinstance(signs, torch.Tensor) or not signs.dtype.is_floating_point
                or tuple(signs.shape) != (k,)):
            got = f"{signs.dtype} {list(signs.shape)}" if isinstance(signs, torch.Tensor) else type(signs).__name__
            raise ValueError(f"rot_signs: expected a float tensor [{k}] of ±1 (spec rotation="
                             f"{self.spec.rotation!r}), got {got}")
        signs = signs.detach().to(device=self.qweight.device, dtype=torch.float32).contiguous()
        if not signs.is_meta and not bool((signs.abs() == 1).all()):
            raise ValueError("rot_signs must all be +1 or -1 (an orthogonal rotation)")
        self.rot_signs = signs

    # ---- layouts ---------------------------------------------------------------------------------
    def _check_canonical(self, q, s, z, where: str):
        n, k, spec = self.out_features, self.in_features, self.spec
        want_q = (n, k * spec.bits // 32)
        if q.dtype != torch.int32 or tuple(q.shape) != want_q:
            raise ValueError(f"{where}qweight: expected int32 {list(want_q)}, got {q.dtype} {list(q.shape)}")
        want_s = spec.scale_shape(n, k)
        if s.dtype != spec.scale_dtype or tuple(s.shape) != want_s:
            raise ValueError(f"{where}scales: expected {spec.scale_dtype} {list(want_s)}, "
                             f"got {s.dtype} {list(s.shape)}")
        if spec.symmetric:
            if z is not None:
                raise ValueError(f"{where}zeros: a symmetric spec has no zeros")
        elif z is None or z.dtype != torch.uint8 or tuple(z.shape) != want_s:
            got = "nothing" if z is None else f"{z.dtype} {list(z.shape)}"
            raise ValueError(f"{where}zeros: expected uint8 {list(want_s)}, got {got}")

    def _set_canonical(self, q, s, z):
        self._check_canonical(q, s, z, "")
        layout = layout_for(q.device)
        if layout != Layout.CANONICAL:
            q, s, z = ops.repack(q.contiguous(), s.contiguous(), None if z is None else z.contiguous(),
                                 self.spec, layout)
        self.qweight, self.scales, self.zeros = q, s, z
        self.layout = layout

    def canonical(self):
        """(qweight, scales, zeros) in the canonical layout."""
        if self.layout == Layout.CANONICAL:
            return self.qweight, self.scales, self.zeros
        return ops.unrepack(self.qweight, self.scales, self.zeros, self.spec, self.out_features, self.layout)

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        """The ``[N, K]`` weight the layer multiplies ``x`` by (input channels in ``x``'s order)."""
        q, s, z = self.canonical()
        w = ops.dequantize(q, s, z, self.spec, dtype)
        if self.spec.rotated:  # stored W·R; the layer multiplies x by W·R·Rᵀ = W
            w = hadamard(w.float(), self.spec.rotation_block, self.rot_signs, transpose=True).to(dtype)
        if self.in_perm is not None:
            w = torch.empty_like(w).index_copy_(1, self.in_perm, w)
        return w

    def _apply(self, fn, recurse=True):
        with _APPLY_LOCK:
            return self._apply_locked(fn, recurse)

    def _apply_locked(self, fn, recurse):
        device = fn(torch.empty(0, dtype=torch.int32, device=self.qweight.device)).device
        if device != self.qweight.device and self.qweight.is_meta:
            # off the meta device (Module.to_empty): uninitialised tensors of the same shapes in
            # the target device's layout; load_state_dict fills them
            q, s, z = self.canonical()
            new = lambda t: None if t is None else torch.empty_like(t, device=device)  # noqa: E731
            self._set_canonical(new(q), new(s), new(z))
            for key in _SIDE_KEYS + _CSR_KEYS + ("rot_signs",):
                setattr(self, key, new(getattr(self, key)))
        elif device != self.qweight.device:
            q, s, z = self.canonical()
            self._set_canonical(q.to(device), s.to(device), None if z is None else z.to(device))
            if self.outlier_idx is not None or self.lorc_a is not None:
                self.set_side_paths(*[getattr(self, k) for k in _SIDE_KEYS])  # moved to device
        # The scales (and the side paths, the rotation's signs) keep their dtype whatever fn casts
        # floating tensors to (e.g. .half()).
        kept = {k: self._buffers.pop(k) for k in ("scales", "rot_signs") + _SIDE_KEYS + _CSR_KEYS}
        try:
            super()._apply(fn, recurse)
        finally:
            self._buffers.update(kept)
        if self.rot_signs is not None and self.rot_signs.device != device:
            self.rot_signs = self.rot_signs.to(device)
        return self

    # ---- state dict: always canonical ------------------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        side = [getattr(self, k) for k in _SIDE_KEYS]
        for key, t in zip(_CANONICAL_KEYS + _SIDE_KEYS, list(self.canonical()) + side):
            if t is not None:
                destination[prefix + key] = t if keep_vars else t.detach()
        if self.in_perm is not None:
            destination[prefix + "in_perm"] = self.in_perm
        if self.rot_signs is not None:
            destination[prefix + "rot_signs"] = self.rot_signs

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        for key in _CANONICAL_KEYS + ("in_perm", "rot_signs"):
            if prefix + key in unexpected_keys:
                unexpected_keys.remove(prefix + key)
        signs = state_dict.get(prefix + "rot_signs")
        if self.spec.rotated and signs is None:
            missing_keys.append(prefix + "rot_signs")
            return
        if not self.spec.rotated and signs is not None:
            unexpected_keys.append(prefix + "rot_signs")
            return
        self._load_side(state_dict, prefix, missing_keys, unexpected_keys, error_msgs)
        present = {k: state_dict.get(prefix + k) for k in _CANONICAL_KEYS}
        needed = ["qweight", "scales"] + ([] if self.spec.symmetric else ["zeros"])
        missing = [prefix + k for k in needed if present[k] is None]
        if missing:
            missing_keys.extend(missing)
            return
        if self.spec.symmetric and present["zeros"] is not None:
            unexpected_keys.append(prefix + "zeros")
            return
        device = self.qweight.device
        try:
            q, s = present["qweight"].to(device), present["scales"].to(device)
            z = None if present["zeros"] is None else present["zeros"].to(device)
            self._set_canonical(q, s, z)
            # The permutation is part of the stored weight: the state dict decides (absent = none).
            self.set_in_perm(state_dict.get(prefix + "in_perm"))
            if signs is not None:
                self.set_rot_signs(signs)
        except ValueError as e:
            error_msgs.append(f"{prefix}: {e} (spec {self.spec.to_dict()})")

    def _load_side(self, state_dict, prefix, missing_keys, unexpected_keys, error_msgs):
        """Side-path tensors must be exactly those this layer was built for (count, rank, dtype):
        a mismatch is an error, never a silent resize or cast."""
        for key in _SIDE_KEYS:
            if prefix + key in unexpected_keys:
                unexpected_keys.remove(prefix + key)
        mine = {k: getattr(self, k) for k in _SIDE_KEYS}
        given = {k: state_dict.get(prefix + k) for k in _SIDE_KEYS}
        ok = True
        for k in _SIDE_KEYS:
            if mine[k] is not None and given[k] is None:
                missing_keys.append(prefix + k)
                ok = False
            elif mine[k] is None and given[k] is not None:
                unexpected_keys.append(prefix + k)
                ok = False
            elif mine[k] is not None and (mine[k].dtype != given[k].dtype or mine[k].shape != given[k].shape):
                error_msgs.append(f"{prefix}{k}: expected {mine[k].dtype} {list(mine[k].shape)} "
                                  f"(outliers={self.outlier_count}, lorc_rank={self.lorc_rank}), "
                                  f"got {given[k].dtype} {list(given[k].shape)}")
                ok = False
        if not ok or all(mine[k] is None for k in _SIDE_KEYS):
            return
        try:
            self.set_side_paths(*[given[k] for k in _SIDE_KEYS])
        except ValueError as e:
            error_msgs.append(f"{prefix}: {e}")

    # ---- compute ---------------------------------------------------------------------------------
    def _side(self, x: torch.Tensor) -> torch.Tensor:
        """``x·Sᵀ + (x·Aᵀ)·Bᵀ`` in fp32, ``[M, N]`` for ``x [..., K]``."""
        x2 = x.reshape(-1, self.in_features).float().contiguous()
        side = None
        if self.outlier_idx is not None:
            side = _csr_matmul_t(x2, self._csr_crow, self._csr_col, self._csr_val,
                                 self._csr_t_crow, self._csr_t_col, self._csr_t_val, self.out_features)
        if self.lorc_a is not None:
            low = (x2 @ self.lorc_a.float().t()) @ self.lorc_b.float().t()
            side = low if side is None else side + low
        return side

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.outlier_idx is not None or self.lorc_a is not None:
            y = self._forward_main(x)
            return (y.float() + self._side(x).reshape(y.shape)).to(y.dtype)
        return self._forward_main(x)

    def _forward_main(self, x: torch.Tensor) -> torch.Tensor:
        return self._gemm(x, self.qweight, self.scales, self.zeros, self.bias, self.out_features)

    def _gemm(self, x, qweight, scales, zeros, bias, out_features: int) -> torch.Tensor:
        """The low-bit product of ``x`` with packed tensors of this layer's layout: all of them
        (:meth:`_forward_main`) or the views :meth:`row_views` gives (``out_features`` rows);
        the layer's input permutation and rotation apply as in ``forward``. No side paths."""
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        if self.in_perm is not None:
            x = x.index_select(-1, self.in_perm)
        return ops.gemm(x, qweight, scales, zeros, bias, self.spec, out_features, self.layout,
                        self.rot_signs, self.spec.rotation_block)

    def row_views(self, start: int, stop: int):
        """Zero-copy views ``(qweight, scales, zeros, bias)`` of output rows ``[start, stop)`` of
        the packed weight: ``self._gemm(x, *views, stop - start)`` is columns ``start:stop`` of
        this layer's product (bit for bit: the views ARE those rows' packed tensors) and reads
        only those rows' weight. The rows must be whole tiles of the layout, so that they are a
        dim-0 slice of every packed tensor: ``start`` and ``stop`` multiples of the tile rows
        (16 in the CPU bitplane layout, 64 in the CUDA mma layout; ``stop`` may be N, the last
        tile's padding rows being zero) and, per-IC, of the N-group (scales ``[N/g, K]``, or
        ``[ceil(N/64), K, 64/g]`` on CUDA). Returns None when they are not (the caller computes
        the whole product and slices it), on the canonical layout (no kernel reads it), and
        when the layer has side paths (outliers/LoRC are not sliced)."""
        n, start, stop = self.out_features, int(start), int(stop)
        if not 0 <= start < stop <= n:
            raise ValueError(f"row_views: expected 0 <= start < stop <= out_features={n}, got [{start}, {stop})")
        if self.outlier_idx is not None or self.lorc_a is not None:
            return None
        tile = _ROW_TILE.get(self.layout)
        if tile is None:
            return None
        aligned = lambda r, m: r % m == 0 or r == n  # noqa: E731
        if start % tile or not aligned(stop, tile):
            return None
        t0, t1 = start // tile, -(-stop // tile)
        rows = lambda t: None if t is None else t.narrow(0, t0, t1 - t0)  # noqa: E731
        if self.spec.axis == "ic":
            g = self.spec.group_for(n, self.in_features)
            if start % g or stop % g:
                return None
            if self.layout == Layout.CPU_BITPLANE16:  # [N/g, K]: whole N-groups
                rows_s = lambda t: None if t is None else t.narrow(0, start // g, (stop - start) // g)  # noqa: E731
            else:  # CUDA [ceil(N/64), K, 64/g or 1]: whole tiles
                rows_s = rows
        else:  # [tiles, K/g, tile rows]
            rows_s = rows
        scales, zeros = rows_s(self.scales), rows_s(self.zeros)
        bias = None if self.bias is None else self.bias.narrow(0, start, stop - start)
        return rows(self.qweight), scales, zeros, bias

    def extra_repr(self) -> str:
        s = self.spec
        g = "whole" if s.group_size == -1 else s.group_size
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={s.bits}, "
                f"group_size={g}, axis={s.axis}, symmetric={s.symmetric}, "
                f"scale_dtype={str(s.scale_dtype).replace('torch.', '')}, bias={self.bias is not None}, "
                f"layout={self.layout.name.lower()}"
                + (", in_perm=True" if self.in_perm is not None else "")
                + (f", rotation={s.rotation}({s.rotation_block})" if s.rotated else "")
                + (f", outliers={self.outlier_count} "
                   f"({100 * self.outlier_count / (self.in_features * self.out_features):.2f}%)"
                   if self.outlier_count else "")
                + (f", lorc_rank={self.lorc_rank}" if self.lorc_rank else "")
                + (f", side_dtype={str(self.side_dtype).replace('torch.', '')}" if self.side_config() else ""))


def quantize_linear(linear: nn.Linear, spec: QuantSpec = QuantSpec()) -> QuantLinear:
    """Shorthand for :meth:`QuantLinear.from_linear`."""
    return QuantLinear.from_linear(linear, spec)

