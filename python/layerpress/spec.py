"""QuantSpec: what a quantised linear weight is, validated at construction."""
from __future__ import annotations

import dataclasses
import enum

import torch


class Layout(enum.IntEnum):
    """Where the packed codes live (passed to ops as a plain int). See docs/format.md."""

    CANONICAL = 0  # file layout: [N, K*bits/32] int32, LSB-first bit stream per row
    CPU_BITPLANE16 = 1  # CPU kernels: 16-row tiles x 32-column blocks, one word per bit plane
    CUDA_MMA = 2  # CUDA tensor-core GEMM: 16(k) x 64(n) tiles of mma.sync B fragments


AXES = {"oc": 0, "ic": 1}
BITS = (2, 3, 4, 8)
GROUP_SIZES = (32, 64, 128, 256, -1)
SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How one linear weight ``W [out_features N, in_features K]`` is quantised.

    bits: code width, one of 2, 3, 4, 8.
    group_size: 32, 64, 128, 256, or -1 for a whole row (per-OC) / whole column (per-IC).
    axis: ``"oc"`` -- groups of ``group_size`` consecutive input channels inside one output row,
        scales ``[N, K/g]``; ``"ic"`` -- groups of ``group_size`` consecutive output channels
        inside one input column, scales ``[K, N/g]`` (AdaDim's per-input-channel groups).
    symmetric: codes centred on the implicit zero point ``2^(bits-1)``; no zeros tensor.
    scale_dtype: float32, bfloat16 or float16.
    """

    bits: int = 4
    group_size: int = 128
    axis: str = "oc"
    symmetric: bool = False
    scale_dtype: torch.dtype = torch.float16

    def __post_init__(self):
        if isinstance(self.bits, bool) or self.bits not in BITS:
            raise ValueError(f"QuantSpec.bits must be one of {BITS}, got {self.bits!r}")
        if isinstance(self.group_size, bool) or self.group_size not in GROUP_SIZES:
            raise ValueError(
                f"QuantSpec.group_size must be one of 32, 64, 128, 256 or -1 (whole row/column), "
                f"got {self.group_size!r}")
        if self.axis not in AXES:
            raise ValueError(f"QuantSpec.axis must be 'oc' or 'ic', got {self.axis!r}")
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"QuantSpec.symmetric must be a bool, got {self.symmetric!r}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(
                f"QuantSpec.scale_dtype must be float32, bfloat16 or float16, got {self.scale_dtype!r}")

    @property
    def axis_id(self) -> int:
        return AXES[self.axis]

    def group_for(self, out_features: int, in_features: int) -> int:
        """The effective group size for a weight of this shape (resolves -1)."""
        if self.group_size != -1:
            return self.group_size
        return in_features if self.axis == "oc" else out_features

    def check_shape(self, out_features: int, in_features: int) -> None:
        """Raises ValueError if a [out_features, in_features] weight cannot use this spec."""
        if in_features < 32 or in_features % 32:
            raise ValueError(f"in_features (K) must be a positive multiple of 32, got {in_features}")
        if out_features < 1:
            raise ValueError(f"out_features (N) must be >= 1, got {out_features}")
        g = self.group_for(out_features, in_features)
        if self.axis == "oc" and in_features % g:
            raise ValueError(f"in_features K={in_features} is not divisible by group_size={g} "
                             f"(per-OC groups run along K)")
        if self.axis == "ic" and out_features % g:
            raise ValueError(f"out_features N={out_features} is not divisible by group_size={g} "
                             f"(per-IC groups run along N)")

    def scale_shape(self, out_features: int, in_features: int) -> tuple[int, int]:
        g = self.group_for(out_features, in_features)
        if self.axis == "oc":
            return (out_features, in_features // g)
        return (in_features, out_features // g)

    def to_dict(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "axis": self.axis,
                "symmetric": self.symmetric, "scale_dtype": str(self.scale_dtype).replace("torch.", "")}

    @classmethod
    def from_dict(cls, d: dict) -> "QuantSpec":
        known = {"bits", "group_size", "axis", "symmetric", "scale_dtype"}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"QuantSpec: unknown keys {sorted(unknown)}")
        d = dict(d)
        if "scale_dtype" in d:
            name = d["scale_dtype"]
            dt = getattr(torch, str(name), None)
            if not isinstance(dt, torch.dtype):
                raise ValueError(f"QuantSpec.scale_dtype: unknown dtype {name!r}")
            d["scale_dtype"] = dt
        return cls(**d)
