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


# (code, name, values per block, bytes per block) of each GGML type, as gguf 0.19's GGML_QUANT_SIZES
# gives them (tests/test_gguf.py holds them equal): the header is read without importing gguf and numpy
TYPES = (
    (0, "F32", 1, 4), (1, "F16", 1, 2), (2, "Q4_0", 32, 18), (3, "Q4_1", 32, 20), (6, "Q5_0", 32, 22),
    (7, "Q5_1", 32, 24), (8, "Q8_0", 32, 34), (9, "Q8_1", 32, 40), (10, "Q2_K", 256, 84), (11, "Q3_K", 256, 110),
    (12, "Q4_K", 256, 144), (13, "Q5_K", 256, 176), (14, "Q6_K", 256, 210), (15, "Q8_K", 256, 292),
    (16, "IQ2_XXS", 256, 66), (17, "IQ2_XS", 256, 74), (18, "IQ3_XXS", 256, 98), (19, "IQ1_S", 256, 50),
    (20, "IQ4_NL", 32, 18), (21, "IQ3_S", 256, 110), (22, "IQ2_S", 256, 82), (23, "IQ4_XS", 256, 136),
    (24, "I8", 1, 1), (25, "I16", 1, 2), (26, "I32", 1, 4), (27, "I64", 1, 8), (28, "F64", 1, 8),
    (29, "IQ1_M", 256, 56), (30, "BF16", 1, 2), (34, "TQ1_0", 256, 54), (35, "TQ2_0", 256, 66),
    (39, "MXFP4", 32, 17), (40, "NVFP4", 64, 36), (41, "Q1_0", 128, 18),
)
_KINDS = {code: Kind(code, name, block, size) for code, name, block, size in TYPES}
BY_NAME = {kind.name: kind for kind in _KINDS.values()}


def kind_of(code: int) -> Kind | None:
    """The GGML type of ``code``: from the table, else from the installed gguf package (a newer one
    may know more), else None."""
    found = _KINDS.get(code)
    if found is None:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        try:
            kind = GGMLQuantizationType(code)
        except ValueError:
            return None
        if kind not in GGML_QUANT_SIZES:
            return None
        found = _KINDS[code] = Kind(code, kind.name, *GGML_QUANT_SIZES[kind])
        BY_NAME[kind.name] = found
    return found


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
    return f"type {name}, which the gguf package cannot dequantize"


class GgufType(Scheme):
    """A tensor of a GGUF quantized type; its params say which ({"gguf_type": "Q4_K"})."""

    name = "gguf"
    native = True
    roles = ("blocks",)
    quantizes = True

    def part_name(self, name, role):
        return name

    def find(self, tensors, config):
        return iter(())

    def no_values(self, tensor) -> str | None:
        """Why ``tensor`` has no values to read (its type is one gguf cannot dequantize), or None."""
        kind = tensor.params["gguf_type"]
        return None if can_dequantize(kind) else no_values(kind)

    def dequantize(self, tensor):
        import torch

        from ..dtypes import torch_dtype

        row = tensor.shape[-1]
        out = torch.empty((tensor.numel // row if row else 0, row), dtype=torch_dtype(tensor.dtype))
        start = 0
        for piece in dequantized_rows(tensor):
            out[start:start + piece.shape[0]] = piece
            start += piece.shape[0]
        return out.reshape(tensor.shape)

    def pieces(self, tensor):
        return (piece.contiguous() for piece in dequantized_rows(tensor))

    def quantize(self, values, params):
        import torch

        return {"blocks": torch.cat([torch.frombuffer(bytearray(piece), dtype=torch.uint8)
                                     for piece in quantized_rows(values.float().numpy(), params["gguf_type"])])}


def dequantized_rows(tensor) -> Iterator:
    """The values of ``tensor`` (a Quantized tensor of this scheme) in its dtype, a few MiB of rows
    at a time (torch tensors of [rows, row length])."""
    import numpy as np
    import torch
    from gguf import quants

    from ..dtypes import torch_dtype

    kind = tensor.params["gguf_type"]
    if not can_dequantize(kind):
        raise PlanError(f"no values: {no_values(kind)}; leave such tensors out with -x NAME")
    qtype, dtype = quants.GGMLQuantizationType[kind], torch_dtype(tensor.dtype)
    row = tensor.shape[-1]
    rows = tensor.numel // row if row else 0
    if not rows:
        return
    blocks = np.frombuffer(tensor.parts["blocks"].storage.view(), dtype=np.uint8).reshape(rows, -1)
    step = max(1, ROWS // row)
    for start in range(0, rows, step):
        yield torch.from_numpy(quants.dequantize(blocks[start:start + step], qtype)).to(dtype)


def quantized_rows(values, kind: str) -> Iterator[bytes]:
    """The blocks of type ``kind`` storing ``values`` (a float32 numpy array), a few MiB of rows at a
    time; rows of +0.0 (a zeroed tensor) are the blocks of one such row, quantized once."""
    import numpy as np
    from gguf import quants

    qtype = quants.GGMLQuantizationType[kind]
    rows = values.reshape(-1, values.shape[-1]) if values.ndim else values.reshape(1, 1)
    step = max(1, ROWS // max(rows.shape[1], 1))
    zero_row = None
    for start in range(0, rows.shape[0], step):
        piece = rows[start:start + step]
        if piece.view(np.uint32).any():  # a bit set: not +0.0 (-0.0 is quantized to other blocks)
            yield quants.quantize(piece, qtype).tobytes()
            continue
        if zero_row is None:
            zero_row = quants.quantize(piece[:1], qtype).tobytes()
        yield zero_row * len(piece)


GGUF = GgufType()
