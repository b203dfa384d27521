"""A quantized model's list of modules left unquantized (quantconfig.SKIPS in config.json, ModelOpt's
``exclude_modules`` in hf_quant_config.json) after operations that renumbered modules (layers, stack,
experts: ``Checkpoint.moves``).

An entry that names a module of a renumbered block by its full name from the block on
('model.layers.3.mlp', 'model.layers.1.mlp.experts.5.down_proj', ModelOpt's 'model.layers.3.self_attn*')
follows it: renumbered, duplicated with it, gone with it. transformers matches an entry from the start
of a module name up to a dot (or as its suffix), compressed-tensors and ModelOpt's loaders as the whole
name (or a wildcard), so the renumbered entry names the same module in its new place. The others stay
as they are: 'lm_head', suffixes ('o_proj'), 're:' regexes and wildcards; a note names those whose text
names a numbered module anyway ('re:model\\.layers\\.3\\.'), which this cannot follow. Blocks a stack
took from another checkpoint bring the entries of that checkpoint's list under them.
"""

from __future__ import annotations

import re
from typing import Callable

from ..checkpoint.moves import Moves, followed


def moved_list(entries: list, moves: list[Moves], theirs: Callable[[str], list | None],
               where: str) -> tuple[list, list[str]]:
    """``entries`` after ``moves``, and the entries under the blocks taken from other checkpoints
    (``theirs(path)``: that checkpoint's list, None when it has none); notes (``where`` names the list)."""
    result = [new for entry in entries for new in (followed(entry, moves) if isinstance(entry, str) else [entry])]
    for number, step in enumerate(moves):
        for new, (path, old) in step.taken.items():
            result += [renamed for entry in theirs(path) or [] if isinstance(entry, str) and _under(entry, old)
                       for renamed in followed(new + entry[len(old):], moves[number + 1:])]
    tails = [{tail for key in step.renamed for tail in _tails(key)} for step in moves]
    unfollowed = [e for e in entries if isinstance(e, str) and _names_a_number(e, moves, tails)]
    notes = [f"note: {where}: {', '.join(unfollowed)} left as {'it is' if len(unfollowed) == 1 else 'they are'}:"
             " a pattern or a name's suffix that names renumbered modules by number, which cannot follow them;"
             " check it against the new numbering"] if unfollowed else []
    return list(dict.fromkeys(result)), notes


def _under(name: str, module: str) -> bool:
    return name == module or name.startswith(module + ".")


def _names_a_number(entry: str, moves: list[Moves], tails: list[set[str]]) -> bool:
    """Whether ``entry``, left as it is, names a member of a renumbered list by its number anyway: a
    pattern ('re:.*layers\\.(0|1)\\.mlp', 'model.layers.1*') or a name's suffix ('layers.3.mlp'), one of
    ``tails`` (each step's renumbered modules' dotted suffixes)."""
    for step, suffixes in zip(moves, tails):
        if step.module_of(entry) is not None:
            continue
        if entry.startswith("re:") or any(c in _PATTERN for c in entry):
            if any(re.search(rf"{re.escape(name.rpartition('.')[2])}\W{{1,4}}\d", entry) for name in step.lists()):
                return True
        elif _heads(entry) & suffixes:
            return True
    return False


_PATTERN = set("*?[]()|\\^$+{}")


def _heads(name: str) -> set[str]:
    """'a.b.c' -> {'a', 'a.b', 'a.b.c'}."""
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1)}


def _tails(name: str) -> set[str]:
    """The shorter dotted suffixes of a name: 'a.b.c' -> {'b.c', 'c'}."""
    parts = name.split(".")
    return {".".join(parts[i:]) for i in range(1, len(parts))}
