"""The operations, each a dataclass of its options with a ``plan`` method:

    spec.py        Operation, and the option groups operations share (selection, ties)
    values.py      init, zero, scale, cast: new values for the selected tensors
    structure.py   copy, tie, untie, rename, drop
    layers.py      layers (drop, keep, duplicate, move blocks) and stack (blocks of several checkpoints)
    experts.py     experts (prune the experts of mixture-of-experts blocks)
    reshape/       resize, split, concat, transpose
    lora/          merge-lora (an operation like the others) and extract-lora (an adapter's tensors)
    quantization.py  dequantize, quantize: quantized weights written plain, float weights quantized
    plan.py        Plan: what an operation changes, checked before anything is computed
    surgery.py     seeds, the rehearsal of every step, the run, optimizer notes
    recipes.py     TOML recipes: steps of the operations above, and merge
    schemes.py     torch.nn.init schemes and layer defaults
    optimizer.py   optimizer state found and reset
    catalog.py     OPERATIONS: every operation by its command name

Nothing here opens a checkpoint or writes a file (recipes.read reads a recipe's text): what a
plan reads besides its checkpoint comes from the command's loader (spec.Sources); the
library's calls, which open what they are given, are in paramsurgeon/library.py.
"""

from .catalog import OPERATIONS
from .experts import Experts
from .layers import Layers
from .lora import MergeLora
from .plan import Plan
from .quantization import Dequantize, Quantize
from .reshape import Concat, Resize, Split, Transpose
from .spec import Operation
from .structure import Copy, Drop, Rename, Tie, Untie
from .values import Cast, Init, Scale, Zero

__all__ = ["OPERATIONS", "Operation", "Plan", "Init", "Zero", "Scale", "Cast", "Copy", "Tie", "Untie", "Rename",
           "Drop", "Resize", "Split", "Concat", "Transpose", "MergeLora", "Layers", "Experts", "Dequantize", "Quantize"]
