"""Sizes and counts as people write and read them (5GB, 46.8 MB, 1 tensor)."""

from __future__ import annotations

import re

from .errors import UsageError

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """'5GB' -> 5 * 10**9 (decimal, as the Hugging Face hub counts), '512MiB' -> 512 * 2**20."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", text.upper())
    if not match or match.group(2) not in _UNITS:
        raise UsageError(f"--max-shard-size {text}: expected a size like 5GB, 500MB or 2GiB")
    size = int(float(match.group(1)) * _UNITS[match.group(2)])
    if size <= 0:
        raise UsageError(f"--max-shard-size {text}: must be more than zero")
    return size


def human_bytes(nbytes: int) -> str:
    """46758048 -> '46.8 MB' (decimal units)."""
    for unit, size in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if nbytes >= size:
            return f"{nbytes / size:.1f} {unit}"
    return f"{nbytes} B"


def plural(count: int, noun: str) -> str:
    """'1 tensor', '2 tensors', '1,024 parameters'."""
    return f"{count:,} {noun}" + ("" if count == 1 else "s")
