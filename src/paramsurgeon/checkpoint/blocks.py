"""The repeated block of a model (its transformer layers), found from names: a numbered list
named ``layers``, ``layer`` or ``blocks`` wherever it sits in the name (``model.layers.N.``,
``encoder.layer.N.``, ``gpt_neox.layers.N.``, a multimodal model's ``language_model.model.layers.N.``),
``transformer.h.N.``, T5's ``encoder.block.N.`` and ``decoder.block.N.``, or one the user names; and
ranges of block indices as the user writes them (``20..23,5``)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import SelectionError, UsageError

KNOWN = ("model.layers", "transformer.h", "encoder.layer", "blocks", "model.decoder.layers")  # as messages name them
_KNOWN = re.compile(r"((?:[^.]+\.)*?(?:layers|layer|blocks|transformer\.h|encoder\.block|decoder\.block))\.(\d+)\.")
STACK_LEVEL = ("relative_attention_bias.weight",)  # T5's position bias: the stack's, held by its block 0 alone


@dataclass
class Blocks:
    """The blocks under ``prefix`` ('model.layers'): ``members[i]`` the names of block i, in file order."""

    prefix: str
    members: list[list[str]]
    outside: frozenset[str] = frozenset()  # names under block 0 that are the whole stack's (T5's position bias)

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
        if not name.startswith(head) or name in self.outside:
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
            lists = ", ".join(candidates(names)) or "none found from the names"
            raise SelectionError(f"{where}no tensor is named '{chosen}.N.…' (--prefix {prefix}); pass the dotted"
                                 f" prefix of the numbered block list (the model's: {lists})")
        return _blocks(chosen, found, where)
    found = candidates(names)
    whole = {p: blocks for p, blocks in found.items() if len(blocks) == max(blocks) + 1}
    found = whole or found  # a list with gaps (an nn.Sequential of layers and activations) is no block list
    if not found:
        raise SelectionError(f"{where}no repeated block found (no name starts with {', '.join(k + '.N.' for k in KNOWN)});"
                             " pass --prefix to name the numbered block list")
    if len(found) > 1:
        raise SelectionError(f"{where}several repeated blocks ({', '.join(f'{p}.N x {len(b)}' for p, b in found.items())});"
                             f" pass --prefix with the one you mean (e.g. --prefix {next(iter(found))})")
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
    blocks = Blocks(prefix, [found[i] for i in range(len(found))])
    others = {blocks.local(n) for block in blocks.members[1:] for n in block}
    outside = frozenset(n for n in blocks.members[0] if n.endswith(STACK_LEVEL) and blocks.local(n) not in others)
    return Blocks(prefix, [[n for n in block if n not in outside] for block in blocks.members], outside)


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
