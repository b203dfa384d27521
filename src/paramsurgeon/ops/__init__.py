"""The operations, each a dataclass of its options with a ``plan`` method:

    spec.py        Operation, and the option groups operations share (selection, ties)
    values.py      init, zero, scale, cast: new values for the selected tensors
    structure.py   copy, tie, untie, rename, drop
    reshape/       resize, split, concat, transpose
    lora/          merge-lora (an operation like the others) and extract-lora (writes an adapter)
    quantization.py  dequantize, quantize: quantized weights written plain, float weights quantized
    plan.py        Plan: what an operation changes, checked before anything is computed
    surgery.py     seeds, the rehearsal of every step, the run, optimizer notes
    recipes.py     TOML recipes: steps of the operations above, and merge
    schemes.py     torch.nn.init schemes and layer defaults
    optimizer.py   optimizer state found and reset

Nothing here reads or writes a file.
"""

from typing import Callable

from ..checkpoint import Checkpoint
from .lora import MergeLora
from .plan import Plan
from .quantization import Dequantize, Quantize
from .reshape import Concat, Resize, Split, Transpose
from .spec import Operation
from .structure import Copy, Drop, Rename, Tie, Untie
from .values import Cast, Init, Scale, Zero

OPERATIONS: dict[str, type[Operation]] = {op.name: op for op in (Init, Zero, Scale, Cast, Copy, Tie, Untie,
                                                                   Rename, Drop, Resize, Split, Concat, Transpose,
                                                                   MergeLora, Dequantize, Quantize)}


def _function(operation: type[Operation]) -> Callable[..., Plan]:
    """``name(ckpt, **options)``: check ``operation`` with these options, apply it to ``ckpt`` in
    memory, and return its Plan (its notes say what a command would print)."""
    def function(ckpt: Checkpoint, *, reset_optimizer: bool = False, **options) -> Plan:
        from .surgery import Step, run

        return run(ckpt, [Step(operation(**options))], reset_optimizer=reset_optimizer)[0]

    function.__name__ = function.__qualname__ = operation.name
    function.__doc__ = f"{operation.__doc__}\n\nOptions: the fields of {operation.__name__}; returns the Plan applied."
    return function


init, zero, scale, cast = _function(Init), _function(Zero), _function(Scale), _function(Cast)
copy, tie, untie, rename, drop = _function(Copy), _function(Tie), _function(Untie), _function(Rename), _function(Drop)
resize, split, concat, transpose = _function(Resize), _function(Split), _function(Concat), _function(Transpose)
dequantize, quantize = _function(Dequantize), _function(Quantize)


def apply(ckpt: Checkpoint, recipe: str, *, seed: int | None = None, reset_optimizer: bool = False) -> list[Plan]:
    """Run the TOML recipe at path ``recipe`` on ``ckpt`` in memory; the plans applied, in order."""
    from . import recipes
    from .surgery import run

    steps, recipe_seed = recipes.parse(recipes.read(recipe), recipe)
    return run(ckpt, steps, seed=recipe_seed if recipe_seed is not None else seed, reset_optimizer=reset_optimizer)


__all__ = ["OPERATIONS", "Operation", "Plan", "Init", "Zero", "Scale", "Cast", "Copy", "Tie", "Untie", "Rename",
           "Drop", "Resize", "Split", "Concat", "Transpose", "init", "zero", "scale", "cast", "copy", "tie", "untie",
           "rename", "drop", "resize", "split", "concat", "transpose", "Dequantize", "Quantize", "dequantize", "quantize", "apply"]
