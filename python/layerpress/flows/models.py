"""Model adapters for the compression flows: where a Hugging Face model keeps its transformer
blocks, the linears of each block, which norm or linear feeds which linears (AWQ scaling groups)
and where AdaDim measures each linear's output error.

One adapter per family (Llama/Mistral/Qwen2-style, OPT, GPT-2, BERT); :func:`adapter_for` picks
it from ``model.config.model_type`` and raises ``NotImplementedError`` naming the supported
families otherwise. Linear names are relative to their block (e.g. ``"self_attn.q_proj"``).

Measurement points (AdaDim): the name of a module *inside the block* whose output is compared
(``""`` = the block itself). The linear must lie inside it. For families without an MLP module
(OPT, BERT) the MLP's up-projection is measured at the block output: in a pre-LN block the
residual is identical in both runs, so the error there equals the MLP-output error; in BERT's
post-LN block it is the MLP output after the residual LayerNorm.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

from torch import nn

from ..nn.linears import is_conv1d, weight_oi  # noqa: F401  (re-exported: the flows' name for them)

__all__ = ["ModelAdapter", "ScalingGroup", "adapter_for", "get_submodule", "is_conv1d",
           "weight_oi", "SUPPORTED_MODEL_TYPES"]


def get_submodule(root: nn.Module, name: str) -> nn.Module:
    return root if name == "" else root.get_submodule(name)


@dataclass(frozen=True)
class ScalingGroup:
    """AWQ scaling group: ``prev`` (name within the block) feeds ``linears``; ``inspect`` is the
    module whose output the AWQ search compares. ``fold`` says where ``s⁻¹`` goes:
    ``"norm"`` (into the norm's weight/bias), ``"linear"`` (into the output rows of the previous
    linear: only valid when what lies between is linear in it, e.g. Llama's ``act(gate)·up``) or
    ``"activation"`` (``prev`` is an activation that is not positively homogeneous, e.g. GELU:
    ``s⁻¹`` must be applied after it, as llm-awq's ``ScaledActivation`` does)."""
    prev: str
    linears: tuple
    inspect: str
    fold: str = "norm"


class ModelAdapter:
    """Base class. Subclasses fill in the family-specific names."""
    family: str = ""
    kind: str = "causal"  # "causal" (decoder LM) or "encoder"
    #: linear name (relative to a block) -> measurement module name (relative to the block)
    measure_points: Dict[str, str] = {}
    #: where the blocks are in the base model (e.g. ``LlamaModel``: ``"layers"``), and the
    #: attribute under which a model with a head (``LlamaForCausalLM``) holds its base model
    blocks_in_base: str = ""
    base_attr: str = ""
    #: projections that read the same input, fused into one product after quantisation
    #: (nn/fused.py): ``(parent module within the block, (its linear children, in order))``
    fusion_groups: tuple = ()

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = getattr(model, "config", None)

    # -- structure ---------------------------------------------------------------------------------
    def blocks_path(self) -> str:
        """Dotted path of the ModuleList of blocks, relative to the model (a base model or one
        with a head)."""
        if hasattr(self.model, self.base_attr):
            return f"{self.base_attr}.{self.blocks_in_base}"
        return self.blocks_in_base

    def blocks(self) -> nn.ModuleList:
        return self.model.get_submodule(self.blocks_path())

    def block_name(self, i: int) -> str:
        return f"{self.blocks_path()}.{i}"

    def linear_names(self) -> List[str]:
        return list(self.measure_points)

    def linears(self, block: nn.Module) -> Dict[str, nn.Module]:
        """Ordered ``{name: module}`` of the block's linears (``nn.Linear`` or ``Conv1D``)."""
        out = {}
        for name in self.linear_names():
            m = block.get_submodule(name)
            if not (isinstance(m, nn.Linear) or is_conv1d(m)):
                raise TypeError(f"{self.family}: {name} is a {type(m).__name__}, expected a linear "
                                "(was the model already quantised?)")
            out[name] = m
        return out

    def measure_point(self, linear_name: str) -> str:
        return self.measure_points[linear_name]

    def scaling_groups(self, block: nn.Module) -> List[ScalingGroup]:
        raise NotImplementedError


class LlamaAdapter(ModelAdapter):
    """Llama, Mistral, Qwen2, Qwen3 (pre-RMSNorm decoders)."""
    family = "llama"
    kind = "causal"
    measure_points = {
        "self_attn.q_proj": "self_attn", "self_attn.k_proj": "self_attn",
        "self_attn.v_proj": "self_attn", "self_attn.o_proj": "self_attn.o_proj",
        "mlp.gate_proj": "mlp", "mlp.up_proj": "mlp", "mlp.down_proj": "mlp.down_proj",
    }

    blocks_in_base, base_attr = "layers", "model"
    fusion_groups = (("self_attn", ("q_proj", "k_proj", "v_proj")), ("mlp", ("gate_proj", "up_proj")))

    def scaling_groups(self, block):
        a = block.self_attn
        groups = [ScalingGroup("input_layernorm",
                               ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn")]
        if a.v_proj.weight.shape == a.o_proj.weight.shape:  # no GQA: v's output feeds o directly
            groups.append(ScalingGroup("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj",
                                       "linear"))
        groups.append(ScalingGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"))
        groups.append(ScalingGroup("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj", "linear"))
        return groups


class OPTAdapter(ModelAdapter):
    family = "opt"
    kind = "causal"
    measure_points = {
        "self_attn.q_proj": "self_attn", "self_attn.k_proj": "self_attn",
        "self_attn.v_proj": "self_attn", "self_attn.out_proj": "self_attn.out_proj",
        "fc1": "", "fc2": "fc2",
    }

    blocks_in_base, base_attr = "decoder.layers", "model"
    fusion_groups = (("self_attn", ("q_proj", "k_proj", "v_proj")),)

    def scaling_groups(self, block):
        return [ScalingGroup("self_attn_layer_norm",
                             ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
                ScalingGroup("self_attn.v_proj", ("self_attn.out_proj",), "self_attn.out_proj",
                             "linear"),
                ScalingGroup("final_layer_norm", ("fc1",), ""),
                ScalingGroup("activation_fn", ("fc2",), "fc2", "activation")]


class GPT2Adapter(ModelAdapter):
    """GPT-2: ``Conv1D`` linears (weight ``[in, out]``), fused q/k/v in ``attn.c_attn``."""
    family = "gpt2"
    kind = "causal"
    measure_points = {"attn.c_attn": "attn", "attn.c_proj": "attn.c_proj",
                      "mlp.c_fc": "mlp", "mlp.c_proj": "mlp.c_proj"}

    blocks_in_base, base_attr = "h", "transformer"

    def scaling_groups(self, block):
        return [ScalingGroup("ln_1", ("attn.c_attn",), "attn"),
                ScalingGroup("ln_2", ("mlp.c_fc",), "mlp"),
                ScalingGroup("mlp.act", ("mlp.c_proj",), "mlp.c_proj", "activation")]


class BertAdapter(ModelAdapter):
    """BERT-style post-LN encoders (``BertModel`` and heads built on it, e.g. all-MiniLM-L6-v2)."""
    family = "bert"
    kind = "encoder"
    measure_points = {
        "attention.self.query": "attention", "attention.self.key": "attention",
        "attention.self.value": "attention", "attention.output.dense": "attention.output.dense",
        "intermediate.dense": "", "output.dense": "output.dense",
    }

    blocks_in_base, base_attr = "encoder.layer", "bert"
    fusion_groups = (("attention.self", ("query", "key", "value")),)

    def scaling_groups(self, block):
        # Post-LN: the q/k/v input is the previous block's output LayerNorm (outside this block),
        # so only the linear -> linear groups lie inside it.
        return [ScalingGroup("attention.self.value", ("attention.output.dense",),
                             "attention.output.dense", "linear"),
                ScalingGroup("intermediate.intermediate_act_fn", ("output.dense",), "output.dense",
                             "activation")]


_ADAPTERS = {"llama": LlamaAdapter, "mistral": LlamaAdapter, "qwen2": LlamaAdapter,
             "qwen3": LlamaAdapter, "opt": OPTAdapter, "gpt2": GPT2Adapter, "bert": BertAdapter}
SUPPORTED_MODEL_TYPES = tuple(sorted(_ADAPTERS))


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The adapter for a Hugging Face model, chosen by ``config.model_type``."""
    cfg = getattr(model, "config", None)
    mt = getattr(cfg, "model_type", None)
    if mt not in _ADAPTERS:
        what = f"model_type {mt!r}" if cfg is not None else f"a {type(model).__name__} without a config"
        raise NotImplementedError(f"layerpress has no compression-flow adapter for {what}; supported "
                                  f"model types: {', '.join(SUPPORTED_MODEL_TYPES)}")
    adapter = _ADAPTERS[mt](model)
    try:
        adapter.blocks()
    except AttributeError as e:
        raise NotImplementedError(f"{type(model).__name__} ({mt}): blocks not found at "
                                  f"{adapter.blocks_path()!r}") from e
    return adapter
