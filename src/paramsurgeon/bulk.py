"""Building many small objects at once (100,000 tensor entries) without the garbage
collector's repeated passes over them: nothing built meanwhile is a cycle to collect."""

from __future__ import annotations

import gc
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def paused_gc() -> Iterator[None]:
    """The cyclic garbage collector off inside (if it was on), back on after."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
