"""Codes to floats. torch converts float8 to float32 one value at a time (3.7 ns a value on one
core here, most of a float8 checkpoint's dequantize and statistics); a float8 code is one of 256
values, so a gather from a 256-entry table made by torch's own conversion gives the same values,
NaN included, in a sixth of the time."""

from __future__ import annotations

from functools import cache
from typing import Any


def widen(codes: Any, dtype: Any) -> Any:
    """``codes`` as a new tensor of ``dtype``."""
    import torch

    if not _is_float8(codes):
        return codes.to(dtype)
    return torch.index_select(_table(codes.dtype, dtype), 0, _index(codes)).view(codes.shape)


def widen_into(out: Any, codes: Any) -> Any:
    """Write ``codes`` into ``out`` (contiguous, of their shape) as ``out``'s dtype; return ``out``."""
    import torch

    if not _is_float8(codes):
        return out.copy_(codes)
    torch.index_select(_table(codes.dtype, out.dtype), 0, _index(codes), out=out.view(-1))
    return out


def _is_float8(codes: Any) -> bool:
    return codes.dtype.is_floating_point and codes.element_size() == 1


def _index(codes: Any) -> Any:
    import torch

    return codes.reshape(-1).view(torch.uint8).to(torch.int32)


@cache
def _table(code_dtype: Any, dtype: Any) -> Any:
    import torch

    return torch.arange(256, dtype=torch.uint8).view(code_dtype).to(dtype)
