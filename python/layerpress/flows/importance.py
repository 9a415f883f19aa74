"""Layer importance scores for bit allocation (Dumitru et al., "Layer-wise quantization").

* LIM (layer input modification): ``LIM_i = −cos(input_i, output_i)`` of block ``i`` on
  calibration data -- the cosine between each token's hidden state entering and leaving the
  block, averaged over all calibration tokens. Higher = the block changes its input more =
  more important.
* ZD (z-score distribution): the fraction of the block's linear weights (all of them pooled)
  with ``|w − μ|/σ > 1``, μ and σ over that pool. Lower = more important. No data needed.
* Hessian trace (HAWQ-V2, Dong et al. 2020): the average Hessian trace ``Tr(H_bb)/n_b`` of a
  loss with respect to block ``b``'s ``n_b`` linear weights (HAWQ normalises by the block's
  parameter count), estimated with Hutchinson's estimator ``Tr(H) = E[vᵀHv]`` over Rademacher
  vectors ``v``, each ``Hv`` by double backpropagation. One probe ``v`` spans all blocks' linear
  weights at once: since ``E[v_b v_cᵀ] = 0`` for ``b ≠ c``, ``v_bᵀ(Hv)_b`` is an unbiased
  estimate of ``Tr(H_bb)``, so every block (and every linear) is scored by the same products.
  Higher = more important. The loss: the causal-LM loss (mean next-token cross-entropy) on the
  calibration ids for models with an LM head; otherwise (encoders, base decoders) the *output
  distortion* ``L(W) = (1/2T) Σ_t ‖y_t(W) − y_t(W₀)‖²`` of the last hidden states ``y`` over the
  ``T`` calibration tokens, relative to the full-precision weights ``W₀``. Its Hessian at ``W₀``
  is the Gauss-Newton matrix ``JᵀJ/T`` (the residual is zero there), so ``½ δᵀHδ`` is the
  second-order estimate of the output distortion a weight perturbation ``δ`` (a quantisation
  error) causes -- the same role the loss Hessian plays in HAWQ. This score needs the whole
  model on one device (it backpropagates through all blocks).

:func:`importance_order` turns either into an order "least important first".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .calibration import capture_block_inputs, run_block
from .distributed import all_reduce_sum
from .models import ModelAdapter, adapter_for, weight_oi
from .progress import progress_bar

__all__ = ["lim_scores", "lim_from_hidden", "zd_scores", "zd_score", "hessian_traces",
           "hessian_scores", "HessianTraces", "rademacher_probe", "importance_order", "IMPORTANCE_KINDS"]

#: importance kinds and whether a higher score means more important
IMPORTANCE_KINDS = {"lim": True, "zd": False, "hessian": True}


def lim_from_hidden(inputs: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor]) -> float:
    """−(mean over tokens of cos(input token, output token)) over matching lists of batches."""
    total, count = 0.0, 0
    for x, y in zip(inputs, outputs):
        c = torch.nn.functional.cosine_similarity(x.double().reshape(-1, x.shape[-1]),
                                                  y.double().reshape(-1, y.shape[-1]), dim=-1)
        total += c.sum().item()
        count += c.numel()
    total, count = all_reduce_sum(total, count)  # distributed: over all ranks' batches
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


@dataclass
class HessianTraces:
    """Hutchinson estimates. ``block[i] = block_trace[i] / params[i]`` (the HAWQ score);
    ``block_stderr[i]``: standard error of ``block_trace[i]`` (std over probes / √probes);
    ``linear``: full linear name -> ``Tr(H_ll) / n_l``."""
    block: List[float]
    block_trace: List[float]
    block_stderr: List[float]
    params: List[int]
    linear: Dict[str, float]
    n_probes: int
    loss: str                 # "causal_lm" or "output_distortion"


def _fp32_or_wider(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float64 else t.float()


def _loss_terms(model, ids, causal_lm: bool, reference):
    """Summed loss of one batch (divided by the total token count by the caller)."""
    out = model(input_ids=ids, use_cache=False) if causal_lm else model(input_ids=ids)
    if causal_lm:
        logits = out.logits
        return torch.nn.functional.cross_entropy(
            _fp32_or_wider(logits[:, :-1].reshape(-1, logits.shape[-1])), ids[:, 1:].reshape(-1),
            reduction="sum")
    y = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return 0.5 * (_fp32_or_wider(y) - reference).pow(2).sum()


def rademacher_probe(weights: Sequence[torch.Tensor], seed: int, k: int) -> List[torch.Tensor]:
    """Probe ``k`` of run ``seed``: one ±1 tensor per weight (CPU generator seeded with
    ``seed·1000003 + k``, drawn in order, then moved to each weight's device and dtype)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + k)
    return [(torch.randint(0, 2, w.shape, generator=gen) * 2 - 1).to(w) for w in weights]


def hessian_traces(model: nn.Module, input_ids: torch.Tensor, adapter: Optional[ModelAdapter] = None,
                   n_probes: int = 16, batch_size: int = 8, device=None, seed: int = 0,
                   progress: Optional[bool] = None) -> HessianTraces:
    """HAWQ average Hessian traces of every block's linear weights (see the module docstring)
    from ``n_probes`` Rademacher probes on the calibration ids ``[n, seq_len]``. The model is
    run whole on ``device`` (moved there and back) in its own dtype; its weights are unchanged."""
    if n_probes < 1:
        raise ValueError(f"n_probes must be >= 1, got {n_probes}")
    if input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must be [n, seq_len >= 2], got {list(input_ids.shape)}")
    adapter = adapter or adapter_for(model)
    blocks = adapter.blocks()
    named = [(f"{adapter.block_name(bi)}.{n}", bi, m.weight)
             for bi, b in enumerate(blocks) for n, m in adapter.linears(b).items()]
    weights = [w for _, _, w in named]
    home = next(model.parameters()).device
    dev = torch.device(device) if device is not None else home
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    causal_lm = adapter.kind == "causal" and model.get_output_embeddings() is not None
    batches = [b.to(dev) for b in input_ids.split(batch_size)]
    # the mean over all predicted (causal) or output (distortion) tokens
    tokens = float(input_ids.shape[0] * (input_ids.shape[1] - 1 if causal_lm else input_ids.shape[1]))
    per_tensor = torch.zeros(n_probes, len(weights), dtype=torch.float64)
    try:
        model.to(dev).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
        refs = [None] * len(batches)
        if not causal_lm:
            with torch.no_grad():
                refs = [_loss_ref(model, b) for b in batches]
        # the fused attention kernels have no double backward: the math path has
        # One forward and first backward (with its graph) per batch serves every probe; probe k
        # is regenerated identically for each batch from its own seed, so the per-probe sums
        # over batches are vᵀHv of the whole loss.
        with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH), \
                progress_bar(len(batches) * n_probes, "Hessian trace", progress, "probe") as bar:
            for ids, ref in zip(batches, refs):
                loss = _loss_terms(model, ids, causal_lm, ref) / tokens
                grads = torch.autograd.grad(loss, weights, create_graph=True)
                for k in range(n_probes):
                    vs = rademacher_probe(weights, seed, k)
                    gv = sum((g * v).sum() for g, v in zip(grads, vs))
                    hvs = torch.autograd.grad(gv, weights, retain_graph=k + 1 < n_probes)
                    per_tensor[k] += torch.stack([(h.double() * v.double()).sum()
                                                  for h, v in zip(hvs, vs)]).cpu()
                    bar.update()
                del loss, grads
    finally:
        for p, f in flags.items():
            p.requires_grad_(f)
        model.to(home)
        model.train(was_training)
    nb = len(blocks)
    owner = torch.tensor([bi for _, bi, _ in named])
    per_block = torch.zeros(n_probes, nb, dtype=torch.float64).index_add_(1, owner, per_tensor)
    params = [sum(w.numel() for _, bi, w in named if bi == b) for b in range(nb)]
    trace = per_block.mean(0)
    stderr = per_block.std(0) / n_probes ** 0.5 if n_probes > 1 else torch.full((nb,), float("nan"))
    lin = per_tensor.mean(0)
    return HessianTraces(block=[trace[b].item() / params[b] for b in range(nb)],
                         block_trace=trace.tolist(), block_stderr=stderr.tolist(), params=params,
                         linear={name: lin[i].item() / w.numel() for i, (name, _, w) in enumerate(named)},
                         n_probes=n_probes, loss="causal_lm" if causal_lm else "output_distortion")


def _loss_ref(model, ids):
    out = model(input_ids=ids)
    y = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return _fp32_or_wider(y.detach())


def hessian_scores(model: nn.Module, input_ids: torch.Tensor, adapter: Optional[ModelAdapter] = None,
                   n_probes: int = 16, batch_size: int = 8, device=None, seed: int = 0,
                   progress: Optional[bool] = None) -> List[float]:
    """Per block ``Tr(H_bb)/n_b`` (:func:`hessian_traces`)."""
    return hessian_traces(model, input_ids, adapter, n_probes, batch_size, device, seed,
                          progress).block


def importance_order(scores: Sequence[float], kind: str) -> List[int]:
    """Block indices, least important first (ties: earlier block first). ``kind``: ``"lim"`` or
    ``"hessian"`` (higher = more important) or ``"zd"`` (lower = more important)."""
    if kind not in IMPORTANCE_KINDS:
        raise ValueError(f"importance must be one of {tuple(IMPORTANCE_KINDS)}, got {kind!r}")
    if IMPORTANCE_KINDS[kind]:
        key = lambda i: (scores[i], i)  # noqa: E731
    else:
        key = lambda i: (-scores[i], i)  # noqa: E731
    return sorted(range(len(scores)), key=key)
