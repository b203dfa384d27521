"""The bridge to torch: lazy tensors become torch tensors over the memory-mapped file,
and new torch values become in-memory storages. The only core module that imports torch.
"""

from __future__ import annotations

import ctypes

import torch

from .checkpoint import Storage, Tensor
from . import dtypes


def to_torch(tensor: Tensor) -> torch.Tensor:
    """A torch view of ``tensor``'s values, without copying them out of the file when possible."""
    dtype = dtypes.torch_dtype(tensor.dtype)
    if tensor.numel == 0:
        return torch.empty(tensor.shape, dtype=dtype)
    storage = tensor.storage
    if isinstance(storage.values, bytearray):
        base = torch.frombuffer(storage.values, dtype=torch.uint8).view(dtype)
    elif storage.values is not None or storage.loader is not None:
        values = storage.values if storage.values is not None else storage.loader().contiguous()
        base = values.reshape(-1).view(torch.uint8).view(dtype)
    else:
        raw = storage.view()
        base = torch.frombuffer(raw, dtype=torch.uint8)
        aligned = base.data_ptr() % tensor.dtype.itemsize == 0
        base = (base if aligned else base.clone()).view(dtype)
    return base.as_strided(tensor.shape, tensor.stride, tensor.offset)


def from_torch(values: torch.Tensor, location: str = "cpu") -> Tensor:
    """A lazy Tensor holding ``values`` (copied into a fresh contiguous storage)."""
    values = values.detach().to("cpu").contiguous().clone()
    storage = Storage(values.numel() * values.element_size(), values=values, location=location)
    return Tensor(storage, dtypes.from_torch(values.dtype), tuple(values.shape))


def memory_of(values: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without copying."""
    nbytes = values.numel() * values.element_size()
    if nbytes == 0:
        return memoryview(b"")
    buffer = (ctypes.c_char * nbytes).from_address(values.data_ptr())
    buffer._owner = values  # keep the tensor alive as long as the view
    return memoryview(buffer).cast("B")


def contiguous_memory(tensor: Tensor) -> memoryview:
    """The values of ``tensor`` in row-major order (a copy only when it is not contiguous)."""
    return memory_of(to_torch(tensor).contiguous())
