"""bitsandbytes 8-bit (LLM.int8): ``x.weight`` int8 [rows, columns] with ``x.SCB``, the absmax of
each row, and optionally ``x.weight_format`` (0: row-major, the only layout saved since 0.45); a
value is code * SCB of its row / 127, as ``bitsandbytes.functional.int8_vectorwise_dequant``
computes it on the CPU, then rounded to the dtype."""

from __future__ import annotations

from . import tiles
from .base import Group, Partial, Scheme

FORMATS = {0: "row", 1: "col32", 2: "col_turing", 3: "col_ampere"}


class Bnb8(Scheme):
    name = "bnb-int8"
    roles = ("codes", "SCB", "weight_format")
    markers = ("SCB",)
    methods = ("bitsandbytes",)

    def part_name(self, name, role):
        if role == "SCB":  # beside the weight, in its module: x.SCB for x.weight
            return (name[:-len("weight")] if name == "weight" or name.endswith(".weight") else name + ".") + "SCB"
        return name + ("_format" if role == "weight_format" else "")

    def find(self, tensors, config):
        if config.get("quant_method", "bitsandbytes") != "bitsandbytes":
            return
        for stored, tensor in tensors.items():
            if stored.endswith(".SCB") or stored == "SCB":
                yield self._group(stored[:-len("SCB")] + "weight", tensors)
            elif config.get("load_in_8bit") and tensor.dtype.name == "int8" and stored.endswith(".weight") \
                    and self.part_name(stored, "SCB") not in tensors:
                yield Partial([stored], "an int8 weight of a load_in_8bit checkpoint without its"
                              f" {self.part_name(stored, 'SCB')}")

    def _group(self, name, tensors):
        from ..checkpoint.values import to_torch

        parts = {role: self.part_name(name, role) for role in self.roles}
        present = [n for n in parts.values() if n in tensors]
        weight, scb, layout = (tensors.get(parts[role]) for role in self.roles)
        if weight is None:
            return Partial(present, f"{parts['SCB']} without its weight {name}")
        if weight.dtype.name != "int8" or len(weight.shape) != 2:
            return Partial(present, f"{name} is {list(weight.shape)} {weight.dtype}, not the 2-D int8 codes an SCB"
                           " goes with")
        if not scb.dtype.floating or tuple(scb.shape) != weight.shape[:1]:
            return Partial(present, f"{parts['SCB']} is {list(scb.shape)} {scb.dtype}, not one float per row of {name}"
                           f" ({weight.shape[0]})")
        if layout is not None:
            code = to_torch(layout).reshape(-1).tolist() if layout.numel == 1 else None
            if code != [0]:
                return Partial(present, f"{parts['weight_format']} is {FORMATS.get(code[0], code[0]) if code else code},"
                               " a GPU tile layout, not the row-major codes read here")
        else:
            del parts["weight_format"]
        return Group(name, parts, weight.shape, {"bits": 8, "block": [1, weight.shape[1]]})

    def dequantize(self, tensor):
        import torch

        from ..checkpoint.values import to_torch
        from ..dtypes import torch_dtype

        codes, scb = to_torch(tensor.parts["codes"]), to_torch(tensor.parts["SCB"])
        out = torch.empty(tensor.shape, dtype=torch_dtype(tensor.dtype))
        for start, stop in tiles.bands(tensor.shape):  # bitsandbytes' own expression, a band of rows at a time
            out[start:stop] = codes[start:stop] * scb[start:stop].view(-1, 1) * 7.874015718698502e-3
        return out
