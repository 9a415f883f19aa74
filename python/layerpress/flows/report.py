"""What a quantisation run produced: effective bits, a per-layer table and PNG plots.

*Effective bits* of a quantised linear = the bits it stores for its weight -- packed codes,
scales, zeros and side paths (outliers, LoRC factors) -- divided by its
``in_features · out_features`` weights (``QuantLinear.effective_bits``; the bias and an input
permutation are not counted). For W4 g128 asymmetric with fp16 scales and uint8 zeros that is
``4 + (16 + 8)/128 = 4.1875``. Averages over layers are weighted by weight count.

Plots need matplotlib (``pip install matplotlib``, or the ``plots`` extra of layerpress); the
rest of this module does not.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import List, Sequence, Union

from torch import nn

__all__ = ["effective_bits", "fill_effective_bits", "quantized_layers", "layer_table",
           "block_table", "plot_report", "PlotsUnavailable"]


class PlotsUnavailable(ImportError):
    """matplotlib is not installed."""


def effective_bits(module: nn.Module) -> float:
    """Stored bits per weight of a ``QuantLinear`` (see the module docstring)."""
    return module.effective_bits()


def quantized_layers(model: nn.Module):
    """``[(name, QuantLinear)]`` of the model, in module order. A fused layer (nn/fused.py) is
    listed as its parts under their names: exact split copies (extra memory for them)."""
    from ..nn import QuantLinear
    from ..nn.fused import FusedQuantLinear, FusedSlice
    out, split = [], {}
    for name, m in model.named_modules():
        if isinstance(m, FusedSlice):
            if id(m.fused) not in split:
                split[id(m.fused)] = m.fused.split()
            out.append((name, split[id(m.fused)][m.index]))
        elif isinstance(m, QuantLinear) and not isinstance(m, FusedQuantLinear):
            out.append((name, m))
    return out


def fill_effective_bits(model: nn.Module, layers: Sequence) -> float:
    """Sets ``effective_bits`` of each ``LayerReport`` from the model's module of that name;
    returns the weight-count-weighted average (0.0 without layers)."""
    total = weights = 0.0
    for layer in layers:
        m = model.get_submodule(layer.name)
        layer.effective_bits = effective_bits(m)
        w = m.in_features * m.out_features
        total += layer.effective_bits * w
        weights += w
    return total / weights if weights else 0.0


def _table(head: List[str], rows: List[List[str]], left: int = 1) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]

    def line(cells):
        return "  ".join(c.ljust(w) if i < left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


def layer_table(report) -> str:
    """One row per quantised linear: bits, axis, group, method, shape, relative output error
    on the calibration inputs, effective bits; then the totals."""
    rows = []
    for layer in report.layers:
        g = "whole" if layer.group_size == -1 else str(layer.group_size)
        rows.append([layer.name, str(layer.bits), layer.axis, g, layer.method,
                     f"{layer.out_features}x{layer.in_features}", f"{layer.rel_error:.4f}",
                     f"{layer.effective_bits:.3f}"])
    out = _table(["layer", "bits", "axis", "group", "method", "N x K", "rel. error", "eff. bits"], rows)
    mib = (f"{report.original_bytes / 2**20:.2f} -> {report.quantized_bytes / 2**20:.2f} MiB"
           if report.original_bytes else "")
    return (f"{out}\n{len(report.layers)} linears, {report.quantized_params} weights: "
            f"{report.average_bits:.3f} code bits (target {report.bits_target}), "
            f"{report.effective_bits:.3f} effective bits per weight{', ' + mib if mib else ''}")


def block_table(report) -> str:
    """One row per block: importance score (if computed) and code bits."""
    rows = []
    for i, b in enumerate(report.block_bits):
        score = "" if not report.block_scores else f"{report.block_scores[i]:.4g}"
        rows.append([str(i), score, f"{b:g}" if isinstance(b, float) else str(b),
                     "yes" if i in (report.demoted or []) else ""])
    imp = report.importance or "-"
    return _table(["block", f"score ({imp})", "code bits", "demoted"], rows)


def _matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotsUnavailable("plots need matplotlib, which is not installed: pip install "
                               "matplotlib (or pip install 'layerpress[plots]')") from None
    return Figure, FigureCanvasAgg


def _save(fig, canvas_cls, path: Path) -> Path:
    canvas_cls(fig)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=110)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def plot_report(report, out_dir: Union[str, Path]) -> List[Path]:
    """Writes ``scores.png`` (block importance scores, when the run computed them) and
    ``bits.png`` (code and effective bits per linear, block boundaries marked) into ``out_dir``
    (created if needed; each file written atomically). Returns the paths. Raises
    :class:`PlotsUnavailable` if matplotlib is missing."""
    Figure, Canvas = _matplotlib()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    title = (f"{report.model_type} {report.method} target {report.bits_target} bits "
             f"({report.allocation})")
    if report.block_scores:
        fig = Figure(figsize=(max(4.0, 0.45 * len(report.block_scores) + 2), 3.2))
        ax = fig.add_subplot()
        idx = list(range(len(report.block_scores)))
        colors = ["tab:orange" if i in (report.demoted or []) else "tab:blue" for i in idx]
        ax.bar(idx, report.block_scores, color=colors)
        ax.set_xticks(idx)
        ax.set_xlabel("block" + (" (orange: demoted)" if report.demoted else ""))
        ax.set_ylabel(f"{report.importance} score")
        ax.set_title(title, fontsize=9)
        fig.tight_layout()
        paths.append(_save(fig, Canvas, out / "scores.png"))
    layers = report.layers
    fig = Figure(figsize=(max(5.0, 0.18 * len(layers) + 2), 3.6))
    ax = fig.add_subplot()
    idx = list(range(len(layers)))
    ax.bar(idx, [lay.effective_bits for lay in layers], color="tab:gray", label="effective bits")
    ax.bar(idx, [lay.bits for lay in layers], color="tab:blue", label="code bits")
    for i in range(1, len(layers)):
        if layers[i].block != layers[i - 1].block:
            ax.axvline(i - 0.5, color="k", lw=0.5, alpha=0.4)
    ax.axhline(report.bits_target, color="tab:red", lw=1, ls="--", label="target")
    ax.set_xticks(idx)
    ax.set_xticklabels([lay.name.rsplit(".", 1)[-1] for lay in layers], rotation=90, fontsize=6)
    ax.set_ylabel("bits per weight")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    paths.append(_save(fig, Canvas, out / "bits.png"))
    return paths
