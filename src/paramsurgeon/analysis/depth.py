"""The network's order of tensor names, for charts along the depth: numbers in names compare as
numbers (``layers.2`` before ``layers.10``, ``layer2`` before ``layer10``), everything else keeps
the order the file gives (module registration order in a torch state dict, alphabetical in
safetensors)."""

from __future__ import annotations

import re

_NUMBER = re.compile(r"(\d+)")


def depth_order(names: list[str]) -> list[str]:
    """``names`` sorted along the depth. Names are trees of dotted parts; at each node the parts
    that differ only in their numbers (``0`` and ``10``, ``conv1`` and ``conv2``) take the places
    they held among their siblings, in numeric order; other parts stay where they first appear."""
    children: dict[tuple[str, ...], dict[str, None]] = {}
    for name in names:
        parts = tuple(name.split("."))
        for depth in range(len(parts)):
            children.setdefault(parts[:depth], {})[parts[depth]] = None
    rank = {node: _ranks(list(kids)) for node, kids in children.items()}

    def key(name: str) -> tuple[int, ...]:
        parts = tuple(name.split("."))
        return tuple(rank[parts[:depth]][parts[depth]] for depth in range(len(parts)))

    return sorted(names, key=key)


def _ranks(parts: list[str]) -> dict[str, int]:
    """Each sibling's place: those of one shape (digits aside) fill their places in numeric order."""
    shapes: dict[str, list[int]] = {}
    for place, part in enumerate(parts):
        shapes.setdefault(_NUMBER.sub("#", part), []).append(place)
    ranks = {}
    for places in shapes.values():
        ordered = sorted((parts[p] for p in places), key=_numbers)
        ranks.update(zip(ordered, places))
    return ranks


def _numbers(part: str) -> tuple[int, ...]:
    return tuple(int(n) for n in _NUMBER.findall(part))
