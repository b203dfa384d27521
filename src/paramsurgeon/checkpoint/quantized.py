"""A quantized tensor: ONE logical tensor (the weight the unquantized model holds) made of
stored parts (codes, scales, zero points, a state blob), dequantized lazily, anew each time its
values are read.

Everything that reads values (statistics, diff, health, merge) sees the logical tensor, whose
storage computes the dequantized values. The parts are held by the logical tensor, not by the
checkpoint's mapping, so a rename or a drop moves or drops every part; a writer lays them out
again under names the scheme derives from the logical name (``stored``).
"""

from __future__ import annotations

import math
from typing import Any

from ..dtypes import DType
from ..errors import PlanError
from .checkpoint import Checkpoint
from .tensor import Storage, Tensor


class Quantized(Tensor):
    """``parts`` (role -> stored tensor) of ``scheme``, read as a tensor of ``shape`` and ``dtype``.

    ``scheme`` is a quant.Scheme (``part_name``, ``dequantize``), ``params`` what it found out
    about this group ({"block": [128, 128], "bits": 8}, ...).
    """

    __slots__ = ("scheme", "parts", "params")

    def __init__(self, scheme: Any, parts: dict[str, Tensor], shape: tuple[int, ...], dtype: DType,
                 params: dict | None = None):
        super().__init__(Streamed(math.prod(shape) * dtype.itemsize, self.dequantized, lambda: scheme.pieces(self)),
                         dtype, shape)
        self.scheme, self.parts, self.params = scheme, parts, params or {}

    def dequantized(self):
        """The values: a torch tensor of ``dtype`` and ``shape``, computed from the parts."""
        return self.scheme.dequantize(self)

    def plain(self) -> Tensor:
        """A plain tensor of this one's dtype, shape and values (computed when read, a few MiB at a
        time where the scheme gives them so: ``Scheme.pieces``)."""
        return Tensor(Streamed(self.storage.nbytes, self.dequantized, lambda: self.scheme.pieces(self)), self.dtype,
                      self.shape)

    def part_names(self, name: str) -> dict[str, str]:
        """Role -> the name each part is stored under when the logical tensor is called ``name``."""
        return {role: self.scheme.part_name(name, role) for role in self.parts}

    @property
    def no_values(self) -> str | None:
        """Why the values cannot be read (a type nothing here dequantizes: 'type Q8_1, which the
        gguf package cannot dequantize'), or None."""
        why = getattr(self.scheme, "no_values", None)
        return why(self) if why is not None else None

    @property
    def stored_nbytes(self) -> int:
        """The bytes the parts take in the file."""
        return sum(part.nbytes for part in self.parts.values())

    def __repr__(self) -> str:
        return f"Quantized({list(self.shape)}, {self.scheme.name}, {self.dtype.name})"


class Streamed(Storage):
    """Values computed when read that a writer or a reduction may also take a few MiB at a time:
    ``pieces()`` gives them in row-major order (contiguous torch tensors), or None when they come whole."""

    __slots__ = ("pieces",)

    def __init__(self, nbytes: int, loader, pieces):
        super().__init__(nbytes, loader=loader)
        self.pieces = pieces


def stored(container: dict) -> dict | None:
    """``container`` with each quantized tensor laid out as its stored parts, where the tensor
    stood (order kept); None when it holds no quantized tensor."""
    if not any(isinstance(value, Quantized) for value in container.values()):
        return None
    laid_out: dict = {}
    for name, value in container.items():
        if isinstance(value, Quantized):
            for role, part_name in value.part_names(name).items():
                laid_out[part_name] = value.parts[role]
        else:
            laid_out[name] = value
    return laid_out


def refuse_valueless(tensors: dict[str, Tensor], names: list[str], doing: str) -> None:
    """Refuse, all at once and each by name, the tensors among ``names`` whose values cannot be
    read (``doing`` needs them); they are left out with -x."""
    found = [(n, tensors[n].no_values) for n in names if getattr(tensors[n], "no_values", None)]
    if found:
        shown = ", ".join(f"'{n}' ({why})" for n, why in found[:6]) + (f" and {len(found) - 6} more" if len(found) > 6
                                                                       else "")
        raise PlanError(f"{doing}: cannot read the values of {shown}; leave {'it' if len(found) == 1 else 'them'}"
                        f" out with -x {found[0][0]}")


def refuse_partial(ckpt: Checkpoint, names: list[str], command: str) -> None:
    """A PlanError naming each group among ``names`` whose stored parts do not make one."""
    chosen = set(names)
    broken = [f"{', '.join(parts)} ({why}, {scheme})" for scheme, parts, why in ckpt.partial
              if any(n in chosen for n in parts)]
    if broken:
        raise PlanError(f"{command}: {'; '.join(broken)}: a quantized weight without all of its parts cannot be"
                        " read as values; drop the parts (drop -p NAME) or restore the missing ones")
