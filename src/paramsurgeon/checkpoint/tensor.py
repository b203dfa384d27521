"""The lazy tensor: a view (offset, shape, stride, dtype) into a ``Storage``, which is a span
of an input file or new values held in memory. Nothing here imports torch or reads data
until asked; tensors that share a storage over overlapping bytes are tied.
"""

from __future__ import annotations

import ctypes
import math
from collections import Counter
from operator import attrgetter
from typing import Iterator

from ..dtypes import DType
from ..errors import CorruptCheckpointError
from ..sizes import plural

BLOCK = 64 << 20  # bytes per piece when raw bytes are checksummed or compared


class Storage:
    """The bytes behind one or more tensors.

    Either ``nbytes`` bytes of ``file`` starting at ``offset`` (``crc32`` known when the
    file recorded it); or ``values`` made by an operation: a contiguous torch tensor, or a
    bytearray when no computation was needed (zeros); or a ``loader`` that reads or computes
    the values (either kind) each time they are needed: chunks a format cannot memory-map,
    an operation's new values.
    """

    __slots__ = ("nbytes", "file", "offset", "crc32", "values", "loader", "location")

    def __init__(self, nbytes: int, *, file=None, offset: int = 0, crc32: int | None = None,
                 values=None, loader=None, location: str = "cpu"):
        self.nbytes, self.file, self.offset = nbytes, file, offset
        self.crc32, self.values, self.loader, self.location = crc32, values, loader, location

    def __setstate__(self, state):
        raise CorruptCheckpointError("a pickle tried to overwrite a storage")

    @property
    def readable(self) -> bool:
        """Whether the bytes exist (a rehearsal's stand-in for values yet to be computed has none)."""
        return self.file is not None or self.values is not None or self.loader is not None

    @property
    def in_memory(self) -> bool:
        """Whether the bytes are not a span of an input file (and so must be written out, not copied)."""
        return self.file is None

    def view(self) -> memoryview:
        """The storage's bytes (without copying, unless a loader must read them)."""
        values = self.values if self.values is not None or self.loader is None else self.loader()
        if isinstance(values, bytearray):
            return memoryview(values)
        if values is not None:
            return memory_of(values.contiguous())
        return self.file.view(self.offset, self.nbytes)


class Tensor:
    """A lazy tensor: ``shape`` and ``stride`` (in elements) into ``storage`` at ``offset``.

    ``requires_grad``, ``parameter`` and ``metadata`` are kept only so that a
    torch output pickles the tensor exactly as the input did.
    """

    __slots__ = ("storage", "offset", "shape", "_stride", "dtype", "numel", "nbytes", "requires_grad", "parameter",
                 "metadata")

    def __init__(self, storage: Storage, dtype: DType, shape: tuple[int, ...],
                 stride: tuple[int, ...] | None = None, offset: int = 0):
        self.storage, self.dtype, self.offset = storage, dtype, offset
        self.shape = shape if type(shape) is tuple else tuple(shape)
        self._stride = tuple(stride) if stride is not None else None  # None: contiguous, computed when asked
        self.numel = math.prod(self.shape)
        self.nbytes = self.numel * dtype.itemsize
        self.requires_grad, self.parameter, self.metadata = False, False, None

    def __setstate__(self, state):
        raise CorruptCheckpointError("a pickle tried to overwrite a tensor")

    @property
    def stride(self) -> tuple[int, ...]:
        """Steps in elements along each dimension."""
        return self._stride if self._stride is not None else contiguous_stride(self.shape)

    @property
    def is_contiguous(self) -> bool:
        if self._stride is None:
            return True
        return all(s == c for s, c, n in zip(self._stride, contiguous_stride(self.shape), self.shape)
                   if n != 1)

    def byte_span(self) -> tuple[int, int]:
        """The half-open byte range of the storage this tensor reads."""
        if self._stride is None or self.numel == 0:
            start = self.offset * self.dtype.itemsize
            return start, start + self.nbytes
        last = self.offset + sum((n - 1) * s for n, s in zip(self.shape, self.stride))
        return self.offset * self.dtype.itemsize, (last + 1) * self.dtype.itemsize

    def contiguous_bytes(self) -> memoryview | None:
        """The tensor's values in row-major order without copying, or None if not contiguous."""
        if not self.is_contiguous:
            return None
        start = self.offset * self.dtype.itemsize
        return self.storage.view()[start:start + self.nbytes]

    def __repr__(self) -> str:
        return f"Tensor({list(self.shape)}, {self.dtype.name})"


def file_spans(file, offsets: list[int], sizes: list[int], dtypes: list[DType], shapes: list[tuple[int, ...]],
               numels: list[int]) -> list[Tensor]:
    """Contiguous tensors over spans of ``file``, each with a storage of its own, as
    ``Tensor(Storage(size, file=file, offset=offset), dtype, shape)`` makes them; the caller
    has checked that each size is numel times the dtype's itemsize. For headers of 100,000
    entries: filled in without either ``__init__`` (a third of the time)."""
    new, made = object.__new__, []
    add = made.append
    for offset, size, dtype, shape, numel in zip(offsets, sizes, dtypes, shapes, numels):
        storage = new(Storage)
        storage.nbytes, storage.file, storage.offset, storage.crc32 = size, file, offset, None
        storage.values, storage.loader, storage.location = None, None, "cpu"
        tensor = new(Tensor)
        tensor.storage, tensor.dtype, tensor.offset, tensor.shape, tensor._stride = storage, dtype, 0, shape, None
        tensor.numel, tensor.nbytes, tensor.requires_grad, tensor.parameter, tensor.metadata = numel, size, False, False, None
        add(tensor)
    return made


def contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, step = [], 1
    for n in reversed(shape):
        stride.append(step)
        step *= max(n, 1)
    return tuple(reversed(stride))


def check_view(tensor: Tensor, storage_numel: int, where: str) -> None:
    """Refuse a tensor whose view reads outside its storage (a corrupt or hostile file)."""
    if any(n < 0 for n in tensor.shape) or any(s < 0 for s in tensor.stride) or tensor.offset < 0:
        raise CorruptCheckpointError(f"{where}: negative size, stride or offset")
    start, end = tensor.byte_span()
    if tensor.numel and end > storage_numel * tensor.dtype.itemsize:
        raise CorruptCheckpointError(
            f"{where}: shape {list(tensor.shape)} at offset {tensor.offset} reads past its storage"
            f" of {plural(storage_numel, 'element')}")


def view_key(tensor: Tensor) -> tuple:
    """Equal for two tensors exactly when they are one view of one storage (aliases: one value)."""
    return id(tensor.storage), tensor.offset, tensor.shape, tensor.stride, tensor.dtype


def tie_groups(tensors: dict[str, Tensor]) -> list[list[str]]:
    """Group names whose tensors read overlapping bytes of one storage."""
    if len(set(map(id, map(_STORAGE, tensors.values())))) == len(tensors):
        return []  # every storage has one tensor (the common case, told in one pass in C)
    counts = Counter(id(t.storage) for t in tensors.values())
    by_storage: dict[int, list[str]] = {}
    for name, tensor in tensors.items():
        if counts[id(tensor.storage)] > 1:
            by_storage.setdefault(id(tensor.storage), []).append(name)
    order = {name: i for i, name in enumerate(tensors)}
    groups = []
    for names in by_storage.values():
        spans = sorted(names, key=lambda n: tensors[n].byte_span())
        current, previous = [spans[0]], tensors[spans[0]].byte_span()
        end = previous[1]
        for name in spans[1:]:
            span = tensors[name].byte_span()
            if span[0] < end or span == previous:
                current.append(name)
                end = max(end, span[1])
            else:
                groups.append(current)
                current, end = [name], span[1]
            previous = span
        groups.append(current)
    groups = [sorted(g, key=order.__getitem__) for g in groups if len(g) > 1]
    return sorted(groups, key=lambda g: order[g[0]])


_STORAGE = attrgetter("storage")


def memory_of(values) -> memoryview:
    """The bytes of a contiguous CPU torch tensor, without copying (and without importing torch)."""
    nbytes = values.numel() * values.element_size()
    if nbytes == 0:
        return memoryview(b"")
    buffer = (ctypes.c_char * nbytes).from_address(values.data_ptr())
    buffer._owner = values  # keep the tensor alive as long as the view
    return memoryview(buffer).cast("B")


def blocks(view: memoryview, size: int = BLOCK) -> Iterator[memoryview]:
    """``view`` in consecutive slices of at most ``size`` bytes (for checksums and comparisons)."""
    for start in range(0, len(view), size):
        yield view[start:start + size]
