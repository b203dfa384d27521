"""Text from a file made safe for a terminal: a name cannot break a line, drive the screen or
reorder what is printed around it."""

from __future__ import annotations

# C0 and C1 controls (U+009B is an 8-bit CSI, U+0085 a line break), line and paragraph
# separators, and the bidirectional marks, embeddings, overrides and isolates
_UNSAFE = [*range(32), *range(127, 160), 0x200E, 0x200F, *range(0x2028, 0x202F), *range(0x2066, 0x206A)]
_CONTROL = {c: f"\\x{c:02x}" if c < 256 else f"\\u{c:04x}" for c in _UNSAFE} | \
    {ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"}


def printable(text: str) -> str:
    """``text`` with control characters escaped: a name from a file cannot break a line or drive a terminal."""
    return text.translate(_CONTROL)
