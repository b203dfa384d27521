"""How far each tensor moved between two checkpoints: ||a - b|| / ||b|| (Frobenius norms),
computed chunk by chunk in float64 (report --against: which layers fine-tuning moved)."""

from __future__ import annotations

import math
from typing import Callable

from ..checkpoint import Checkpoint


def relative_changes(a: Checkpoint, b: Checkpoint, names: list[str],
                     progress: Callable[[int], None] | None = None) -> dict[str, float | None]:
    """``||a - b|| / ||b||`` for every name both hold with the same shape as floating-point
    tensors (inf when b is zero and a is not, 0 when both are zero); None for the others."""
    import torch

    from ..checkpoint.values import pieces, to_torch

    changes: dict[str, float | None] = {}
    for name in names:
        mine, theirs = a.tensors[name], b.tensors.get(name)
        if theirs is None or mine.shape != theirs.shape or not (mine.dtype.floating and theirs.dtype.floating):
            changes[name] = None
            continue
        moved = base = 0.0
        for x, y in pieces(to_torch(mine), to_torch(theirs)):  # b widened inside the subtraction and the norm
            moved += float(torch.linalg.vector_norm(torch.sub(x.double(), y))) ** 2
            base += float(torch.linalg.vector_norm(y, dtype=torch.float64)) ** 2
        changes[name] = math.sqrt(moved / base) if base else (math.inf if moved else 0.0)
        if progress is not None:
            progress(mine.nbytes + theirs.nbytes)
    return changes
