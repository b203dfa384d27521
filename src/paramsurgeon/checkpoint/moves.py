"""Where modules went in an operation that renumbers them (layers, stack, experts) or renames them
(rename), so that the names a model directory's files give them (a quantized model's list of modules
left unquantized) can follow: ``Moves`` of one step, ``renamed_modules`` for a rename, and ``followed``
for a name through every step."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Moves:
    """One step's renumbering. ``renamed``: each numbered module of the input ('model.layers.3') ->
    the modules it became in the result (none: dropped; two: duplicated). ``taken``: a module of the
    result -> (the path of the other checkpoint it was taken from, its name there) (stack).
    ``numbered``: the modules are members of numbered lists (layers, experts), not renamed (rename)."""

    renamed: dict[str, list[str]] = field(default_factory=dict)
    taken: dict[str, tuple[str, str]] = field(default_factory=dict)
    numbered: bool = True

    def follow(self, name: str) -> list[str]:
        """``name`` (a module, a tensor, or a pattern whose text names one module: 'model.layers.3.mlp*')
        after this step: under a renumbered module, renumbered with it; else unchanged."""
        head = self.module_of(name)
        return [name] if head is None else [new + name[len(head):] for new in self.renamed[head]]

    def module_of(self, name: str) -> str | None:
        """The renumbered module ``name`` is (or is under: 'model.layers.3' for 'model.layers.3.mlp'), if any."""
        head = name
        while head and head not in self.renamed:
            head = head.rpartition(".")[0]
        return head or None

    def lists(self) -> set[str]:
        """The dotted names of the numbered lists renumbered ('model.layers', 'model.layers.1.mlp.experts')."""
        return {name.rpartition(".")[0] for name in [*self.renamed, *self.taken]}


def renamed_modules(names: list[str], mapping: dict[str, str]) -> Moves:
    """The modules a rename of tensors (``names``, ``mapping``: old -> new name) moved as a whole: each
    whose every tensor went under one new module by the same path below it, joined there by no other
    ('model.layers.2.mlp' -> 'model.layers.2.ffn' for 'model.layers.2.mlp.*' -> 'model.layers.2.ffn.*').
    Only the outermost: ``Moves.follow`` takes the modules under them along."""
    went: dict[str, set[str | None]] = {}  # module -> the module its tensors' new names put it in
    held: dict[str, int] = {}  # module -> its tensors before; after: the tensors under that name
    after: dict[str, int] = {}
    for name in names:
        new = mapping.get(name, name)
        for module in heads(name):
            rest = name[len(module):]
            went.setdefault(module, set()).add(new[:len(new) - len(rest)] if new.endswith(rest)
                                               and len(new) > len(rest) else None)
            held[module] = held.get(module, 0) + 1
        for module in heads(new):
            after[module] = after.get(module, 0) + 1
    whole = {m: next(iter(to)) for m, to in went.items()
             if len(to) == 1 and None not in to and m not in to and after[next(iter(to))] == held[m]}
    return Moves({m: [to] for m, to in whole.items() if m.rpartition(".")[0] not in whole}, numbered=False)


def heads(name: str) -> list[str]:
    """'a.b.c' -> ['a', 'a.b', 'a.b.c']."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def followed(name: str, moves: list[Moves]) -> list[str]:
    """``name`` after every step of ``moves`` (none when a step dropped its module)."""
    names = [name]
    for step in moves:
        names = [new for n in names for new in step.follow(n)]
    return names
