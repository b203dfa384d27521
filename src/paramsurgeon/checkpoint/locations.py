"""Where a checkpoint's storages say they live: torch's location tags ('cpu', 'cuda:0'),
which ``torch.load`` restores, so a file saved on a GPU needs one to load (or map_location)."""

from __future__ import annotations

from operator import attrgetter
from typing import Any

from .checkpoint import Checkpoint
from .extras import tensors_in
from .tensor import Storage


_LOCATION = attrgetter("storage.location")


def storages(root: Any) -> list[Storage]:
    """Every storage of a tensor anywhere in ``root`` (the model, optimizer state, ...), each once."""
    return list({id(t.storage): t.storage for t in tensors_in(root)}.values())


def off_cpu(ckpt: Checkpoint) -> dict[str, int]:
    """How many storages record each location other than cpu."""
    if not ckpt.key and not ckpt.has_extras() and set(map(_LOCATION, ckpt.tensors.values())) <= {"cpu"}:
        return {}  # the file is its tensors, all on the cpu: told in two passes in C
    counts: dict[str, int] = {}
    for storage in storages(ckpt.root):
        if storage.location != "cpu":
            counts[storage.location] = counts.get(storage.location, 0) + 1
    return counts


def to_cpu(ckpt: Checkpoint) -> int:
    """Record every storage as on the cpu (what ``torch.load(map_location='cpu')`` would do);
    returns how many were elsewhere."""
    moved = [s for s in storages(ckpt.root) if s.location != "cpu"]
    for storage in moved:
        storage.location = "cpu"
    return len(moved)
