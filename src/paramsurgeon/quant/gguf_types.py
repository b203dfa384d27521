"""GGUF's quantized types (Q8_0, Q4_K, ...): a tensor of one is a Quantized tensor of one stored
part, its raw blocks, read by formats/gguf.py (not found among stored tensors by names, so not in
SCHEMES). Values come from the ``gguf`` package, llama.cpp's own Python code: dequantized and
quantized a few MiB of rows at a time, so memory does not grow with the tensor."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from ..errors import PlanError
from .base import Scheme

ROWS = 1 << 22  # values worked at a time


@dataclass(frozen=True)
class Kind:
    """One GGML type: its code in the file, name, values per block and bytes per block."""

    code: int
    name: str
    block: int
    size: int


def ggml_types() -> dict[int, Kind]:
    """Every GGML type the ``gguf`` package knows, by code."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    return {t.value: Kind(t.value, t.name, *GGML_QUANT_SIZES[t]) for t in GGMLQuantizationType
            if t in GGML_QUANT_SIZES}


def _traits(name: str):
    from gguf import quants

    return quants._type_traits.get(quants.GGMLQuantizationType[name])


def can_dequantize(name: str) -> bool:
    """Whether ``gguf`` dequantizes type ``name``."""
    return _traits(name) is not None


def can_quantize(name: str) -> bool:
    """Whether ``gguf`` quantizes type ``name`` (in Python: Q4_0, Q8_0, ... but no K-quant)."""
    traits = _traits(name)
    return traits is not None and "quantize_blocks" in vars(traits)


def no_values(name: str) -> str:
    """Why a tensor of type ``name`` has no values."""
    return f"no values: type {name}, which the gguf package cannot dequantize"


class GgufType(Scheme):
    """A tensor of a GGUF quantized type; its params say which ({"gguf_type": "Q4_K"})."""

    name = "gguf"
    roles = ("blocks",)
    quantizes = True

    def part_name(self, name, role):
        return name

    def find(self, tensors, config):
        return iter(())

    def dequantize(self, tensor):
        import numpy as np
        import torch
        from gguf import quants

        from ..dtypes import torch_dtype

        kind = tensor.params["gguf_type"]
        if not can_dequantize(kind):
            raise PlanError(f"{no_values(kind)}; leave such tensors out with -x NAME")
        qtype = quants.GGMLQuantizationType[kind]
        row = tensor.shape[-1]
        blocks = np.frombuffer(tensor.parts["blocks"].storage.view(), dtype=np.uint8)
        blocks = blocks.reshape(-1, blocks.size // max(tensor.numel // row, 1)) if tensor.numel else blocks
        out = torch.empty((tensor.numel // row if row else 0, row), dtype=torch_dtype(tensor.dtype))
        step = max(1, ROWS // max(row, 1))
        for start in range(0, out.shape[0], step):
            out[start:start + step] = torch.from_numpy(quants.dequantize(blocks[start:start + step], qtype))
        return out.reshape(tensor.shape)

    def quantize(self, values, params):
        import torch

        return {"blocks": torch.cat([torch.frombuffer(bytearray(piece), dtype=torch.uint8)
                                     for piece in quantized_rows(values, params["gguf_type"])])}


def quantized_rows(values, kind: str) -> Iterator[bytes]:
    """The blocks of type ``kind`` storing ``values`` (a torch tensor), a few MiB of rows at a time."""
    from gguf import quants

    qtype = quants.GGMLQuantizationType[kind]
    rows = values.reshape(-1, values.shape[-1]) if values.dim() else values.reshape(1, 1)
    step = max(1, ROWS // max(rows.shape[1], 1))
    for start in range(0, rows.shape[0], step):
        yield quants.quantize(rows[start:start + step].float().numpy(), qtype).tobytes()


GGUF = GgufType()
