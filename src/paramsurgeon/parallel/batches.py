"""Units of work grouped into runs of about equal bytes, a few per worker."""

from __future__ import annotations


def batches(sizes: dict[int, int], count: int) -> list[list[int]]:
    """Consecutive runs of the units of ``sizes``, about ``count`` of them, of about equal bytes."""
    if not sizes:
        return []
    target = max(sum(sizes.values()) / max(count, 1), 1)
    runs: list[list[int]] = [[]]
    filled = 0
    for unit, size in sizes.items():
        if runs[-1] and filled + size > target * len(runs):
            runs.append([])
        runs[-1].append(unit)
        filled += size
    return runs
