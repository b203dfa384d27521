"""Parsing text from a file: a document nested deeper than its parser recurses (json's and
tomllib's do) is invalid like any other, not a crash."""

from __future__ import annotations

from typing import Any, Callable


def parse_document(loads: Callable[..., Any], text: str, **options: Any) -> Any:
    """``loads(text, **options)``, where nesting too deep for the parser raises the ValueError that
    every invalid document raises (tomllib's TOMLDecodeError is one too)."""
    try:
        return loads(text, **options)
    except RecursionError as e:
        raise ValueError("nested too deeply to parse") from e
