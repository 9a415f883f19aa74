"""WTA-CRS fine-tuning modules (issue 6): a drop-in ``nn.Linear`` whose weight gradient is the
unbiased winner-take-all column-row sampling estimate, a small LoRA module (also on a frozen
low-bit :class:`~layerpress.nn.QuantLinear` base, QLoRA-style), and :func:`apply_wtacrs` for
Hugging Face Llama/Qwen2/Mistral, OPT, GPT-2 and BERT models.

What a WTA-CRS layer keeps for backward: the ``k`` sampled rows of its input (``[k, in]`` in the
input's dtype), their row numbers (int64) and scales (float32), and the weight (a parameter, not an
activation). The forward output, the input gradient and the bias gradient are exact.
"""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Iterable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import wtacrs as wtacrs_ops
from ..ops.wtacrs import check_ratio
from .linears import is_conv1d, weight_oi
from .quant_linear import QuantLinear

__all__ = ["WTACRSLinear", "WTACRSConv1D", "LoRALinear", "apply_wtacrs", "apply_lora",
           "DEFAULT_TARGETS", "wtacrs_linear"]


class _WTACRSLinearFn(torch.autograd.Function):
    """``F.linear(x, weight, bias)`` with the WTA-CRS weight gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, k: int, seed: torch.Tensor):
        out = F.linear(x, weight, bias)
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if need_w:
            rows, idx, scales = wtacrs_ops.sample_t(x, k, seed)
        else:
            rows = idx = scales = None
        ctx.save_for_backward(weight if need_x else None, rows, idx, scales)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad):
        weight, rows, idx, scales = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad.matmul(weight)
        if ctx.needs_input_grad[1]:
            grad_w = wtacrs_ops.wgrad(grad, rows, idx, scales)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, grad_w, grad_b, None, None


@torch.compiler.disable
def _draw_seed(generator: Optional[torch.Generator]) -> torch.Tensor:
    # Eager on purpose (one graph break): the draw then consumes the generator exactly as in
    # eager mode, and the seed reaches the graph as a tensor (no recompilation per value).
    return wtacrs_ops.draw_seed_tensor(generator)


def _k_for(tokens, num: int, den: int, min_k: int):
    k = (tokens * num + den - 1) // den  # ceil(ratio * tokens) in integers (traceable)
    return torch.sym_min(torch.sym_max(k, min_k), tokens)


def wtacrs_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                  ratio: float = 0.3, min_k: int = 10,
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Functional form: ``F.linear(x, weight, bias)`` (exact) whose weight gradient is the WTA-CRS
    estimate from ``k = min(max(ceil(ratio · tokens), min_k), tokens)`` rows of ``x``. Under
    autocast the inputs are cast to the autocast dtype (like ``F.linear``)."""
    check_ratio(ratio)
    if x.dim() < 2:
        raise ValueError(f"input must have at least 2 dimensions [..., tokens, in_features] "
                         f"(WTA-CRS samples tokens), got a {x.dim()}-D tensor of shape {list(x.shape)}")
    if x.shape[-1] != weight.shape[-1]:
        raise ValueError(f"input has {x.shape[-1]} features in its last dimension but the weight "
                         f"expects in_features={weight.shape[-1]}")
    frac = Fraction(ratio).limit_denominator(1 << 20)
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        x, weight = x.to(dt), weight.to(dt)
        bias = None if bias is None else bias.to(dt)
    elif bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    tokens = x.numel() // x.shape[-1]
    if tokens == 0:  # an empty batch: nothing to sample (gradients are zero)
        return F.linear(x, weight, bias)
    k = _k_for(tokens, frac.numerator, frac.denominator, int(min_k))
    seed = _draw_seed(generator)
    with torch.autocast(dev, enabled=False):
        return _WTACRSLinearFn.apply(x, weight, bias, k, seed)


class WTACRSLinear(nn.Linear):
    """Drop-in ``nn.Linear`` trained with the WTA-CRS weight gradient.

    ``ratio`` (in (0, 1], default 0.3) and ``min_k`` (default 10) set the number of kept tokens
    ``k = min(max(ceil(ratio · tokens), min_k), tokens)``; ``k = tokens`` gives the exact
    gradient. Only the ``k`` sampled input rows (plus their indices and scales) are saved for
    backward. In eval mode, without grad mode or with a frozen weight, it is a plain ``F.linear``.
    Randomness: each forward draws a seed from ``generator`` (default: torch's global generator).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 dtype=None, *, ratio: float = 0.3, min_k: int = 10,
                 generator: Optional[torch.Generator] = None):
        check_ratio(ratio)
        if not isinstance(min_k, int) or isinstance(min_k, bool) or min_k < 1:
            raise ValueError(f"min_k must be an int >= 1, got {min_k!r}")
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.ratio = float(ratio)
        self.min_k = min_k
        self.generator = generator

    @classmethod
    def from_linear(cls, linear: nn.Linear, ratio: float = 0.3, min_k: int = 10,
                    generator: Optional[torch.Generator] = None) -> "WTACRSLinear":
        """Wraps an existing ``nn.Linear``, sharing its parameters (no copy)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        mod = cls.__new__(cls)
        nn.Module.__init__(mod)
        check_ratio(ratio)
        if not isinstance(min_k, int) or isinstance(min_k, bool) or min_k < 1:
            raise ValueError(f"min_k must be an int >= 1, got {min_k!r}")
        mod.in_features, mod.out_features = linear.in_features, linear.out_features
        mod.weight = linear.weight
        mod.bias = linear.bias
        mod.ratio, mod.min_k, mod.generator = float(ratio), min_k, generator
        return mod

    def _sampling(self) -> bool:
        return self.training and torch.is_grad_enabled() and self.weight.requires_grad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2:
            raise ValueError(f"WTACRSLinear input must have at least 2 dimensions [..., tokens, "
                             f"in_features], got a {x.dim()}-D tensor of shape {list(x.shape)}")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"WTACRSLinear input has {x.shape[-1]} features in its last dimension "
                             f"but in_features={self.in_features}")
        if not self._sampling():
            return F.linear(x, self.weight, self.bias)
        return wtacrs_linear(x, self.weight, self.bias, self.ratio, self.min_k, self.generator)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", ratio={self.ratio}, min_k={self.min_k}"


class WTACRSConv1D(nn.Module):
    """WTA-CRS version of Hugging Face's GPT-2 ``Conv1D`` (``y = x · W + b`` with ``W [in, out]``):
    keeps the parameters (and the state-dict layout) of the module it wraps."""

    def __init__(self, conv, ratio: float = 0.3, min_k: int = 10,
                 generator: Optional[torch.Generator] = None):
        super().__init__()
        check_ratio(ratio)
        self.nf = conv.nf
        self.nx = conv.weight.shape[0]
        self.weight = conv.weight
        self.bias = conv.bias
        self.ratio, self.min_k, self.generator = float(ratio), min_k, generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.t()
        if not (self.training and torch.is_grad_enabled() and self.weight.requires_grad):
            return F.linear(x, w, self.bias)
        return wtacrs_linear(x, w, self.bias, self.ratio, self.min_k, self.generator)

    def extra_repr(self) -> str:
        return f"nx={self.nx}, nf={self.nf}, ratio={self.ratio}, min_k={self.min_k}"


def _features(base: nn.Module):
    if hasattr(base, "in_features") and hasattr(base, "out_features"):
        return base.in_features, base.out_features
    if type(base).__name__ == "Conv1D":
        return base.weight.shape[0], base.weight.shape[1]
    raise TypeError(f"LoRALinear needs a base with in_features/out_features (nn.Linear, QuantLinear, "
                    f"Conv1D), got {type(base).__name__}")


class LoRALinear(nn.Module):
    """``y = base(x) + (alpha / r) · B(A(dropout(x)))`` with a frozen ``base`` (``nn.Linear``,
    :class:`~layerpress.nn.QuantLinear` or GPT-2 ``Conv1D``) and trainable adapters ``A [r, in]``
    (Kaiming-uniform) and ``B [out, r]`` (zeros). With ``ratio`` set (default 0.3) the
    down-projection ``A`` is a :class:`WTACRSLinear`, so only ``k`` rows of the layer input are
    kept for backward; ``ratio=None`` gives plain LoRA. A low-bit base (QLoRA-style) passes the
    input gradient through ``torch.ops.layerpress.gemm_t``."""

    def __init__(self, base: nn.Module, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                 ratio: Optional[float] = 0.3, min_k: int = 10,
                 generator: Optional[torch.Generator] = None):
        super().__init__()
        if not isinstance(r, int) or r < 1:
            raise ValueError(f"r must be an int >= 1, got {r!r}")
        in_f, out_f = _features(base)
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        ref = getattr(base, "weight", None)
        if ref is None or not torch.is_tensor(ref) or not ref.is_floating_point():
            ref = getattr(base, "qweight", None)
            dtype = torch.float32
        else:
            dtype = ref.dtype
        device = ref.device if ref is not None else None
        if ratio is None:
            self.lora_A = nn.Linear(in_f, r, bias=False, device=device, dtype=dtype)
        else:
            self.lora_A = WTACRSLinear(in_f, r, bias=False, device=device, dtype=dtype, ratio=ratio,
                                       min_k=min_k, generator=generator)
        self.lora_B = nn.Linear(r, out_f, bias=False, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.r, self.alpha = r, alpha
        self.scaling = alpha / r
        self.in_features, self.out_features = in_f, out_f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        return y + self.lora_B(self.lora_A(self.dropout(x))).to(y.dtype) * self.scaling


# ---- model surgery ---------------------------------------------------------------------------------

# The layers the paper samples: attention output and the FFN in/out projections (never q/k/v).
DEFAULT_TARGETS = {
    "llama": ("self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    "mistral": ("self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    "qwen2": ("self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    "opt": ("self_attn.out_proj", "fc1", "fc2"),
    "gpt2": ("attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
    "bert": ("attention.output.dense", "intermediate.dense", "output.dense"),
}


def _default_targets(model: nn.Module) -> Sequence[str]:
    mt = getattr(getattr(model, "config", None), "model_type", None)
    if mt in DEFAULT_TARGETS:
        return DEFAULT_TARGETS[mt]
    out: List[str] = []
    for t in DEFAULT_TARGETS.values():
        out.extend(x for x in t if x not in out)
    return out


def _matches(name: str, targets: Iterable[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _targets(model, targets):
    if targets is None:
        peft_config = getattr(model, "peft_config", None)
        if isinstance(peft_config, dict) and peft_config:  # a peft model: its LoRA down-projections
            return tuple(f"lora_A.{name}" for name in peft_config)
        return _default_targets(model)
    if isinstance(targets, str):
        return (targets,)
    return tuple(targets)


def apply_wtacrs(model: nn.Module, ratio: float = 0.3, targets: Optional[Sequence[str]] = None,
                 min_k: int = 10, generator: Optional[torch.Generator] = None) -> List[str]:
    """Swaps the target linears of ``model`` (in place) for WTA-CRS ones sharing their
    parameters; returns the names swapped. ``targets``: module-name suffixes (default: the
    attention output and FFN projections of Llama/Mistral/Qwen2, OPT, GPT-2 or BERT, chosen by
    ``model.config.model_type``; for a ``peft`` LoRA model, the down-projections ``lora_A.<adapter>``
    of its adapters). GPT-2's ``Conv1D`` (weight ``[in, out]``) is handled."""
    check_ratio(ratio)
    tg = _targets(model, targets)
    swapped = []
    for name, mod in list(model.named_modules()):
        if not name or not _matches(name, tg):
            continue
        if type(mod) is nn.Linear:
            _replace(model, name, WTACRSLinear.from_linear(mod, ratio, min_k, generator))
        elif is_conv1d(mod):
            _replace(model, name, WTACRSConv1D(mod, ratio, min_k, generator))
        else:
            continue
        swapped.append(name)
    if not swapped:
        raise ValueError(f"apply_wtacrs: no nn.Linear/Conv1D module matches targets {list(tg)}")
    return swapped


def apply_lora(model: nn.Module, targets: Optional[Sequence[str]] = None, r: int = 8,
               alpha: float = 16.0, ratio: Optional[float] = 0.3, min_k: int = 10,
               quant_spec=None, generator: Optional[torch.Generator] = None) -> List[str]:
    """Freezes ``model`` and wraps each target linear (``nn.Linear``, ``QuantLinear`` or GPT-2
    ``Conv1D``) in a :class:`LoRALinear` (WTA-CRS on the down-projection unless ``ratio`` is
    None). With ``quant_spec`` (a :class:`~layerpress.QuantSpec`) a float base is first
    quantised to a ``QuantLinear`` (QLoRA-style). Returns the names wrapped; if no module
    matches, raises before anything is frozen."""
    tg = _targets(model, targets)
    chosen = [(name, mod) for name, mod in model.named_modules()
              if name and _matches(name, tg)
              and (type(mod) is nn.Linear or isinstance(mod, QuantLinear) or is_conv1d(mod))]
    if not chosen:  # checked before anything is frozen or replaced
        raise ValueError(f"apply_lora: no nn.Linear, QuantLinear or Conv1D module matches targets "
                         f"{list(tg)}")
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = []
    for name, mod in chosen:
        base = mod
        if quant_spec is not None and not isinstance(mod, QuantLinear):
            if is_conv1d(mod):  # QuantLinear.from_linear takes the [out, in] weight of a Linear
                w = weight_oi(mod)
                lin = nn.Linear(w.shape[1], w.shape[0], bias=mod.bias is not None,
                                device=w.device, dtype=w.dtype)
                with torch.no_grad():
                    lin.weight.copy_(w)
                    if mod.bias is not None:
                        lin.bias.copy_(mod.bias)
                mod = lin
            base = QuantLinear.from_linear(mod, quant_spec)
            base.requires_grad_(False)
        _replace(model, name, LoRALinear(base, r=r, alpha=alpha, ratio=ratio, min_k=min_k,
                                         generator=generator))
        wrapped.append(name)
    return wrapped
