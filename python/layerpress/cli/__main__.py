"""``python -m layerpress.cli``: the same as the ``layerpress`` command."""
import sys

from .main import main

sys.exit(main())
