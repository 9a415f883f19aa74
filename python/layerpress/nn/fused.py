"""Fused projections: linears that read the same input (q/k/v, gate/up) as one ``QuantLinear``.

:class:`FusedQuantLinear` is a :class:`QuantLinear` whose ``N`` is the parts' output features
concatenated (``parts``, ``part_sizes``): its canonical codes, scales and zero points are the
parts' concatenated along N, so its product, split, is each part's product. The parent module
(e.g. a Llama ``self_attn``) holds it under ``fused_<a>_<b>...`` (``fused_q_k_v``,
``fused_gate_up``) and each part's attribute (``q_proj``) becomes a :class:`FusedSlice`, a
stateless module whose forward returns its columns of the fused product. The first slice called
on an input computes the whole product once; the others reuse it when called on the same tensor
(same object, same version counter, same grad mode) and the cached product is dropped once every
slice has taken its part; a slice called on any other input computes the product itself. The
model's own attention/MLP code is unchanged.

:func:`fuse_layers` fuses only when it is exact: same input features, the same spec (bits,
group size, axis, symmetry, scale dtype, rotation kind and block) and rotation signs, the same
input permutation (or none), biases on all parts or none, no 16-bit side paths (refused: they
would fuse exactly but are rare; kept separate), and group boundaries that line up (per-IC
groups run along N: a whole-column group, ``group_size=-1``, cannot be fused).
:func:`fusion_problem` says why not. :func:`split_fused` gives the parts back, exactly;
:func:`unfuse` / :func:`unfused` (a context manager) put them back into the model.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .quant_linear import QuantLinear

__all__ = ["FusedQuantLinear", "FusedSlice", "fuse_layers", "fusion_problem", "fused_name",
           "split_fused", "unfuse", "unfused", "fused_modules"]

# guards every fused layer's product cache (short critical sections: a dict look-up)
_CACHE_LOCK = threading.Lock()


def fused_name(parts: Sequence[str]) -> str:
    """The parent's attribute for the fused layer of ``parts``: ``fused_q_k_v``, ``fused_gate_up``."""
    return "fused_" + "_".join(p[:-5] if p.endswith("_proj") else p for p in parts)


class FusedQuantLinear(QuantLinear):
    """A :class:`QuantLinear` holding several linears of one input concatenated along N;
    ``parts`` (their attribute names in the parent) and ``part_sizes`` (their out_features).
    Its forward is the whole product ``[..., sum(part_sizes)]``; :meth:`part_forward` is one
    part's columns, shared between the parts called on one input (module docstring)."""

    def __init__(self, in_features: int, part_sizes: Sequence[int], parts: Sequence[str],
                 spec=None, bias: bool = True, device=None, dtype=None):
        from ..spec import QuantSpec

        part_sizes, parts = [int(n) for n in part_sizes], [str(p) for p in parts]
        if len(parts) < 2 or len(parts) != len(part_sizes) or min(part_sizes) < 1:
            raise ValueError(f"FusedQuantLinear: needs >= 2 parts with one positive size each, got "
                             f"parts {parts}, part_sizes {part_sizes}")
        if len(set(parts)) != len(parts):
            raise ValueError(f"FusedQuantLinear: part names must differ, got {parts}")
        spec = QuantSpec() if spec is None else spec
        for p, n in zip(parts, part_sizes):
            try:
                spec.check_shape(n, in_features)
            except ValueError as e:
                raise ValueError(f"FusedQuantLinear part {p!r} [{n}, {in_features}]: {e}") from None
        _check_groups_align(spec, part_sizes, parts)
        super().__init__(in_features, sum(part_sizes), spec, bias=bias, device=device, dtype=dtype)
        self.parts = tuple(parts)
        self.part_sizes = tuple(part_sizes)
        offs = [0]
        for n in part_sizes:
            offs.append(offs[-1] + n)
        self.part_offsets = tuple(offs)
        self._lp_cache: Dict[int, tuple] = {}

    # ---- construction / splitting -----------------------------------------------------------------
    @classmethod
    def from_parts(cls, layers: Sequence[QuantLinear], parts: Sequence[str]) -> "FusedQuantLinear":
        """The fused layer of ``layers`` (named ``parts``), exact: canonical codes, scales and
        zero points concatenated along N (repacked once for the device). ValueError (saying
        why) when :func:`fusion_problem` finds them not fusable."""
        why = fusion_problem(layers, parts)
        if why:
            raise ValueError(f"cannot fuse {list(parts)}: {why}")
        first = layers[0]
        spec = first.spec
        canon = [m.canonical() for m in layers]
        sdim = 0 if spec.axis == "oc" else 1  # per-IC scales are [K, N/g]
        q = torch.cat([c[0] for c in canon], 0)
        s = torch.cat([c[1] for c in canon], sdim)
        z = None if spec.symmetric else torch.cat([c[2] for c in canon], sdim)
        bias = first.bias is not None
        mod = cls(first.in_features, [m.out_features for m in layers], parts, spec, bias=bias,
                  device=first.qweight.device, dtype=first.bias.dtype if bias else None)
        mod._set_canonical(q.contiguous(), s.contiguous(), None if z is None else z.contiguous())
        mod.set_in_perm(first.in_perm)
        if spec.rotated:
            mod.set_rot_signs(first.rot_signs)
        if bias:
            mod.bias = nn.Parameter(torch.cat([m.bias.detach() for m in layers]),
                                    requires_grad=first.bias.requires_grad)
        mod._lp_conv1d = bool(getattr(first, "_lp_conv1d", False))
        return mod

    def split(self) -> List[QuantLinear]:
        """The parts as separate ``QuantLinear`` layers (exactly the codes, scales, zero points
        and bias slices they were fused from), on this layer's device."""
        q, s, z = self.canonical()
        sdim = 0 if self.spec.axis == "oc" else 1
        g = self.spec.group_for(self.out_features, self.in_features)
        out = []
        for i, n in enumerate(self.part_sizes):
            a = self.part_offsets[i]
            sa, sn = (a, n) if sdim == 0 else (a // g, n // g)
            pick = lambda t: None if t is None else t.narrow(sdim, sa, sn).contiguous()  # noqa: E731
            bias = None if self.bias is None else self.bias.detach().narrow(0, a, n).clone()
            m = QuantLinear.from_quantized(q.narrow(0, a, n).contiguous(), pick(s), pick(z), self.spec,
                                           bias, self.in_perm, rot_signs=self.rot_signs)
            if m.bias is not None and self.bias is not None:
                m.bias.requires_grad_(self.bias.requires_grad)
            m._lp_conv1d = bool(getattr(self, "_lp_conv1d", False))
            out.append(m)
        return out

    # ---- compute ---------------------------------------------------------------------------------
    def part_forward(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Part ``i``'s output. Eager: a view of the fused product's columns, the product shared
        by the parts called on one input (module docstring). Under ``torch.compile`` (no
        Python-side cache in a graph, and the compiler does not merge identical custom-op
        calls): the part's own product, from zero-copy views of its rows of the packed tensors
        (:meth:`QuantLinear.row_views`), so a compiled model does the unfused model's GEMM work
        (the input permutation and rotation, if any, are applied once per part). Parts whose
        rows are not whole tiles of the layout (e.g. an N not a multiple of 16 on the CPU, of 64
        on CUDA, before the last part) fall back to the whole fused product, sliced."""
        a, b = self.part_offsets[i], self.part_offsets[i + 1]
        if torch.compiler.is_compiling():
            views = self.part_views(i)
            if views is None:
                return self(x)[..., a:b]
            return self._gemm(x, *views, b - a)
        key = self._cache_key(x)
        tid = threading.get_ident()
        with _CACHE_LOCK:
            c = self._lp_cache.get(tid)
            if c is not None and c[0] is x and c[1] == key and i not in c[3]:
                c[3].add(i)
                y = c[2]
                if len(c[3]) == len(self.part_sizes):
                    del self._lp_cache[tid]
                return y[..., a:b]
        y = self(x)
        with _CACHE_LOCK:
            self._lp_cache[tid] = (x, key, y, {i})
        return y[..., a:b]

    def part_views(self, i: int):
        """:meth:`QuantLinear.row_views` of part ``i``'s rows (None: they are not whole tiles)."""
        return self.row_views(self.part_offsets[i], self.part_offsets[i + 1])

    def _cache_key(self, x: torch.Tensor) -> tuple:
        # An inference tensor has no version counter (and can only be modified in place inside
        # inference mode): keyed on its identity and storage only.
        ver = -1 if x.is_inference() else x._version
        bias = self.bias
        bver = -1 if bias is None or bias.is_inference() else bias._version
        return (ver, bver, x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype,
                torch.is_grad_enabled(), torch.is_autocast_enabled())

    def clear_cache(self) -> None:
        """Drops any cached product (e.g. one whose other parts were never called)."""
        with _CACHE_LOCK:
            self._lp_cache.clear()

    def __getstate__(self):
        # a cached product is not part of the layer (copies and pickles start without one)
        state = dict(self.__dict__)
        state["_lp_cache"] = {}
        return state

    def extra_repr(self) -> str:
        return super().extra_repr() + f", parts={list(self.parts)}, part_sizes={list(self.part_sizes)}"


class FusedSlice(nn.Module):
    """Stands in for one part of a :class:`FusedQuantLinear` (e.g. ``q_proj``): no tensors of its
    own; ``forward(x)`` is the part's columns of the fused product. The fused layer is held by
    the parent (under :func:`fused_name`) and only referenced here (not a submodule: its tensors
    are saved once)."""

    def __init__(self, fused: FusedQuantLinear, index: int, fused_attr: str):
        super().__init__()
        self.__dict__["fused"] = fused  # a reference, not a child module
        self.index = int(index)
        self.fused_attr = fused_attr
        self.in_features = fused.in_features
        self.out_features = fused.part_sizes[self.index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused.part_forward(self.index, x)

    def extra_repr(self) -> str:
        f = self.fused
        a = f.part_offsets[self.index]
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"of={self.fused_attr}[{a}:{a + self.out_features}]")


# ---- when fusing is exact ------------------------------------------------------------------------

def _check_groups_align(spec, part_sizes, parts) -> None:
    if spec.axis == "ic" and spec.group_size == -1:
        raise ValueError(f"per-IC groups of a whole column (group_size=-1) span each part's N: "
                         f"fusing {list(parts)} would change them")
    if spec.axis == "ic":
        bad = [p for p, n in zip(parts, part_sizes) if n % spec.group_size]
        if bad:
            raise ValueError(f"per-IC groups of {spec.group_size} output channels: parts {bad} have an "
                             f"N that is not a multiple of it (the groups would straddle parts)")


def _spec_key(spec):
    d = spec.to_dict()
    d.pop("rotation_seed", None)  # a record only; the signs are compared
    return tuple(sorted(d.items()))


def fusion_problem(layers: Sequence[nn.Module], parts: Sequence[str]) -> Optional[str]:
    """Why ``layers`` (named ``parts``) cannot be fused exactly, or None when they can."""
    if len(layers) < 2:
        return "fewer than two layers"
    for p, m in zip(parts, layers):
        if type(m) is not QuantLinear:
            return f"{p} is a {type(m).__name__}, not a QuantLinear"
        if m.outlier_idx is not None or m.lorc_a is not None:
            return f"{p} has 16-bit side paths (outliers/LoRC): not fused"
    first = layers[0]
    for p, m in zip(parts[1:], layers[1:]):
        if m.in_features != first.in_features:
            return f"{p} has in_features {m.in_features}, {parts[0]} {first.in_features}"
        if _spec_key(m.spec) != _spec_key(first.spec):
            return f"{p} has spec {m.spec.to_dict()}, {parts[0]} {first.spec.to_dict()}"
        if (m.bias is None) != (first.bias is None):
            return "some parts have a bias and others not"
        if m.bias is not None and m.bias.dtype != first.bias.dtype:
            return f"bias dtypes differ ({m.bias.dtype}, {first.bias.dtype})"
        if m.qweight.device != first.qweight.device:
            return "the parts are on different devices"
        if (m.in_perm is None) != (first.in_perm is None) or (
                m.in_perm is not None and not torch.equal(m.in_perm, first.in_perm)):
            return f"{p} and {parts[0]} have different input permutations (in_perm)"
        if first.spec.rotated and not torch.equal(m.rot_signs, first.rot_signs):
            return f"{p} and {parts[0]} have different rotation signs"
        if bool(getattr(m, "_lp_conv1d", False)) != bool(getattr(first, "_lp_conv1d", False)):
            return "some parts replace Conv1D modules and others nn.Linear"
    try:
        _check_groups_align(first.spec, [m.out_features for m in layers], parts)
    except ValueError as e:
        return str(e)
    return None


def fuse_layers(parent: nn.Module, parts: Sequence[str]) -> FusedQuantLinear:
    """Fuses the ``QuantLinear`` children ``parts`` of ``parent``: the fused layer goes to
    ``parent.<fused_name(parts)>``, each part becomes a :class:`FusedSlice`. ValueError when it
    would not be exact (:func:`fusion_problem`) or the attribute is taken."""
    attr = fused_name(parts)
    if hasattr(parent, attr):
        raise ValueError(f"cannot fuse {list(parts)}: the module already has an attribute {attr!r}")
    layers = [getattr(parent, p) for p in parts]
    fused = FusedQuantLinear.from_parts(layers, parts)
    install_fused(parent, attr, fused)
    return fused


def install_fused(parent: nn.Module, attr: str, fused: FusedQuantLinear) -> None:
    """Puts ``fused`` at ``parent.<attr>`` and a :class:`FusedSlice` at each of its parts."""
    setattr(parent, attr, fused)
    for i, p in enumerate(fused.parts):
        setattr(parent, p, FusedSlice(fused, i, attr))


def fused_modules(model: nn.Module) -> List[Tuple[str, nn.Module, str, FusedQuantLinear]]:
    """``[(parent name, parent, attribute, fused layer)]`` of every fused layer in ``model``."""
    out = []
    for pname, parent in model.named_modules():
        for attr, child in parent.named_children():
            if isinstance(child, FusedQuantLinear):
                out.append((pname, parent, attr, child))
    return out


def split_fused(fused: FusedQuantLinear) -> Dict[str, QuantLinear]:
    """``{part name: QuantLinear}`` of a fused layer (exact)."""
    return dict(zip(fused.parts, fused.split()))


def unfuse(model: nn.Module) -> int:
    """Puts every fused layer of ``model`` back as its separate ``QuantLinear`` parts (exact);
    returns how many fused layers were split."""
    found = fused_modules(model)
    for _, parent, attr, fused in found:
        for p, m in split_fused(fused).items():
            setattr(parent, p, m)
        delattr(parent, attr)
    return len(found)


@contextlib.contextmanager
def unfused(model: nn.Module):
    """Within the block, ``model`` holds the separate parts of its fused layers (e.g. for an
    export whose format has q/k/v as separate tensors); afterwards the fused layers and their
    slices are put back (the split copies are dropped)."""
    found = fused_modules(model)
    saved = [(parent, attr, fused, {p: getattr(parent, p) for p in fused.parts})
             for _, parent, attr, fused in found]
    try:
        for parent, attr, fused, _ in saved:
            for p, m in split_fused(fused).items():
                setattr(parent, p, m)
            delattr(parent, attr)
        yield model
    finally:
        for parent, attr, fused, slices in saved:
            setattr(parent, attr, fused)
            for p, s in slices.items():
                setattr(parent, p, s)
