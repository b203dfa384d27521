"""Building many small objects at once (100,000 tensor entries) without the garbage
collector's repeated passes over them: nothing built meanwhile is a cycle to collect."""

from __future__ import annotations

import gc
from contextlib import contextmanager
from typing import Iterator

# Set by the command line: a process that ends when its command does may exempt what it built from
# later collection (gc.freeze). A library caller's process is left as it was.
FREEZE = False


@contextmanager
def paused_gc() -> Iterator[None]:
    """The cyclic garbage collector off inside (if it was on), back on after; under FREEZE, what was
    built meanwhile is frozen first, so the next collection does not scan it all at once."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        if FREEZE:
            gc.freeze()
        gc.enable()
