"""The ``layerpress`` command line: :mod:`.main` parses and dispatches, one module per command
(``demo``, ``info``, ``bench``, ``quantize``, ``eval`` in :mod:`.evaluate`, ``inspect``), and
:mod:`.common` holds what they share (also used by ``bench/``)."""
from .common import UsageError
from .main import PROG, build_parser, main

__all__ = ["main", "build_parser", "UsageError", "PROG"]
