"""The repeated block of a model (its transformer layers), found from names: the list
``model.layers.N.``, ``transformer.h.N.``, ``encoder.layer.N.``, ``blocks.N.`` or
``model.decoder.layers.N.`` (wherever it sits in the name), or one the user names; and
ranges of block indices as the user writes them (``20..23,5``)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import SelectionError, UsageError

KNOWN = ("model.layers", "transformer.h", "encoder.layer", "blocks", "model.decoder.layers")
_KNOWN = re.compile(r"((?:[^.]+\.)*?(?:model\.decoder\.layers|model\.layers|transformer\.h|"
                    r"encoder\.layer|blocks))\.(\d+)\.")


@dataclass
class Blocks:
    """The blocks under ``prefix`` ('model.layers'): ``members[i]`` the names of block i, in file order."""

    prefix: str
    members: list[list[str]]

    @property
    def count(self) -> int:
        return len(self.members)

    @property
    def label(self) -> str:
        """'model.layers.N x 6'."""
        return f"{self.prefix}.N x {self.count}"

    def index(self, name: str) -> int | None:
        """The block ``name`` belongs to, or None for a name outside the blocks."""
        head = self.prefix + "."
        if not name.startswith(head):
            return None
        number, dot, _ = name[len(head):].partition(".")
        return int(number) if dot and number.isdigit() and int(number) < self.count else None

    def name(self, index: int, local: str) -> str:
        """The name of ``local`` ('mlp.down_proj.weight') in block ``index``."""
        return f"{self.prefix}.{index}.{local}"

    def local(self, name: str) -> str:
        """``name`` without its block: 'self_attn.o_proj.weight'."""
        return name[len(self.prefix) + 1:].partition(".")[2]


def find_blocks(names: list[str], prefix: str | None = None, where: str = "") -> Blocks:
    """The repeated block among ``names`` (under ``prefix`` when given: 'net.stages', with a trailing
    '.' or '.N.' accepted); an error when there is none, or several the user must choose from."""
    if prefix is not None:
        chosen = re.sub(r"\.(N\.?)?$", "", prefix)
        found = _under(names, chosen)
        if not found:
            raise SelectionError(f"{where}no tensor is named '{chosen}.N.…' (--prefix {prefix}); pass the dotted"
                                 " prefix of the numbered block list, e.g. --prefix model.layers")
        return _blocks(chosen, found, where)
    found = candidates(names)
    if not found:
        raise SelectionError(f"{where}no repeated block found (no name starts with {', '.join(k + '.N.' for k in KNOWN)});"
                             " pass --prefix to name the numbered block list")
    if len(found) > 1:
        raise SelectionError(f"{where}several repeated blocks ({', '.join(found)}); pass --prefix with the one you"
                             " mean")
    prefix = next(iter(found))
    return _blocks(prefix, found[prefix], where)


def candidates(names: list[str]) -> dict[str, dict[int, list[str]]]:
    """Every known block list among ``names``: prefix -> index -> names."""
    found: dict[str, dict[int, list[str]]] = {}
    for name in names:
        match = _KNOWN.match(name)
        if match:
            found.setdefault(match.group(1), {}).setdefault(int(match.group(2)), []).append(name)
    return found


def _under(names: list[str], prefix: str) -> dict[int, list[str]]:
    head = prefix + "."
    found: dict[int, list[str]] = {}
    for name in names:
        if name.startswith(head):
            number, dot, _ = name[len(head):].partition(".")
            if dot and number.isdigit():
                found.setdefault(int(number), []).append(name)
    return found


def _blocks(prefix: str, found: dict[int, list[str]], where: str) -> Blocks:
    missing = [i for i in range(max(found) + 1) if i not in found]
    if missing:
        raise SelectionError(f"{where}{prefix}.N has no block {missing[0]} (it has {len(found)} numbered up to"
                             f" {max(found)}); the blocks must be numbered 0..L-1")
    return Blocks(prefix, [found[i] for i in range(len(found))])


def parse_ranges(text: str, count: int, flag: str, things: str = "the model has {} blocks") -> list[list[int]]:
    """The ranges of ``20..23,5`` in the order written, each a list of indices below ``count`` (of
    ``things``); no index twice."""
    ranges: list[list[int]] = []
    indices: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        first, dots, last = part.partition("..")
        if not (first.strip().isdigit() and (not dots or last.strip().isdigit())):
            raise UsageError(f"{flag} {text}: '{part}' is not an index or a range (write 20..23 or 5, comma-separated)")
        low, high = int(first), int(last) if dots else int(first)
        if high < low:
            raise UsageError(f"{flag} {text}: the range {part} ends before it starts")
        if high >= count:
            raise UsageError(f"{flag} {text}: index {high} is out of range; {things.format(count)} (0..{count - 1})")
        for i in range(low, high + 1):
            if i in indices:
                raise UsageError(f"{flag} {text}: block {i} is given twice" + " (the ranges overlap)" * bool(dots))
            indices.append(i)
        ranges.append(list(range(low, high + 1)))
    return ranges
