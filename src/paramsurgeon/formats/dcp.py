"""torch.distributed.checkpoint (DCP) directories, as FSDP training writes them.

Reading: the ``.metadata`` pickle is parsed by our restricted unpickler (DCP's own reader
calls ``pickle.load`` on it, which would run code from a hostile file); it gives every
name, shape and dtype without torch. Non-tensor entries are small torch.save blobs, read
by our torch reader. Tensor values are loaded through DCP itself (which reassembles the
chunks of sharded tensors), one tensor at a time, only when needed.

Writing goes through ``dcp.save`` without a process group; DCP needs every tensor at
once, handed to it as views of the memory-mapped input.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any

from .. import dtypes
from ..checkpoint import Checkpoint, Storage, Tensor
from ..errors import CorruptCheckpointError, NotACheckpointError, OutputError
from . import pickles
from .atomic import atomic_directory
from .files import InputFile

_DCP = "torch.distributed.checkpoint"
METADATA_GLOBALS = frozenset({
    f"{_DCP}.metadata.{name}" for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {f"{_DCP}.filesystem._StorageInfo", "pathlib.PosixPath", "pathlib.PurePosixPath", "pathlib.WindowsPath",
     "pathlib.PureWindowsPath"})


def is_dcp(path: str) -> bool:
    return os.path.isfile(os.path.join(path, ".metadata"))


def _fields(node: Any) -> dict:
    """The attributes of a dataclass instance read from a pickle (state dict, or slots)."""
    state = node.state if isinstance(node, pickles.Opaque) else None
    if isinstance(state, tuple) and len(state) == 2 and all(isinstance(s, (dict, type(None))) for s in state):
        state = {**(state[0] or {}), **(state[1] or {})}
    return state if isinstance(state, dict) else {}


def _kind(node: Any) -> str:
    return type(node).full_name.rpartition(".")[2] if isinstance(node, pickles.Opaque) else type(node).__name__


def read(folder: str, *, allow: frozenset[str], unsafe: bool) -> Checkpoint:
    """Read a DCP directory's structure; tensor values stay on disk until needed."""
    path = os.path.join(folder, ".metadata")
    with open(path, "rb") as f:
        data = f.read()
    metadata = pickles.unpickle(data, path, persistent_load=_no_storage(path), interpret={},
                                allow=allow | METADATA_GLOBALS, unsafe=unsafe)
    fields = _fields(metadata)
    entries, layout = fields.get("state_dict_metadata"), fields.get("planner_data") or {}
    storage_data = {(_fields(k).get("fqn")): v for k, v in (fields.get("storage_data") or {}).items()}
    if _kind(metadata) != "Metadata" or not isinstance(entries, dict):
        raise CorruptCheckpointError(f"{path}: not the metadata of a torch.distributed.checkpoint")
    flat: dict[str, Any] = {}
    for fqn, entry in entries.items():
        if _kind(entry) == "TensorStorageMetadata":
            flat[fqn] = _lazy_tensor(folder, fqn, _fields(entry), path)
        elif _kind(entry) == "BytesStorageMetadata":
            flat[fqn] = _read_bytes(folder, fqn, _fields(storage_data.get(fqn)), allow, unsafe)
        else:
            raise CorruptCheckpointError(f"{path}: unknown entry type for '{fqn}'")
    return Checkpoint(source=folder, format="dcp", root=_unflatten(flat, layout))


def _no_storage(source: str):
    def refuse(pid):
        raise CorruptCheckpointError(f"{source}: unexpected storage reference")
    return refuse


def _lazy_tensor(folder: str, fqn: str, entry: dict, where: str) -> Tensor:
    properties = entry.get("properties")
    state = properties.state if isinstance(properties, pickles.Opaque) else None
    # TensorProperties pickles as a tuple (dtype, layout, requires_grad, memory_format, pin_memory)
    dtype = state[0] if isinstance(state, tuple) and state else _fields(properties).get("dtype")
    dtype_name = getattr(dtype, "full_name", "").removeprefix("torch.")
    size = entry.get("size")
    shape = size.args[0] if isinstance(size, pickles.Opaque) and size.args else size
    if dtype_name not in dtypes.BY_NAME or not isinstance(shape, (list, tuple)) \
            or not all(isinstance(n, int) and n >= 0 for n in shape):
        raise CorruptCheckpointError(f"{where}: tensor '{fqn}' has an unreadable dtype or size")
    dtype = dtypes.BY_NAME[dtype_name]
    shape = tuple(shape)
    return Tensor(Storage(math.prod(shape) * dtype.itemsize, loader=lambda: _load(folder, fqn, shape, dtype)),
                  dtype, shape)


def _load(folder: str, fqn: str, shape: tuple, dtype):
    """One tensor's values, through DCP (which reassembles a sharded tensor's chunks)."""
    import torch
    import torch.distributed.checkpoint as dcp

    target = {fqn: torch.empty(shape, dtype=dtypes.torch_dtype(dtype))}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to load in a single process"
        dcp.load(target, storage_reader=dcp.FileSystemReader(folder),
                 planner=dcp.DefaultLoadPlanner(allow_partial_load=True))
    return target[fqn]


def _read_bytes(folder: str, fqn: str, info: dict, allow: frozenset[str], unsafe: bool) -> Any:
    """A non-tensor entry: a torch.save blob inside a .distcp file, read by our own reader."""
    from . import torchzip

    relative, offset, length = info.get("relative_path"), info.get("offset"), info.get("length")
    if not (isinstance(relative, str) and isinstance(offset, int) and isinstance(length, int)) \
            or os.path.isabs(relative) or ".." in relative.split("/"):
        raise CorruptCheckpointError(f"{folder}: entry '{fqn}' has no valid location")
    if info.get("transform_descriptors"):
        raise NotACheckpointError(f"{folder}: entry '{fqn}' is stored transformed (compressed), which this"
                                  " version cannot read")
    with open(os.path.join(folder, relative), "rb") as f:
        f.seek(offset)
        blob = f.read(length)
    if len(blob) != length:
        raise CorruptCheckpointError(f"{folder}: truncated: entry '{fqn}' ends past the end of {relative}")
    fd = os.memfd_create("paramsurgeon-dcp-entry")
    os.write(fd, blob)
    return torchzip.read(InputFile(fd, f"{folder}/{relative}[{fqn}]"), allow=allow, unsafe=unsafe).root


def _unflatten(flat: dict[str, Any], layout: dict) -> dict:
    """Nested dicts and lists again, from DCP's flat names and their recorded paths."""
    root: dict = {}
    for fqn, value in flat.items():
        path = layout.get(fqn, (fqn,))
        path = tuple(path) if isinstance(path, (list, tuple)) and path else (fqn,)
        node: Any = root
        for part, following in zip(path, path[1:]):
            child = [] if isinstance(following, int) else {}
            if isinstance(node, list):
                while len(node) <= part:
                    node.append(None)
                node[part] = node[part] if node[part] is not None else child
                node = node[part]
            else:
                node = node.setdefault(part, child)
        if isinstance(node, list):
            while len(node) <= path[-1]:
                node.append(None)
        node[path[-1]] = value
    return root


class Writer:
    """A DCP directory written by dcp.save, replaced as a whole (atomic.atomic_directory);
    files beside the checkpoint in the old directory are carried over."""

    def __init__(self, folder: str):
        self.folder = folder

    def write(self, ckpt: Checkpoint) -> None:
        """Save ``ckpt`` (every entry of the file) as a DCP directory."""
        import torch.distributed.checkpoint as dcp

        try:
            state = _materialize(ckpt.root, ckpt.source)
        except RecursionError as e:
            raise OutputError(f"{ckpt.source}: its objects nest too deeply for a DCP checkpoint;"
                              " pass --tensors-only") from e
        if os.path.isdir(self.folder) and not is_dcp(self.folder) and os.listdir(self.folder):
            raise OutputError(f"'{self.folder}' is a directory that is not a DCP checkpoint; refusing to replace it")
        with atomic_directory(self.folder, carry=lambda name: not is_own_file(name)) as staging:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
                dcp.save(state, checkpoint_id=staging)


def is_own_file(name: str) -> bool:
    """Whether a file name in a directory is part of a DCP checkpoint."""
    return name == ".metadata" or name.endswith(".distcp")


def _materialize(node: Any, source: str, seen: dict | None = None) -> Any:
    """The tree with torch tensors in place of lazy ones (views of the input where possible)."""
    from ..checkpoint.values import to_torch

    seen = {} if seen is None else seen
    if id(node) in seen:
        return seen[id(node)]
    if isinstance(node, Tensor):
        result = to_torch(node)
    elif isinstance(node, dict):
        result = seen[id(node)] = {}  # registered first: a pickle may hold cycles
        result.update((k, _materialize(v, source, seen)) for k, v in node.items())
    elif isinstance(node, list):
        result = seen[id(node)] = []
        result.extend(_materialize(v, source, seen) for v in node)
    elif isinstance(node, tuple):
        result = tuple(_materialize(v, source, seen) for v in node)
    elif isinstance(node, (pickles.Opaque, pickles.GlobalMeta)):
        raise OutputError(f"{source} holds {pickles.describe(node, 40)}, which a DCP checkpoint cannot store;"
                          " pass --tensors-only, or write a torch file")
    else:
        result = node
    seen[id(node)] = result
    return result
