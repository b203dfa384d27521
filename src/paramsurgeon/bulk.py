"""Building many small objects at once (100,000 tensor entries) without the garbage
collector's repeated passes over them: nothing built meanwhile is a cycle to collect."""

from __future__ import annotations

import gc
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator

# Whether paused_gc may exempt what it built from later collection (gc.freeze): only inside
# whole_process, never for a library caller's process.
_FREEZING: ContextVar[bool] = ContextVar("freezing", default=False)


@contextmanager
def whole_process() -> Iterator[None]:
    """Inside: a command in a process that ends when it does (the command line). It builds a few
    small objects per tensor (100,000s on a large checkpoint) and almost no cycles, so the cycle
    collector's default pace would re-scan them all again and again: it is slowed down, and what
    paused_gc builds is frozen (not scanned at all: a fifth of inspect's time). Both end with it."""
    threshold = gc.get_threshold()
    gc.set_threshold(100_000, 50, 100)
    token = _FREEZING.set(True)
    try:
        yield
    finally:
        _FREEZING.reset(token)
        gc.set_threshold(*threshold)


@contextmanager
def paused_gc() -> Iterator[None]:
    """The cyclic garbage collector off inside (if it was on), back on after; within whole_process,
    what was built meanwhile is frozen first, so the next collection does not scan it all at once."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        if _FREEZING.get():
            gc.freeze()
        gc.enable()
