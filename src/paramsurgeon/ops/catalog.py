"""Every operation by the command name that runs it (what a recipe step's op may name, besides merge)."""

from .experts import Experts
from .layers import Layers
from .lora import MergeLora
from .quantization import Dequantize, Quantize
from .reshape import Concat, Resize, Split, Transpose
from .spec import Operation
from .structure import Copy, Drop, Rename, Tie, Untie
from .values import Cast, Init, Scale, Zero

OPERATIONS: dict[str, type[Operation]] = {op.name: op for op in (Init, Zero, Scale, Cast, Copy, Tie, Untie,
                                                                   Rename, Drop, Resize, Split, Concat, Transpose,
                                                                   MergeLora, Layers, Experts, Dequantize, Quantize)}
