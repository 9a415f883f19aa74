"""Evaluation of compressed models: embedding fidelity for encoders, perplexity for causal LMs.

* :func:`sentence_embeddings`: mean-pooled (attention-mask weighted) last hidden states, the
  sentence-transformers pooling of all-MiniLM-L6-v2.
* :func:`embedding_fidelity`: per-sentence cosine between the embeddings of the reference
  (full-precision) and compressed models, and nearest-neighbour agreement -- the fraction of
  sentences whose most similar other sentence (cosine) is the same under both models.
* :func:`perplexity`: ``exp`` of the mean next-token negative log-likelihood over windows of
  the token stream of the texts (default: the built-in held-out sentences).
* :func:`importance_vs_random_orders`: a fractional-bit model (e.g. 3.5 bits, blocks at 4 and 3)
  allocated by an importance score against the same budget allocated by random block orders.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from .calibration import default_texts

__all__ = ["sentence_embeddings", "embedding_fidelity", "perplexity", "quality_of",
           "importance_vs_random_orders"]


@torch.no_grad()
def sentence_embeddings(model: nn.Module, tokenizer, texts: Optional[Sequence[str]] = None,
                        batch_size: int = 32, max_length: int = 128) -> torch.Tensor:
    """``[len(texts), hidden]`` mean-pooled embeddings (default texts: the held-out set)."""
    texts = list(default_texts("heldout") if texts is None else texts)
    dev = next(model.parameters()).device
    out = []
    model.eval()
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i:i + batch_size], padding=True, truncation=True,
                        max_length=max_length, return_tensors="pt").to(dev)
        h = model(**enc).last_hidden_state.float()
        mask = enc["attention_mask"][..., None].float()
        out.append(((h * mask).sum(1) / mask.sum(1).clamp_min(1e-9)).cpu())
    return torch.cat(out)


def embedding_fidelity(reference: torch.Tensor, embeddings: torch.Tensor) -> Dict[str, float]:
    """``mean_cos``, ``min_cos`` (per sentence, reference vs compressed) and ``nn_agreement``."""
    if reference.shape != embeddings.shape or reference.shape[0] < 2:
        raise ValueError(f"need two [n >= 2, d] embedding sets of one shape, got "
                         f"{list(reference.shape)} and {list(embeddings.shape)}")
    a, b = reference.double(), embeddings.double()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)

    def nearest(e):
        e = torch.nn.functional.normalize(e, dim=-1)
        sim = e @ e.t()
        sim.fill_diagonal_(-math.inf)
        return sim.argmax(-1)

    agree = (nearest(a) == nearest(b)).double().mean()
    return {"mean_cos": cos.mean().item(), "min_cos": cos.min().item(),
            "nn_agreement": agree.item(), "n": int(a.shape[0])}


@torch.no_grad()
def perplexity(model: nn.Module, tokenizer=None, texts: Optional[Sequence[str]] = None,
               input_ids: Optional[torch.Tensor] = None, seq_len: int = 128,
               batch_size: int = 8) -> float:
    """Perplexity of a causal LM on non-overlapping windows of ``seq_len`` tokens of the texts'
    concatenated token stream (or on the rows of ``input_ids [n, L]``)."""
    dev = next(model.parameters()).device
    if input_ids is None:
        if tokenizer is None:
            raise ValueError("perplexity needs a tokenizer or input_ids")
        texts = list(default_texts("heldout") if texts is None else texts)
        stream: List[int] = []
        for t in texts:
            stream += tokenizer(t, add_special_tokens=False)["input_ids"]
        n = len(stream) // seq_len
        if n == 0:
            raise ValueError(f"text too short for one window of {seq_len} tokens")
        input_ids = torch.tensor(stream[:n * seq_len]).reshape(n, seq_len)
    model.eval()
    nll, count = 0.0, 0
    for batch in input_ids.split(batch_size):
        batch = batch.to(dev)
        logits = model(input_ids=batch, use_cache=False).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        nll += loss.item()
        count += batch[:, 1:].numel()
    return math.exp(nll / count)


def quality_of(model: nn.Module, tokenizer, reference=None, texts=None) -> Dict[str, float]:
    """Encoders (``reference``: full-precision sentence embeddings): :func:`embedding_fidelity`
    on ``texts`` (default held-out set); causal LMs (``reference`` None): ``{"perplexity": ...}``."""
    if reference is not None:
        return embedding_fidelity(reference, sentence_embeddings(model, tokenizer, texts))
    return {"perplexity": perplexity(model, tokenizer, texts=texts)}


def importance_vs_random_orders(model: nn.Module, tokenizer, bits: float = 3.5, n_random: int = 5,
                                seed: int = 0, importance: str = "lim", texts=None,
                                on_result=None, **quantize_kwargs) -> Dict[str, object]:
    """Quantises copies of ``model`` at the fractional average ``bits`` with the blocks demoted in
    the order of ``importance`` and in ``n_random`` seeded random orders (distinct permutations
    where there are enough), all else equal (``quantize_kwargs`` go to ``quantize_model``).

    Returns ``{"importance": {...}, "random": [{...}, ...], "random_mean": {...}}``; each entry
    holds the quality (:func:`quality_of`: mean/min cosine and NN agreement for encoders,
    perplexity for causal LMs), the demoted blocks and the time. ``on_result(kind, entry)`` is
    called as each run finishes."""
    import copy
    import itertools

    from .models import adapter_for
    from .quantize_model import quantize_model

    if n_random < 1:
        raise ValueError(f"n_random must be >= 1, got {n_random}")
    adapter = adapter_for(model)
    encoder = adapter.kind == "encoder"
    reference = sentence_embeddings(model, tokenizer, texts) if encoder else None
    n_blocks = len(adapter.blocks())

    def run(kind, **kw):
        m = copy.deepcopy(model)
        rep = quantize_model(m, bits=bits, tokenizer=tokenizer, seed=seed, **quantize_kwargs, **kw)
        entry = dict(quality_of(m, tokenizer, reference, texts), demoted=rep.demoted,
                     average_bits=rep.average_bits, time_s=rep.time_s)
        if on_result is not None:
            on_result(kind, entry)
        return entry

    out = {"importance": run(importance, importance=importance)}
    gen = torch.Generator().manual_seed(seed)
    seen, orders = set(), []
    n_perm = math.factorial(n_blocks)
    for _ in itertools.count():
        order = tuple(torch.randperm(n_blocks, generator=gen).tolist())
        if order not in seen or len(seen) >= n_perm:
            seen.add(order)
            orders.append(order)
        if len(orders) == n_random:
            break
    out["random"] = [dict(run("random", block_order=o), order=list(o)) for o in orders]
    keys = [k for k, v in out["random"][0].items() if isinstance(v, float)]
    out["random_mean"] = {k: sum(r[k] for r in out["random"]) / len(orders) for k in keys}
    return out
