"""Layer importance scores for bit allocation (Dumitru et al., "Layer-wise quantization").

* LIM (layer input modification): ``LIM_i = −cos(input_i, output_i)`` of block ``i`` on
  calibration data -- the cosine between each token's hidden state entering and leaving the
  block, averaged over all calibration tokens. Higher = the block changes its input more =
  more important.
* ZD (z-score distribution): the fraction of the block's linear weights (all of them pooled)
  with ``|w − μ|/σ > 1``, μ and σ over that pool. Lower = more important. No data needed.

:func:`importance_order` turns either into an order "least important first".
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import nn

from .calibration import capture_block_inputs, run_block
from .models import ModelAdapter, adapter_for, weight_oi

__all__ = ["lim_scores", "lim_from_hidden", "zd_scores", "zd_score", "importance_order"]


def lim_from_hidden(inputs: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor]) -> float:
    """−(mean over tokens of cos(input token, output token)) over matching lists of batches."""
    total, count = 0.0, 0
    for x, y in zip(inputs, outputs):
        c = torch.nn.functional.cosine_similarity(x.double().reshape(-1, x.shape[-1]),
                                                  y.double().reshape(-1, y.shape[-1]), dim=-1)
        total += c.sum().item()
        count += c.numel()
    return -total / count


@torch.no_grad()
def lim_scores(model: nn.Module, input_ids: torch.Tensor, adapter: Optional[ModelAdapter] = None,
               batch_size: int = 8, device=None) -> List[float]:
    """LIM of every block, computed block by block (one block on ``device`` at a time)."""
    adapter = adapter or adapter_for(model)
    inputs = capture_block_inputs(model, input_ids, adapter, batch_size, device)
    scores = []
    for block in adapter.blocks():
        home = next(block.parameters()).device
        dev = torch.device(device) if device is not None else home
        block.to(dev)
        outs = run_block(block, inputs, dev)
        block.to(home)
        scores.append(lim_from_hidden(inputs.hidden, outs))
        inputs.hidden = outs
    return scores


def zd_score(weights: Sequence[torch.Tensor]) -> float:
    """Fraction of the pooled weights with ``|w − μ|/σ > 1``."""
    w = torch.cat([t.detach().reshape(-1).double() for t in weights])
    mu, sigma = w.mean(), w.std()
    return ((w - mu).abs() / sigma > 1).double().mean().item()


def zd_scores(model: nn.Module, adapter: Optional[ModelAdapter] = None) -> List[float]:
    adapter = adapter or adapter_for(model)
    return [zd_score([weight_oi(m) for m in adapter.linears(b).values()]) for b in adapter.blocks()]


def importance_order(scores: Sequence[float], kind: str) -> List[int]:
    """Block indices, least important first (ties: earlier block first). ``kind``: ``"lim"``
    (higher = more important) or ``"zd"`` (lower = more important)."""
    if kind == "lim":
        key = lambda i: (scores[i], i)  # noqa: E731
    elif kind == "zd":
        key = lambda i: (-scores[i], i)  # noqa: E731
    else:
        raise ValueError(f"importance must be 'lim' or 'zd', got {kind!r}")
    return sorted(range(len(scores)), key=key)
