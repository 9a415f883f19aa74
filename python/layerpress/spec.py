"""QuantSpec: what a quantised linear weight is, validated at construction."""
from __future__ import annotations

import dataclasses
import enum
from typing import Optional

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
ROTATIONS = ("none", "hadamard")


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
    rotation: ``"none"``, or ``"hadamard"``: the stored weight is ``W·R`` with the input rotation
        ``R = diag(signs) · blockdiag(H_rotation_block) / sqrt(rotation_block)`` (the signs are a
        ``[K]`` tensor stored beside the weight, ``rot_signs``), and the layer computes
        ``(x·R) · dequant(W·R)ᵀ``. ``rotation_block``: a power of two >= 16 dividing K (0 without a
        rotation); ``rotation_seed``: what the signs were drawn from (a record; the signs decide).
    """

    bits: int = 4
    group_size: int = 128
    axis: str = "oc"
    symmetric: bool = False
    scale_dtype: torch.dtype = torch.float16
    rotation: str = "none"
    rotation_block: int = 0
    rotation_seed: Optional[int] = None

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
        if self.rotation not in ROTATIONS:
            raise ValueError(f"QuantSpec.rotation must be one of {ROTATIONS}, got {self.rotation!r}")
        b = self.rotation_block
        if self.rotation == "none" and (b != 0 or self.rotation_seed is not None):
            raise ValueError("QuantSpec.rotation_block/rotation_seed need rotation='hadamard'")
        if self.rotation == "hadamard" and (isinstance(b, bool) or not isinstance(b, int) or b < 16 or b & (b - 1)):
            raise ValueError(f"QuantSpec.rotation_block must be a power of two >= 16, got {b!r}")
        if self.rotation_seed is not None and (isinstance(self.rotation_seed, bool)
                                               or not isinstance(self.rotation_seed, int)):
            raise ValueError(f"QuantSpec.rotation_seed must be an int or None, got {self.rotation_seed!r}")

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
        if self.rotation != "none" and (in_features % self.rotation_block or self.rotation_block > in_features):
            raise ValueError(f"in_features K={in_features} is not a multiple of rotation_block="
                             f"{self.rotation_block}")

    def scale_shape(self, out_features: int, in_features: int) -> tuple[int, int]:
        g = self.group_for(out_features, in_features)
        if self.axis == "oc":
            return (out_features, in_features // g)
        return (in_features, out_features // g)

    @property
    def rotated(self) -> bool:
        return self.rotation != "none"

    def to_dict(self) -> dict:
        d = {"bits": self.bits, "group_size": self.group_size, "axis": self.axis,
             "symmetric": self.symmetric, "scale_dtype": str(self.scale_dtype).replace("torch.", "")}
        if self.rotated:  # unrotated specs keep the format-1 keys only
            d.update(rotation=self.rotation, rotation_block=self.rotation_block, rotation_seed=self.rotation_seed)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "QuantSpec":
        known = {"bits", "group_size", "axis", "symmetric", "scale_dtype", "rotation", "rotation_block",
                 "rotation_seed"}
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
