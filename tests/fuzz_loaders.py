"""Fuzz targets for the loaders (tests/fuzz_harness.py runs them): ``load_quantized`` (single
file and the sharded index), the AWQ and GPTQ importers, and ``from_pretrained`` through the
quantisation method, each fed a mutation of a valid saved model -- header bytes, the header
length, tensor offsets (out of bounds, overlapping, reversed), dtype strings, shapes,
truncation anywhere, payload bit flips, JSON fields removed, given the wrong type or huge
numbers, invalid JSON, a file deleted.

A case is right when the loader either returns a model whose tensors equal the unmutated
model's (the mutation was harmless, e.g. an unused config field) or raises one of the loading
errors (ValueError -- IntegrityError included --, FileNotFoundError, OSError, TypeError,
NotImplementedError) with a message that names the directory, the file or the tensor/field.
Anything else -- another exception type, a message naming nothing, a model that differs -- is a
failure (except a payload bit flip in an AWQ/GPTQ checkpoint: those formats store no checksum;
and, for ``from_pretrained``, errors of transformers' own parsing of the index and config before
layerpress is called, which are transformers' to name).
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
import warnings
from pathlib import Path

import torch
from hypothesis import strategies as st

from fuzz_harness import FuzzFailure

os.environ.setdefault("HF_HUB_OFFLINE", "1")

LOAD_ERRORS = (ValueError, FileNotFoundError, OSError, TypeError, NotImplementedError)
MUTATIONS = ("header_byte", "header_len", "offsets", "dtype", "shape", "truncate", "bitflip",
             "json_remove", "json_type", "json_huge", "json_garbage", "delete_file")
ODD_VALUES = (None, "x", "", -1, 0, 2 ** 70, -(2 ** 63), 1.5, float("nan"), True, [], {}, [1, 2], {"a": 1})
DTYPE_STRINGS = ("F16", "BF16", "F32", "F64", "I8", "U8", "I16", "I32", "I64", "BOOL", "F8_E4M3", "XX", "", "f32")

_BASES = {}


def _base(kind: str) -> Path:
    """The unmutated saved model of each kind (built once per process)."""
    if kind in _BASES:
        return _BASES[kind][0]
    from flows_testutils import calib_ids, tiny_model
    from layerpress.flows import quantize_model, save_quantized
    root = Path(tempfile.mkdtemp(prefix="lp-fuzz-base-"))
    if "model" not in _BASES:
        torch.manual_seed(0)
        model = tiny_model("llama", layers=1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_model(model, bits=4, group_size=32, calib=calib_ids(2, 8), method="rtn", axis="oc")
        _BASES["model"] = (None, model)
    model = _BASES["model"][1]
    path = root / kind
    if kind == "single":
        save_quantized(model, path)
    elif kind == "sharded":
        import transformers
        hf = transformers.AutoModelForCausalLM.from_pretrained(_base("single"))
        hf.save_pretrained(path, max_shard_size="60KB")
    elif kind == "awq":
        from layerpress.interop import export_awq
        export_awq(model, path)
    elif kind == "gptq":
        from layerpress.interop import export_gptq
        export_gptq(model, path)
    _BASES[kind] = (path, _state(_loader(kind)(path)))
    return path


def _state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _loader(kind: str):
    if kind in ("single", "sharded"):
        from layerpress.flows import load_quantized
        return load_quantized
    if kind == "from_pretrained":
        import transformers
        return transformers.AutoModelForCausalLM.from_pretrained
    from layerpress.interop import load_awq, load_gptq
    return load_awq if kind == "awq" else load_gptq


# ---- mutations ---------------------------------------------------------------------------------------

def _st_header(raw: bytes):
    n = struct.unpack("<Q", raw[:8])[0]
    return n, json.loads(raw[8:8 + n])


def _st_write(file: Path, hdr: dict, data: bytes) -> None:
    text = json.dumps(hdr).encode()
    text += b" " * (-len(text) % 8)
    file.write_bytes(struct.pack("<Q", len(text)) + text + data)


def _json_paths(obj, prefix=()):
    out = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.append(prefix + (k,))
            out += _json_paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:4]):
            out.append(prefix + (i,))
            out += _json_paths(v, prefix + (i,))
    return out


def _parent(obj, path):
    for p in path[:-1]:
        obj = obj[p]
    return obj


def _pick(seq, pos: float):
    return seq[min(len(seq) - 1, int(pos * len(seq)))]


def mutate(d: Path, c: dict) -> str:
    """Applies the case's mutation to the copy ``d``; returns what it did."""
    files = sorted(p.name for p in d.iterdir() if p.is_file())
    st_files = [f for f in files if f.endswith(".safetensors")]
    json_files = [f for f in files if f.endswith(".json")]
    kind, pos, val = c["mutation"], c["pos"], c["val"]
    g = torch.Generator().manual_seed(c["seed"])
    if kind == "delete_file":
        f = _pick(files, pos)
        (d / f).unlink()
        return f"deleted {f}"
    if kind.startswith("json"):
        f = d / _pick(json_files, c["file_pos"])
        if kind == "json_garbage":
            raw = f.read_bytes()
            f.write_bytes(raw[: int(pos * len(raw))] + (b"\xff\x00" if val % 2 else b""))
            return f"{f.name} cut at {int(pos * len(raw))}"
        obj = json.loads(f.read_text())
        paths = _json_paths(obj)
        if not paths:
            return "nothing"
        path = _pick(paths, pos)
        parent = _parent(obj, path)
        if kind == "json_remove":
            if isinstance(parent, dict):
                del parent[path[-1]]
            else:
                parent.pop(path[-1])
        elif kind == "json_type":
            parent[path[-1]] = ODD_VALUES[val % len(ODD_VALUES)]
        else:
            parent[path[-1]] = (2 ** 62, -(2 ** 62), 10 ** 30, 1e308, -1)[val % 5]
        f.write_text(json.dumps(obj))
        return f"{kind} {f.name}:{'/'.join(map(str, path))}"
    f = d / _pick(st_files, c["file_pos"])
    raw = f.read_bytes()
    n, hdr = _st_header(raw)
    data = raw[8 + n:]
    keys = sorted(k for k in hdr if k != "__metadata__")
    key = _pick(keys, pos)
    if kind == "header_byte":
        i = 8 + int(pos * n)
        f.write_bytes(raw[:i] + bytes([val % 256]) + raw[i + 1:])
        return f"{f.name}: header byte {i} = {val % 256}"
    if kind == "header_len":
        new = (0, 1, n - 1, n + 1, len(raw), len(raw) - 7, 2 ** 63, 2 ** 64 - 1, 2 ** 40)[val % 9]
        f.write_bytes(struct.pack("<Q", new) + raw[8:])
        return f"{f.name}: header length {new}"
    if kind == "offsets":
        a, b = hdr[key]["data_offsets"]
        other = hdr[_pick(keys, (pos + 0.37) % 1)]["data_offsets"]
        choices = [[b, a], [a, len(data) + 1], [a + 1, b + 1], [other[0], other[0] + (b - a)], [-1, b],
                   [a, 2 ** 64], [2 ** 63, 2 ** 63 + (b - a)], [0, b - a], [a, a]]
        hdr[key]["data_offsets"] = choices[val % len(choices)]
    elif kind == "dtype":
        hdr[key]["dtype"] = DTYPE_STRINGS[val % len(DTYPE_STRINGS)]
    elif kind == "shape":
        shape = list(hdr[key]["shape"])
        choices = [shape + [1], shape[:-1], [2 ** 40] + shape[1:], [-1] + shape[1:], [0] + shape[1:],
                   shape[::-1], [int(torch.tensor(shape).prod())] if shape else [1], [2 ** 62, 2 ** 62]]
        hdr[key]["shape"] = choices[val % len(choices)]
    elif kind == "truncate":
        cut = int(pos * len(raw))
        f.write_bytes(raw[:cut])
        return f"{f.name} truncated at {cut} of {len(raw)}"
    elif kind == "bitflip":
        a, b = hdr[key]["data_offsets"]
        if b <= a:
            return "nothing"
        i = 8 + n + a + int(torch.randint(0, b - a, (1,), generator=g))
        f.write_bytes(raw[:i] + bytes([raw[i] ^ (1 << (val % 8))]) + raw[i + 1:])
        return f"{f.name}: bit {val % 8} of byte {i} ({key})"
    _st_write(f, hdr, data)
    return f"{kind} {f.name}:{key} -> {hdr[key]}"


@st.composite
def loader_case(draw, bases):
    return {
        "base": draw(st.sampled_from(bases)),
        "mutation": draw(st.sampled_from(MUTATIONS)),
        "pos": draw(st.floats(0, 1, exclude_max=True)),
        "file_pos": draw(st.floats(0, 1, exclude_max=True)),
        "val": draw(st.integers(0, 255)),
        "seed": draw(st.integers(0, 2 ** 16)),
    }


def _raised_upstream(e: BaseException) -> bool:
    """Raised by transformers/huggingface_hub code with no layerpress frame on the stack."""
    import traceback
    frames = [f.filename for f in traceback.extract_tb(e.__traceback__)]
    return not any("/layerpress/" in f for f in frames[1:])


def _names_something(msg: str, d: Path, names) -> bool:
    return str(d) in msg or any(n in msg for n in names)


def run_loader(c, via: str = None):
    base = _base(c["base"])
    ref = _BASES[c["base"]][1]
    with tempfile.TemporaryDirectory(prefix="lp-fuzz-") as tmp:
        d = Path(tmp) / "m"
        shutil.copytree(base, d)
        what = mutate(d, c)
        names = [p.name for p in base.iterdir()] + list(ref) + ["config", "quantization_config", "layers",
                                                               "safetensors", "header", "weight_map"]
        load = _loader(via or c["base"])
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = load(d)
        except LOAD_ERRORS as e:
            msg = str(e)
            if not msg.strip() or not _names_something(msg, d, names):
                if via == "from_pretrained" and _raised_upstream(e):
                    return
                raise FuzzFailure(f"{what}: {type(e).__name__} names no file, tensor or field: {msg[:500]}") from None
            return
        except Exception as e:  # noqa: BLE001
            if via == "from_pretrained" and _raised_upstream(e):
                return  # transformers' own parsing (index, config) before layerpress is called
            raise FuzzFailure(f"{what}: {type(e).__name__} (not a loading error): {str(e)[:500]}") from None
        if c["base"] in ("awq", "gptq") and c["mutation"] == "bitflip":
            return  # those formats carry no checksum: a flipped payload bit cannot be seen
        got = _state(model)
        if set(got) != set(ref):
            raise FuzzFailure(f"{what}: loaded, with other tensors: {sorted(set(got) ^ set(ref))[:5]}")
        for k, v in ref.items():
            if got[k].dtype != v.dtype or got[k].shape != v.shape or not torch.equal(got[k], v):
                raise FuzzFailure(f"{what}: loaded silently with a different {k}")


def _single_or_sharded(c):
    run_loader(c)


def _from_pretrained(c):
    run_loader(c, via="from_pretrained")


TARGETS = {
    "loaders.load_quantized": (lambda: loader_case(["single"]), _single_or_sharded),
    "loaders.sharded_index": (lambda: loader_case(["sharded"]), _single_or_sharded),
    "loaders.awq_import": (lambda: loader_case(["awq"]), run_loader),
    "loaders.gptq_import": (lambda: loader_case(["gptq"]), run_loader),
    "loaders.from_pretrained": (lambda: loader_case(["single", "sharded"]), _from_pretrained),
}
