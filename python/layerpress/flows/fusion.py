"""Fusing a quantised model's projections that read the same input (``quantize_model``'s
``fuse_projections``; nn/fused.py for the module and when fusing is exact).

Per block, per fusion group of the adapter (Llama/Mistral/Qwen: ``self_attn`` q/k/v and
``mlp`` gate/up; OPT: q/k/v; BERT: query/key/value; GPT-2's ``c_attn`` is fused already), the
layers are partitioned into classes that can be fused exactly (same spec, rotation signs, input
permutation, bias presence; no side paths): a class of two or more becomes one
``FusedQuantLinear`` (mixed precision: e.g. q and k fused, v kept apart), the rest stay as
they are. Every decision is returned (and put in the report) with its reason.
"""
from __future__ import annotations

from typing import List, Optional

from torch import nn

from ..nn.fused import fuse_layers, fusion_problem
from .models import ModelAdapter, adapter_for, get_submodule

__all__ = ["fuse_projections"]


def _classes(parent: nn.Module, names) -> tuple:
    """(fusable classes of ``names`` in order, {name: why it stays alone})."""
    classes: List[List[str]] = []
    alone = {}
    for n in names:
        m = getattr(parent, n, None)
        why = fusion_problem([m, m], [n, n]) if isinstance(m, nn.Module) else f"{n} is missing"
        if why:
            alone[n] = why
            continue
        for c in classes:
            if fusion_problem([getattr(parent, c[0]), m], [c[0], n]) is None:
                c.append(n)
                break
        else:
            classes.append([n])
    return classes, alone


def fuse_projections(model: nn.Module, adapter: Optional[ModelAdapter] = None) -> List[dict]:
    """Fuses the quantised projections of every block of ``model`` that read the same input
    (module docstring). Returns one record per fusion group: ``{"parent", "fused": [{"name",
    "parts"}], "separate": {part: reason}}``."""
    adapter = adapter or adapter_for(model)
    records = []
    for bi, block in enumerate(adapter.blocks()):
        for parent_name, names in adapter.fusion_groups:
            full = f"{adapter.block_name(bi)}.{parent_name}"
            try:
                parent = get_submodule(block, parent_name)
            except AttributeError:
                records.append({"parent": full, "fused": [], "separate": {n: "no such module"
                                                                          for n in names}})
                continue
            classes, alone = _classes(parent, names)
            rec = {"parent": full, "fused": [], "separate": dict(alone)}
            fusable = [c for c in classes if len(c) > 1]
            for c in classes:  # why a layer stays alone, said before anything is fused
                if len(c) == 1:
                    other = next((n for n in names if n != c[0] and n not in alone), None)
                    rec["separate"][c[0]] = (
                        fusion_problem([getattr(parent, c[0]), getattr(parent, other)], [c[0], other])
                        if other else "no other layer of the group to fuse with")
            for c in fusable:
                try:
                    fused = fuse_layers(parent, c)
                except ValueError as e:
                    rec["separate"].update({n: str(e) for n in c})
                    continue
                attr = next(a for a, ch in parent.named_children() if ch is fused)
                rec["fused"].append({"name": f"{full}.{attr}", "parts": [f"{full}.{n}" for n in c]})
            records.append(rec)
    return records
