"""``python -m layerpress`` -- the same as the ``layerpress`` command."""
import sys

from .cli import main

sys.exit(main())
