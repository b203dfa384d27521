"""Where numbered modules went in an operation that renumbers them (layers, stack, experts), so that
the names a model directory's files give them (a quantized model's list of modules left unquantized)
can follow: ``Moves`` of one step, and ``followed`` for a name through every step."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Moves:
    """One step's renumbering. ``renamed``: each numbered module of the input ('model.layers.3') ->
    the modules it became in the result (none: dropped; two: duplicated). ``taken``: a module of the
    result -> (the path of the other checkpoint it was taken from, its name there) (stack)."""

    renamed: dict[str, list[str]] = field(default_factory=dict)
    taken: dict[str, tuple[str, str]] = field(default_factory=dict)

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


def followed(name: str, moves: list[Moves]) -> list[str]:
    """``name`` after every step of ``moves`` (none when a step dropped its module)."""
    names = [name]
    for step in moves:
        names = [new for n in names for new in step.follow(n)]
    return names
