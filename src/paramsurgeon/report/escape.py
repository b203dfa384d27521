"""Text from a file made safe for a terminal: a name cannot break a line or drive the screen."""

from __future__ import annotations

_CONTROL = {c: f"\\x{c:02x}" for c in [*range(32), 127]} | {ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"}


def printable(text: str) -> str:
    """``text`` with control characters escaped: a name from a file cannot break a line or drive a terminal."""
    return text.translate(_CONTROL)
