"""The checkpoint model: lazy tensors by name, the rest of the file, ties, metadata.

Nothing here imports torch or reads tensor data: a ``Tensor`` is a view (offset,
shape, stride, dtype) into a ``Storage``, which is a span of an input file or new
values held in memory. Tensors that share a storage over overlapping bytes are tied.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterator

from .dtypes import DType
from .errors import CorruptCheckpointError, SelectionError


class Storage:
    """The bytes behind one or more tensors.

    Either ``nbytes`` bytes of ``file`` starting at ``offset`` (``crc32`` known when the
    file recorded it); or ``values`` made by an operation: a contiguous torch tensor, or a
    bytearray when no computation was needed (zeros); or a ``loader`` that reads the values
    (through torch) each time they are needed, for formats that cannot be memory-mapped.
    """

    __slots__ = ("nbytes", "file", "offset", "crc32", "values", "loader", "location")

    def __init__(self, nbytes: int, *, file=None, offset: int = 0, crc32: int | None = None,
                 values=None, loader=None, location: str = "cpu"):
        self.nbytes, self.file, self.offset = nbytes, file, offset
        self.crc32, self.values, self.loader, self.location = crc32, values, loader, location

    def __setstate__(self, state):
        raise CorruptCheckpointError("a pickle tried to overwrite a storage")

    @property
    def in_memory(self) -> bool:
        """Whether the bytes are not a span of an input file (and so must be written out, not copied)."""
        return self.file is None

    def view(self) -> memoryview:
        """The storage's bytes (without copying, unless a loader must read them)."""
        if isinstance(self.values, bytearray):
            return memoryview(self.values)
        if self.values is not None or self.loader is not None:
            from .tensors import memory_of

            return memory_of(self.values if self.values is not None else self.loader().contiguous())
        return self.file.view(self.offset, self.nbytes)


class Tensor:
    """A lazy tensor: ``shape`` and ``stride`` (in elements) into ``storage`` at ``offset``.

    ``requires_grad``, ``parameter`` and ``metadata`` are kept only so that a
    torch output pickles the tensor exactly as the input did.
    """

    __slots__ = ("storage", "offset", "shape", "stride", "dtype", "requires_grad", "parameter",
                 "metadata")

    def __init__(self, storage: Storage, dtype: DType, shape: tuple[int, ...],
                 stride: tuple[int, ...] | None = None, offset: int = 0):
        self.storage, self.dtype, self.offset = storage, dtype, offset
        self.shape = tuple(shape)
        self.stride = tuple(stride) if stride is not None else contiguous_stride(self.shape)
        self.requires_grad, self.parameter, self.metadata = False, False, None

    def __setstate__(self, state):
        raise CorruptCheckpointError("a pickle tried to overwrite a tensor")

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def is_contiguous(self) -> bool:
        return all(s == c for s, c, n in zip(self.stride, contiguous_stride(self.shape), self.shape)
                   if n != 1)

    def byte_span(self) -> tuple[int, int]:
        """The half-open byte range of the storage this tensor reads."""
        if self.numel == 0:
            start = self.offset * self.dtype.itemsize
            return start, start
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
            f" of {storage_numel} elements")


PREFERRED_KEYS = ("state_dict", "model", "model_state_dict", "module", "net", "network",
                  "params", "weights", "model_state")


@dataclass
class Checkpoint:
    """A checkpoint: the tensors to operate on, and everything else in the file.

    ``root`` is the whole object the file holds; ``key`` the path to ``container``, the
    mapping of names to tensors inside it (``()`` when the root itself holds them).
    """

    source: str
    format: str
    root: Any
    key: tuple = ()
    metadata: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    shards: dict[str, str] | None = None
    path: str | None = None

    @property
    def container(self) -> dict:
        return self.at(self.key)

    def at(self, path: tuple) -> Any:
        """The entry of the file at ``path`` (a tuple of keys from the root)."""
        return _at(self.root, path)

    @property
    def tensors(self) -> dict[str, Tensor]:
        """Name -> tensor, in file order."""
        return {k: v for k, v in self.container.items() if isinstance(v, Tensor)}

    @property
    def names(self) -> list[str]:
        return list(self.tensors)

    def __getitem__(self, name: str) -> Tensor:
        value = self.container.get(name)
        if not isinstance(value, Tensor):
            raise SelectionError(f"{self.source}: no tensor named '{name}'")
        return value

    def __setitem__(self, name: str, tensor: Tensor) -> None:
        self.container[name] = tensor

    def __delitem__(self, name: str) -> None:
        del self.container[name]

    def ties(self) -> list[list[str]]:
        """Groups of names whose tensors share storage bytes, in file order."""
        return tie_groups(self.tensors)

    def extra_items(self) -> Iterator[tuple[str, Any]]:
        """(dotted path, value) of everything in the file besides the named tensors."""
        node = self.root
        for depth, part in enumerate(self.key):
            for k, v in node.items():
                if k != part:
                    yield ".".join(map(str, (*self.key[:depth], k))), v
            node = node[part]
        for k, v in self.container.items():
            if not isinstance(v, Tensor):
                yield str(k), v

    def has_extras(self) -> bool:
        """Whether the file holds anything besides the named tensors."""
        return next(self.extra_items(), None) is not None


def tie_groups(tensors: dict[str, Tensor]) -> list[list[str]]:
    """Group names whose tensors read overlapping bytes of one storage."""
    by_storage: dict[int, list[str]] = {}
    for name, tensor in tensors.items():
        by_storage.setdefault(id(tensor.storage), []).append(name)
    order = {name: i for i, name in enumerate(tensors)}
    groups = []
    for names in by_storage.values():
        if len(names) < 2:
            continue
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


def find_container(root: Any, key: str | None, source: str) -> tuple[tuple, list[str]]:
    """The path to the mapping of tensors inside ``root``, and notes for the user.

    With ``key`` ('a.b', or '.' for the root itself), follow it. Otherwise, among the
    mappings that hold tensors (optimizer state aside), take the one with a well-known name,
    else the one holding most of the file's elements. Mappings of loose scalars ('best_acc1',
    'step') are not the model while a mapping with a larger tensor exists.
    """
    if key:
        return _follow_key(root, key, source), []
    candidates = [path for depth in range(4) for path in _mapping_paths(root, depth)
                  if _holds_tensors(_at(root, path))]
    if not candidates:
        raise SelectionError(f"{source}: found no mapping of names to tensors"
                             f" (top-level: {_describe_keys(root)}); pass --key to point at one")
    models = [p for p in candidates if not _loose_scalars(_at(root, p))] or candidates
    preferred = [p for p in models if p and str(p[-1]) in PREFERRED_KEYS]
    if preferred:
        models = [p for p in preferred if len(p) == len(preferred[0])]
    if len(models) > 1:
        sizes = sorted(((_elements(_at(root, p)), p) for p in models), key=lambda s: -s[0])
        if preferred or sizes[0][0] < 2 * sizes[1][0]:
            shown = ", ".join(_dotted(p) or "the top level" for p in models)
            raise SelectionError(f"{source}: several entries hold tensors ({shown}); pick one with --key,"
                                 f" e.g. --key {_dotted(models[0]) or '.'}")
        models = [sizes[0][1]]
    chosen = models[0]
    others = [p for p in candidates if p != chosen and len(p) <= max(len(chosen), 1)
              and not _loose_scalars(_at(root, p))]
    if not others:
        return chosen, []
    return chosen, [f"using '{_dotted(chosen) or '.'}'; the file also holds tensors in"
                    f" {', '.join(_dotted(p) or '. (the top level)' for p in others)} (pick with --key)"]


def _follow_key(root: Any, key: str, source: str) -> tuple:
    path, node = [], root
    for part in key.split(".") if key != "." else ():
        if isinstance(node, dict) and part in node:
            step = part
        elif isinstance(node, dict) and part.isdigit() and int(part) in node:
            step = int(part)
        elif isinstance(node, (list, tuple)) and part.isdigit() and int(part) < len(node):
            step = int(part)
        else:
            here = _dotted(tuple(path)) or "the top level"
            raise SelectionError(f"{source}: --key {key}: no entry '{part}' in {here}"
                                 f" (it has: {_describe_keys(node)})")
        path.append(step)
        node = node[step]
    if not _holds_tensors(node):
        raise SelectionError(f"{source}: --key {key} holds no tensors; pick a mapping of names to tensors")
    return tuple(path)


def _holds_tensors(node: Any) -> bool:
    return isinstance(node, dict) and any(isinstance(v, Tensor) for v in node.values()) \
        and all(isinstance(k, str) for k in node)


def _mapping_paths(root: Any, depth: int) -> Iterator[tuple]:
    """Paths ``depth`` deep to mappings inside ``root``, not into an optimizer's state."""
    if not isinstance(root, dict) or {"state", "param_groups"} <= root.keys():
        return
    if depth == 0:
        yield ()
        return
    for k, v in root.items():
        for rest in _mapping_paths(v, depth - 1):
            yield (k, *rest)


def _loose_scalars(node: dict) -> bool:
    """Whether every tensor of ``node`` holds at most one element (a step, an accuracy)."""
    return all(v.numel <= 1 for v in node.values() if isinstance(v, Tensor))


def _elements(node: dict) -> int:
    return sum(v.numel for v in node.values() if isinstance(v, Tensor))


def _at(root: Any, path: tuple) -> Any:
    for part in path:
        root = root[part]
    return root


def _dotted(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def _describe_keys(node: Any) -> str:
    if isinstance(node, dict):
        keys = [str(k) for k in list(node)[:8]]
        more = f", ... ({len(node)} in all)" if len(node) > 8 else ""
        return ", ".join(keys) + more if keys else "nothing"
    return type(node).__name__
