"""Progress bars for the long steps of the flows (block-by-block quantisation, Hessian traces).

``progress_bar(total, desc, enabled)`` returns a tqdm bar when tqdm is installed (it comes with
transformers) and the bar is enabled, else a no-op object with the same ``update`` /
``set_postfix_str`` / ``close`` methods. ``enabled=None`` means: only when stderr is a terminal,
so logs and test output stay clean."""
from __future__ import annotations

import sys
from typing import Optional


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def progress_enabled(enabled: Optional[bool]) -> bool:
    if enabled is None:
        return bool(getattr(sys.stderr, "isatty", lambda: False)())
    return bool(enabled)


def progress_bar(total: int, desc: str, enabled: Optional[bool] = None, unit: str = "it"):
    if not progress_enabled(enabled):
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: no bar, same interface
        return _NoBar()
    return tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)
