"""How far each tensor moved between two checkpoints: ||a - b|| / ||b|| (Frobenius norms),
computed chunk by chunk in float64 (report --against: which layers fine-tuning moved).

A tensor that was all zeros in b has no relative change (the ratio is infinite). Its change is
measured per value against the scale of b as a whole: RMS(a - b) / RMS(b over every compared
tensor), the same ratio a tensor of typical size in b would show for the same movement per
value, so it ranks among the others; it is marked ``was_zero``."""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

from ..checkpoint import Checkpoint


class Change(NamedTuple):
    value: float  # ||a - b|| / ||b||, or for was_zero RMS(a - b) / RMS(all of b)
    was_zero: bool = False  # b was all zeros and a is not


def relative_changes(a: Checkpoint, b: Checkpoint, names: list[str],
                     progress: Callable[[int], None] | None = None) -> dict[str, Change | None]:
    """The Change of every name both hold with the same shape as floating-point tensors (0 when
    both are zero); None for the others."""
    sums = {name: _squares(a, b, name, progress) for name in names}
    compared = [s for s in sums.values() if s is not None]
    scale = _rms([(base, numel) for _, base, numel in compared]) or _rms([(moved, n) for moved, _, n in compared])
    return {name: None if s is None else _change(*s, scale) for name, s in sums.items()}


def _squares(a: Checkpoint, b: Checkpoint, name: str, progress) -> tuple[float, float, int] | None:
    """||a - b||^2, ||b||^2 and the number of values, or None when the two cannot be compared."""
    import torch

    from ..checkpoint.values import pieces, to_torch

    mine, theirs = a.tensors[name], b.tensors.get(name)
    if theirs is None or mine.shape != theirs.shape or not (mine.dtype.floating and theirs.dtype.floating):
        return None
    moved = base = 0.0
    for x, y in pieces(to_torch(mine), to_torch(theirs)):  # b widened inside the subtraction and the norm
        y = y.float() if y.element_size() == 1 else y  # float8 takes part in no type promotion
        moved += float(torch.linalg.vector_norm(torch.sub(x.double(), y))) ** 2
        base += float(torch.linalg.vector_norm(y, dtype=torch.float64)) ** 2
    if progress is not None:
        progress(mine.nbytes + theirs.nbytes)
    return moved, base, mine.numel


def _rms(squares: list[tuple[float, int]]) -> float:
    """The root mean square of the values whose sums of squares and counts these are."""
    count = sum(n for _, n in squares)
    return math.sqrt(sum(s for s, _ in squares) / count) if count else 0.0


def _change(moved: float, base: float, numel: int, scale: float) -> Change:
    if base:
        return Change(math.sqrt(moved / base))
    if not moved:
        return Change(0.0)
    return Change(math.sqrt(moved / numel) / scale, was_zero=True)
