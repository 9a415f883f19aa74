"""``layerpress info``: the build information as JSON."""
from __future__ import annotations

import json


def add_parser(sub) -> None:
    sub.add_parser("info", help="print build information as JSON",
                   description="Prints layerpress.build_info(): version, the torch it was built "
                               "against, CUDA on/off and architectures, CPU features and the "
                               "kernel variant chosen per op.")


def info(args) -> int:
    import layerpress

    print(json.dumps(layerpress.build_info(), indent=2))
    return 0
