"""Integrations with other libraries. Each one is optional and costs nothing unless its library
is used.

Hugging Face transformers: :mod:`layerpress.integrations.hf` registers a ``layerpress``
quantisation method. ``import layerpress`` does not import transformers (about a second); it
installs an import hook instead, so the registration happens the moment transformers imports
``transformers.quantizers.auto`` -- the module holding the registry, which every
``from_pretrained`` goes through -- or at once if that module is already imported.
"""
from __future__ import annotations

import importlib.abc
import sys

__all__ = ["install_hf_hook"]

_HF_REGISTRY_MODULE = "transformers.quantizers.auto"
_HF_INTEGRATION = "layerpress.integrations.hf"


def _register_hf() -> None:
    if _HF_INTEGRATION in sys.modules:
        # Either registered already, or hf.py is importing transformers right now: it registers
        # itself once its classes exist (its last line).
        return
    import importlib
    import warnings

    try:
        importlib.import_module(_HF_INTEGRATION)
    except Exception as e:  # never break transformers' own import over an optional integration
        warnings.warn(f"layerpress: could not register with transformers ({type(e).__name__}: {e}); "
                      "from_pretrained will not recognise layerpress checkpoints", RuntimeWarning)


class _RegisterAfterExec(importlib.abc.Loader):
    """Runs the real loader, then registers layerpress with the module just executed."""

    def __init__(self, inner):
        self._inner = inner

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        self._inner.exec_module(module)
        _register_hf()

    def __getattr__(self, name):  # get_source, get_filename, ... of the real loader
        return getattr(self._inner, name)


class _HfRegistryFinder(importlib.abc.MetaPathFinder):
    """Watches for the import of ``transformers.quantizers.auto`` (then removes itself)."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _HF_REGISTRY_MODULE:
            return None
        _remove_finder()
        spec = None
        for finder in list(sys.meta_path):  # whoever finds transformers normally (we are gone)
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None:
                break
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _RegisterAfterExec(spec.loader)
        return spec


def _remove_finder() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _HfRegistryFinder)]


def install_hf_hook() -> None:
    """Registers the ``layerpress`` quantisation method with transformers now if its registry is
    already imported, else when it is. Never imports transformers itself and never fails when
    transformers is absent."""
    if _HF_REGISTRY_MODULE in sys.modules:
        _register_hf()
        return
    if not any(isinstance(f, _HfRegistryFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _HfRegistryFinder())
