"""What the modules and flows treat as a linear layer: ``nn.Linear`` and the Hugging Face
``Conv1D`` (GPT-2), whose weight is stored transposed."""
from __future__ import annotations

from torch import nn

__all__ = ["is_conv1d", "weight_oi"]


def is_conv1d(m: nn.Module) -> bool:
    """A Hugging Face ``Conv1D`` (GPT-2): a linear whose weight is stored ``[in, out]``."""
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf")


def weight_oi(m: nn.Module):
    """The weight of an ``nn.Linear`` or ``Conv1D`` as an ``[out, in]`` tensor (a view)."""
    if isinstance(m, nn.Linear):
        return m.weight.data
    if is_conv1d(m):
        return m.weight.data.t()
    raise TypeError(f"expected nn.Linear or Conv1D, got {type(m).__name__}")
