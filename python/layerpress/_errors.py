"""Argument errors of the C++ ops, with their Python types.

The ops are built on the LibTorch stable ABI, which has no stable ``c10::ValueError`` /
``c10::TypeError``. layerpress's C++ checks throw ``std::invalid_argument`` whose message starts
with the type it stands for, ``[ValueError] `` or ``[TypeError] `` (cpp/ops/launch_utils.h).
torch lets that exception through to pybind11, which raises ``ValueError`` (torch 2.13; nothing
promises it, another release may raise ``RuntimeError``). The Python API (``layerpress.ops`` and
everything built on it) re-raises either as the tagged type, ``ValueError`` or ``TypeError``,
with the tag removed. Raw ``torch.ops.layerpress.*`` calls see the tagged exception as torch
delivers it; C++ callers catch ``std::invalid_argument``.
"""
from __future__ import annotations

import functools
import re

import torch

_TAG = re.compile(r"\[(ValueError|TypeError)\] ")
_TYPES = {"ValueError": ValueError, "TypeError": TypeError}


def typed_error(e: Exception) -> Exception:
    """The ValueError/TypeError a tagged op error stands for, else ``e`` itself."""
    msg = str(e)
    m = _TAG.search(msg)
    if m is None:
        return e
    return _TYPES[m.group(1)](msg[m.end():])


def typed_errors(fn):
    """Decorator for the Python wrappers of the ops: tagged op errors become ValueError/TypeError.
    While torch.compile traces, the ops run as fakes and raise no tagged error: the wrapper then
    calls straight through (no try/except for dynamo to trace)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if torch.compiler.is_compiling():
            return fn(*args, **kwargs)
        try:
            return fn(*args, **kwargs)
        except (RuntimeError, ValueError) as e:
            err = typed_error(e)
            if err is e:
                raise
            raise err from None
    return wrapper
