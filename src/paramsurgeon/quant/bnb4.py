"""bitsandbytes 4-bit (``nf4``, ``fp4``): ``x.weight`` holds two 4-bit codes a byte (high nibble
first) over the flattened weight, ``x.weight.absmax`` one scale per ``blocksize`` values,
``x.weight.quant_map`` the 16 values a code stands for, and ``x.weight.quant_state.bitsandbytes__nf4``
a JSON blob (as uint8) with the shape, blocksize and dtype. With double quantization the absmax
is itself 8-bit codes of ``nested_quant_map``, one ``nested_absmax`` per ``nested_blocksize``, plus
``nested_offset``. A value is quant_map[code] * absmax of its block in float32, as
``bitsandbytes.functional.dequantize_4bit`` computes it on the CPU, then rounded to the dtype."""

from __future__ import annotations

import json
import math

from . import tiles
from .base import Group, Partial, Scheme

STATE = ".quant_state.bitsandbytes__"
TABLES = {"absmax": ".absmax", "quant_map": ".quant_map", "nested_absmax": ".nested_absmax",
          "nested_quant_map": ".nested_quant_map"}
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
DTYPES = ("float32", "bfloat16", "float16")


class Bnb4(Scheme):
    roles = ("codes", *TABLES, "state")
    methods = ("bitsandbytes",)
    per_weight = ("nested_offset",)  # the mean of its absmax, in its quant_state blob

    def __init__(self, quant_type: str, orphans: bool = False):
        self.name, self.orphans = quant_type, orphans  # orphans: name the tables no blob goes with (once)
        self.markers = ("absmax", "quant_map", "bitsandbytes__" + quant_type)

    def part_name(self, name, role):
        return name + {"codes": "", "state": STATE + self.name, **TABLES}[role]

    def find(self, tensors, config):
        if config.get("quant_method", "bitsandbytes") != "bitsandbytes":
            return
        suffix, named = STATE + self.name, set()
        for stored in tensors:
            if stored.endswith(suffix):
                yield self._group(stored[:-len(suffix)], tensors)
            elif self.orphans and stored.endswith((".absmax", ".quant_map")):
                name = stored.rpartition(".")[0]
                if name not in named and not any(name + STATE + kind in tensors for kind in ("nf4", "fp4")):
                    named.add(name)
                    yield Partial(_present(name, tensors, None), f"bitsandbytes 4-bit parts of {name} without their"
                                  f" quant_state blob ({name}{STATE}nf4 or fp4)")

    def _group(self, name, tensors):
        present = _present(name, tensors, self.name)
        state, why = _state(tensors[name + STATE + self.name], self.name)
        if state is None:
            return Partial(present, f"{name}{STATE}{self.name}: {why}")
        nested = "nested_blocksize" in state
        wanted = ["codes", "absmax", "quant_map"] + (["nested_absmax", "nested_quant_map"] if nested else [])
        parts = {role: self.part_name(name, role) for role in wanted}
        missing = [parts[role] for role in wanted if parts[role] not in tensors]
        if missing:
            return Partial(present, f"a {self.name} weight without its {', '.join(missing)}")
        numel = math.prod(state["shape"])
        blocks = math.ceil(numel / state["blocksize"])
        problem = _misfit(tensors, parts, numel, blocks, state)
        if problem:
            return Partial(present, problem)
        extra = [n for n in present if n not in parts.values() and not n.endswith(STATE + self.name)]
        if extra:
            return Partial(present, f"{', '.join(extra)}: double quantization its quant_state does not declare")
        parts["state"] = name + STATE + self.name
        kept = {key: value for key, value in state.items() if key not in ("shape", "quant_type")}
        params = {"bits": 4, "block": [state["blocksize"]], **kept}
        return Group(name, parts, tuple(state["shape"]), params)

    def dequantize(self, tensor):
        import torch

        from ..checkpoint.values import to_torch
        from ..dtypes import torch_dtype

        p = tensor.params
        absmax = to_torch(tensor.parts["absmax"])
        if "nested_blocksize" in p:  # dequantize_blockwise of the absmax codes, plus the offset
            absmax = _blockwise(to_torch(tensor.parts["nested_quant_map"]), absmax,
                                to_torch(tensor.parts["nested_absmax"]), p["nested_blocksize"])
            absmax = absmax.to(getattr(torch, p["nested_dtype"]))
            absmax += torch.tensor(float(p["nested_offset"]))
        table = to_torch(tensor.parts["quant_map"]).float()
        codes = to_torch(tensor.parts["codes"]).contiguous().view(torch.uint8).reshape(-1)
        out = torch.empty(tensor.shape, dtype=torch_dtype(tensor.dtype))
        flat, stored = out.view(-1), getattr(torch, p["dtype"])
        step = max(1, tiles.ELEMENTS // p["blocksize"]) * p["blocksize"]  # whole blocks at a time
        for start in range(0, flat.numel(), step):
            stop = min(start + step, flat.numel())
            pairs = codes[start // 2:(stop + 1) // 2]
            nibbles = torch.stack((pairs >> 4, pairs & 0xF), dim=1).reshape(-1)[:stop - start]
            flat[start:stop] = _blockwise(table, nibbles, absmax[start // p["blocksize"]:], p["blocksize"]).to(stored)
        return out


def _blockwise(table, codes, absmax, blocksize: int):
    """table[code] * the absmax of its block of ``blocksize`` codes, in float32 (the last block partial)."""
    values = table.float()[codes.reshape(-1).long()]
    scale = absmax.float()[:math.ceil(values.numel() / blocksize)].repeat_interleave(blocksize)[:values.numel()]
    return values * scale


def _state(blob, quant_type: str) -> tuple[dict | None, str]:
    """The quant state a blob holds (blocksize, dtype, shape, nested_*), or None and why it cannot be read."""
    from ..checkpoint.values import contiguous_memory

    if blob.dtype.name != "uint8" or len(blob.shape) != 1:
        return None, f"a {blob.dtype} {list(blob.shape)} tensor, not the 1-D uint8 bytes of a JSON quant state"
    try:
        state = json.loads(bytes(contiguous_memory(blob)).decode())
    except (UnicodeDecodeError, ValueError):
        return None, "not valid JSON"
    shape = state.get("shape") if isinstance(state, dict) else None
    if not isinstance(shape, list) or not shape or not all(isinstance(n, int) and n > 0 for n in shape):
        return None, f"no shape in the quant state {json.dumps(state)[:200]}"
    found = {key: state.get(key) for key in ("quant_type", "blocksize", "dtype")}
    if found["quant_type"] != quant_type or found["blocksize"] not in BLOCKSIZES or found["dtype"] not in DTYPES:
        return None, (f"{json.dumps(found)}: expected quant_type {quant_type!r}, a blocksize of {list(BLOCKSIZES)}"
                      f" and a dtype of {list(DTYPES)}")
    found["shape"] = shape
    if "nested_blocksize" in state or "nested_offset" in state:
        nested = {"nested_blocksize": state.get("nested_blocksize"), "nested_offset": state.get("nested_offset"),
                  "nested_dtype": state.get("nested_dtype", "float32")}
        if not (isinstance(nested["nested_blocksize"], int) and nested["nested_blocksize"] > 0
                and isinstance(nested["nested_offset"], (int, float)) and nested["nested_dtype"] in DTYPES):
            return None, f"{json.dumps(nested)}: not a double quantization's blocksize, offset and dtype"
        found.update(nested)
    return found, ""


def _misfit(tensors, parts, numel, blocks, state) -> str:
    """What in the stored parts does not fit the quant state ('' when all do)."""
    codes, absmax, table = (tensors[parts[r]] for r in ("codes", "absmax", "quant_map"))
    if codes.nbytes != (numel + 1) // 2:
        return (f"{parts['codes']} holds {codes.nbytes} bytes, not the {(numel + 1) // 2} that 4-bit codes of"
                f" {state['shape']} take")
    if absmax.numel != blocks:
        return f"{parts['absmax']} has {absmax.numel} values, not one per block of {state['blocksize']} ({blocks})"
    if table.numel != 16 or not table.dtype.floating:
        return f"{parts['quant_map']} is {list(table.shape)} {table.dtype}, not the 16 values of the 4-bit codes"
    if "nested_absmax" not in parts:
        if absmax.dtype.floating:
            return ""
        return f"{parts['absmax']} is {absmax.dtype}, but no double quantization is declared"
    nested, nested_table = tensors[parts["nested_absmax"]], tensors[parts["nested_quant_map"]]
    if absmax.dtype.name != "uint8" or nested_table.numel != 256 or not nested_table.dtype.floating or \
            not nested.dtype.floating or nested.numel != math.ceil(blocks / state["nested_blocksize"]):
        return (f"the double quantization does not fit: {parts['absmax']} {absmax.dtype} (uint8 codes), "
                f"{parts['nested_quant_map']} {list(nested_table.shape)} (256 values), {parts['nested_absmax']}"
                f" {list(nested.shape)} (one per {state['nested_blocksize']} absmax codes)")
    return ""


def _present(name: str, tensors: dict, quant_type: str | None) -> list[str]:
    kinds = (quant_type,) if quant_type else ("nf4", "fp4")
    names = [name] + [name + s for s in TABLES.values()] + [name + STATE + k for k in kinds]
    return [n for n in names if n in tensors]
