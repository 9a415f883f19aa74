"""``layerpress inspect``: what a saved quantised model holds, per layer and in total."""
from __future__ import annotations

import json
from pathlib import Path

from .common import load_saved, table


def add_parser(sub) -> None:
    i = sub.add_parser(
        "inspect", help="show what a saved quantised model holds",
        description="Per quantised linear: bits, group axis and size, zero points, scale dtype, "
                    "method, shape, stored bytes, effective bits (codes, scales, zeros and side "
                    "paths per weight) and its other stored tensors (side paths, input permutation); then the totals.")
    i.add_argument("model_dir", metavar="DIR", help="saved quantised model directory")
    i.add_argument("--no-verify", action="store_true",
                   help="skip checking the tensors against their recorded digests")
    i.add_argument("--json", action="store_true", help="print JSON instead of a table")


def inspect_saved(args) -> int:
    from ..flows.report import effective_bits, quantized_layers

    qmodel = load_saved(args.model_dir, verify=not args.no_verify)
    d = Path(args.model_dir)
    qcfg = json.loads((d / "config.json").read_text(encoding="utf-8"))["quantization_config"]
    extra = qcfg.get("extra") if isinstance(qcfg.get("extra"), dict) else {}
    methods = {lay.get("name"): lay.get("method") for lay in extra.get("layers", []) if isinstance(lay, dict)}
    rows, out = [], []
    weights = code = eff_total = qbytes = 0
    for name, m in quantized_layers(qmodel):
        s = m.spec
        nbytes = sum(t.numel() * t.element_size() for k, t in m.state_dict().items() if k != "bias")
        side = sorted(k for k in m.state_dict() if k not in ("qweight", "scales", "zeros", "bias"))
        eff = effective_bits(m)
        w = m.in_features * m.out_features
        weights += w
        code += s.bits * w
        eff_total += eff * w
        qbytes += nbytes
        g = "whole" if s.group_size == -1 else str(s.group_size)
        info_ = {"name": name, "bits": s.bits, "axis": s.axis, "group_size": s.group_size,
                 "symmetric": s.symmetric, "scale_dtype": str(s.scale_dtype).replace("torch.", ""),
                 "method": methods.get(name), "out_features": m.out_features,
                 "in_features": m.in_features, "bytes": nbytes, "effective_bits": eff,
                 "other_tensors": side}
        out.append(info_)
        rows.append([name, str(s.bits), s.axis, g, "sym" if s.symmetric else "asym",
                     info_["scale_dtype"], methods.get(name) or "-", f"{m.out_features}x{m.in_features}",
                     f"{nbytes}", f"{eff:.3f}", ",".join(side) or "-"])
    total_bytes = sum(t.numel() * t.element_size() for t in qmodel.state_dict().values())
    file_bytes = (d / "model.safetensors").stat().st_size
    totals = {"model_class": type(qmodel).__name__, "quantized_linears": len(out),
              "quantized_weights": weights, "average_code_bits": code / weights,
              "average_effective_bits": eff_total / weights, "quantized_bytes": qbytes,
              "other_bytes": total_bytes - qbytes - sum(
                  m.bias.numel() * m.bias.element_size() for _, m in quantized_layers(qmodel)
                  if m.bias is not None),
              "file_bytes": file_bytes,
              "bits_target": extra.get("bits_target"), "allocation": extra.get("allocation")}
    if args.json:
        print(json.dumps({"layers": out, "totals": totals}, indent=2))
        return 0
    print(table(["layer", "bits", "axis", "group", "zero", "scales", "method", "N x K", "bytes",
                  "eff. bits", "other tensors"], rows))
    print(f"{len(out)} quantised linears, {weights} weights: {totals['average_code_bits']:.3f} code "
          f"bits, {totals['average_effective_bits']:.3f} effective bits per weight; "
          f"{qbytes / 2**20:.2f} MiB quantised + {totals['other_bytes'] / 2**20:.2f} MiB other "
          f"tensors; model.safetensors {file_bytes / 2**20:.2f} MiB"
          + (f"; target {extra['bits_target']} bits ({extra.get('allocation', 'order')})"
             if extra.get("bits_target") is not None else ""))
    return 0
