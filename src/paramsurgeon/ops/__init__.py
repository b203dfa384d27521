"""The operations, each a dataclass of its options with a ``plan`` method:

    spec.py        Operation, and the option groups operations share (selection, ties)
    values.py      init, zero, scale, cast: new values for the selected tensors
    structure.py   copy, tie, untie, rename, drop
    plan.py        Plan: what an operation changes, checked before anything is computed
    surgery.py     seeds, the rehearsal of every step, the run, optimizer notes
    recipes.py     TOML recipes: steps of the operations above
    schemes.py     torch.nn.init schemes and layer defaults
    optimizer.py   optimizer state found and reset

Nothing here reads or writes a file.
"""

from .spec import Operation
from .structure import Copy, Drop, Rename, Tie, Untie
from .values import Cast, Init, Scale, Zero

OPERATIONS: dict[str, type[Operation]] = {op.name: op for op in (Init, Zero, Scale, Cast, Copy, Tie, Untie,
                                                                   Rename, Drop)}

__all__ = ["OPERATIONS", "Operation", "Init", "Zero", "Scale", "Cast", "Copy", "Tie", "Untie", "Rename", "Drop"]
