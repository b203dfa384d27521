"""A quantized model's list of modules left unquantized (quantconfig.SKIPS in config.json, ModelOpt's
``exclude_modules`` in hf_quant_config.json) after operations that renumbered or renamed modules
(layers, stack, experts, rename: ``Checkpoint.moves``).

An entry that names a module of a renumbered block by its full name from the block on
('model.layers.3.mlp', 'model.layers.1.mlp.experts.5.down_proj', ModelOpt's 'model.layers.3.self_attn*')
follows it: renumbered, duplicated with it, gone with it. transformers matches an entry from the start
of a module name up to a dot (or as its suffix), compressed-tensors and ModelOpt's loaders as the whole
name (or a wildcard), so the renumbered entry names the same module in its new place. The others stay
as they are: 'lm_head', suffixes ('o_proj'), 're:' regexes and wildcards; a note names those whose text
names a numbered module anyway ('re:model\\.layers\\.3\\.'), which this cannot follow. Blocks a stack
took from another checkpoint bring the entries of that checkpoint's list under them.

A rename moves an entry naming a module whose tensors it renamed as a whole ('model.layers.2.mlp' with
'model.layers.2.mlp.*' -> 'model.layers.2.ffn.*', or everything under 'model' with 'model.*' ->
'base.model.*'). An entry naming a module the rename split (some of the modules under it renamed out of
it, some not: 'model.layers.2' with 'model.layers.2.mlp.*' -> 'model.mlp2.*') stays for what is left and
is joined by an entry for each module renamed out of it ('model.mlp2'), so both parts stay unquantized.
A note names the entries it leaves naming renamed modules: patterns and suffixes as above.
"""

from __future__ import annotations

import re
from typing import Callable

from ..checkpoint.moves import Moves, heads


def moved_list(entries: list, moves: list[Moves], theirs: Callable[[str], list | None],
               where: str) -> tuple[list, list[str]]:
    """``entries`` after ``moves``, and the entries under the blocks taken from other checkpoints
    (``theirs(path)``: that checkpoint's list, None when it has none); notes (``where`` names the list)."""
    result = [new for entry in entries for new in (_followed(entry, moves) if isinstance(entry, str) else [entry])]
    for number, step in enumerate(moves):
        for new, (path, old) in step.taken.items():
            result += [renamed for entry in theirs(path) or [] if isinstance(entry, str) and _under(entry, old)
                       for renamed in _followed(new + entry[len(old):], moves[number + 1:])]
    tails = [{tail for key in step.renamed for tail in _tails(key)} for step in moves]
    numbered = [e for e in entries if isinstance(e, str) and _names_a_number(e, moves, tails)]
    renamed = [e for e in entries if isinstance(e, str) and e not in numbered and _names_a_renamed(e, moves, tails)]
    notes = _left(where, numbered, "a pattern or a name's suffix that names renumbered modules by number, which"
                  " cannot follow them; check it against the new numbering")
    notes += _left(where, renamed, "a pattern or a name's suffix that names renamed modules, which cannot follow"
                   " them; check it against the new names")
    return unique(result), notes


def unique(entries: list) -> list:
    """``entries`` each once, in order; an entry that is not a name (a number, a list: a broken
    config's) kept where it is."""
    seen: set[str] = set()
    kept = []
    for entry in entries:
        if isinstance(entry, str):
            if entry in seen:
                continue
            seen.add(entry)
        kept.append(entry)
    return kept


def _followed(entry: str, moves: list[Moves]) -> list[str]:
    """``entry`` after every step of ``moves`` (as checkpoint.moves.followed), and after a rename that split the
    module it names, each module renamed out of it too."""
    names = [entry]
    for step in moves:
        names = [new for name in names for new in step.follow(name) + _split_off(name, step)]
    return names


def _split_off(entry: str, step: Moves) -> list[str]:
    """The new names of the modules under ``entry`` that ``step`` renamed out of it (none when it moved
    ``entry`` itself, or only renamed within it)."""
    return [new for key, news in step.renamed.items() if key.startswith(entry + ".")
            for new in news if not _under(new, entry)]


def _left(where: str, entries: list[str], why: str) -> list[str]:
    """A note naming ``entries`` left as they are, and why."""
    return [f"note: {where}: {', '.join(entries)} left as {'it is' if len(entries) == 1 else 'they are'}: {why}"] \
        if entries else []


def _under(name: str, module: str) -> bool:
    return name == module or name.startswith(module + ".")


def _names_a_number(entry: str, moves: list[Moves], tails: list[set[str]]) -> bool:
    """Whether ``entry``, left as it is, names a member of a renumbered list by its number anyway: a
    pattern ('re:.*layers\\.(0|1)\\.mlp', 'model.layers.1*') or a name's suffix ('layers.3.mlp'), one of
    ``tails`` (each step's renumbered modules' dotted suffixes)."""
    for step, suffixes in zip(moves, tails):
        if not step.numbered or step.module_of(entry) is not None:
            continue
        if _is_pattern(entry):
            if any(re.search(rf"{re.escape(name.rpartition('.')[2])}\W{{1,4}}\d", entry) for name in step.lists()):
                return True
        elif set(heads(entry)) & suffixes:
            return True
    return False


def _names_a_renamed(entry: str, moves: list[Moves], tails: list[set[str]]) -> bool:
    """Whether ``entry``, left as it is, names a module a rename moved anyway: a pattern whose text names
    one by its old name ('re:.*mlp\\.gate$' after 'model.layers.2.mlp' moved), or a name's suffix ('mlp.gate')."""
    for step, suffixes in zip(moves, tails):
        if step.numbered or step.module_of(entry) is not None:
            continue
        if _is_pattern(entry):
            if any(re.search(rf"(?<!\w){re.escape(key.rpartition('.')[2])}(?!\w)", entry) for key in step.renamed):
                return True
        elif set(heads(entry)) & suffixes:
            return True
    return False


def _is_pattern(entry: str) -> bool:
    return entry.startswith("re:") or any(c in _PATTERN for c in entry)


_PATTERN = set("*?[]()|\\^$+{}")


def _tails(name: str) -> set[str]:
    """The shorter dotted suffixes of a name: 'a.b.c' -> {'b.c', 'c'}."""
    parts = name.split(".")
    return {".".join(parts[i:]) for i in range(1, len(parts))}
