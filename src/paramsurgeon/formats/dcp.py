"""torch.distributed.checkpoint (DCP) directories, as FSDP training writes them.

Reading: the ``.metadata`` pickle is parsed once by our restricted unpickler (DCP's own
reader calls ``pickle.load`` on it, which would run code from a hostile file); it gives
every name, shape, dtype, chunk and where each chunk lies. Each entry is then read at its
offset in the ``.distcp`` files (dcpchunks): a tensor stored as one chunk is a span of its
file, one stored in several chunks is reassembled when its values are needed.

Writing (dcpwriter) lays the checkpoint out with DCP's own planner and writes one tensor
at a time, so memory holds one tensor, not the model.
"""

from __future__ import annotations

import math
import os
from typing import Any

from .. import dtypes
from ..checkpoint import Checkpoint, Storage, Tensor
from ..checkpoint.extras import is_optimizer_state
from ..checkpoint.opaque import Opaque, describe
from ..errors import CorruptCheckpointError
from . import dcpchunks, dcpwriter, pickles
from .atomic import atomic_directory, new_file
from .inputs import Inputs

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
    state = node.state if isinstance(node, Opaque) else None
    if isinstance(state, tuple) and len(state) == 2 and all(isinstance(s, (dict, type(None))) for s in state):
        state = {**(state[0] or {}), **(state[1] or {})}
    return state if isinstance(state, dict) else {}


def _kind(node: Any) -> str:
    return type(node).full_name.rpartition(".")[2] if isinstance(node, Opaque) else type(node).__name__


def read(folder: str, *, allow: frozenset[str], unsafe: bool) -> Checkpoint:
    """Read a DCP directory's structure: ``.metadata`` once, then each entry's zip records and
    pickle by its offset in the ``.distcp`` files; tensor values stay on disk until needed."""
    path = os.path.join(folder, ".metadata")
    with open(path, "rb") as f:
        data = f.read()
    metadata = pickles.unpickle(data, path, persistent_load=_no_storage(path), interpret={},
                                allow=allow | METADATA_GLOBALS, unsafe=unsafe)
    fields = _fields(metadata)
    entries, layout = fields.get("state_dict_metadata"), fields.get("planner_data") or {}
    if _kind(metadata) != "Metadata" or not isinstance(entries, dict) or not isinstance(layout, dict) \
            or not isinstance(fields.get("storage_data") or {}, dict):
        raise CorruptCheckpointError(f"{path}: not the metadata of a torch.distributed.checkpoint")
    locations = {}
    for index, info in (fields.get("storage_data") or {}).items():
        index = _fields(index)
        locations[(index.get("fqn"), _ints(index.get("offset")))] = _fields(info)
    files, options = dcpchunks.Folder(folder), {"allow": allow, "unsafe": unsafe}
    flat: dict[str, Any] = {}
    for fqn, entry in entries.items():
        if _kind(entry) == "TensorStorageMetadata":
            flat[fqn] = _tensor(files, fqn, _fields(entry), locations, path, options)
        elif _kind(entry) == "BytesStorageMetadata":
            flat[fqn] = dcpchunks.read_span(files, _location(locations, fqn, None, path), f"entry '{fqn}'", **options)
        else:
            raise CorruptCheckpointError(f"{path}: unknown entry type for '{fqn}'")
    root = _unflatten(flat, layout)
    _restore_parameter_ids(root)
    return Checkpoint(source=folder, format="dcp", root=root)


def _no_storage(source: str):
    def refuse(pid):
        raise CorruptCheckpointError(f"{source}: unexpected storage reference")
    return refuse


def _ints(value: Any) -> Any:
    """A torch.Size from the pickle as a tuple of ints (anything else as it is, for the checks)."""
    value = value.args[0] if isinstance(value, Opaque) and value.args else value
    return tuple(value) if isinstance(value, (list, tuple)) else value


def _location(locations: dict, fqn: str, offsets: Any, where: str) -> dict:
    try:
        return locations[(fqn, offsets)]
    except (KeyError, TypeError):
        chunk = f" (the chunk at {list(offsets)})" if offsets is not None else ""
        raise CorruptCheckpointError(f"{where}: no storage location for '{fqn}'{chunk}; the metadata is"
                                     " damaged") from None


def _tensor(files: dcpchunks.Folder, fqn: str, entry: dict, locations: dict, where: str, options: dict) -> Tensor:
    """A tensor from its chunks: one that covers it all is a span of its .distcp file; several are
    reassembled (by a loader) when the values are needed."""
    properties = entry.get("properties")
    state = properties.state if isinstance(properties, Opaque) else None
    # TensorProperties pickles as a tuple (dtype, layout, requires_grad, memory_format, pin_memory)
    dtype = state[0] if isinstance(state, tuple) and state else _fields(properties).get("dtype")
    dtype_name = getattr(dtype, "full_name", "").removeprefix("torch.")
    shape = _ints(entry.get("size"))
    chunks = [(_ints(c.get("offsets")), _ints(c.get("sizes"))) for c in map(_fields, entry.get("chunks") or [])]
    if dtype_name not in dtypes.BY_NAME or not isinstance(shape, tuple) \
            or not all(type(n) is int and n >= 0 for n in shape) or not isinstance(entry.get("chunks"), list):
        raise CorruptCheckpointError(f"{where}: tensor '{fqn}' has an unreadable dtype, size or chunk list")
    dtype = dtypes.BY_NAME[dtype_name]
    dcpchunks.check_chunks(fqn, shape, chunks, where)
    pieces = []
    for offsets, sizes in chunks:
        what = f"tensor '{fqn}'" + (f" (the chunk at {list(offsets)})" if len(chunks) > 1 else "")
        piece = dcpchunks.read_span(files, _location(locations, fqn, offsets, where), what, **options)
        if not isinstance(piece, Tensor) or piece.dtype != dtype or piece.shape != sizes:
            raise CorruptCheckpointError(f"{where}: {what} should hold {dtype.name} values of shape {list(sizes)}"
                                         f" but its file holds {describe(piece, 60)}; the checkpoint is damaged")
        pieces.append((offsets, piece))
    if len(pieces) == 1 and pieces[0][1].shape == shape:
        whole = pieces[0][1]
        return Tensor(whole.storage, dtype, shape, whole.stride, whole.offset)
    return Tensor(Storage(math.prod(shape) * dtype.itemsize, loader=lambda: dcpchunks.assemble(shape, dtype, pieces)),
                  dtype, shape)


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


def _restore_parameter_ids(node: Any, depth: int = 0) -> None:
    """Optimizer states (``optimizer.state_dict()``) found near the top get back the integer keys
    DCP's flattening turned into strings ('0' -> 0), where their param groups list those integers:
    ``Optimizer.load_state_dict`` matches state to parameters by them and would drop the moments."""
    if is_optimizer_state(node):
        state = node["state"]
        ids = {p for group in node["param_groups"] if isinstance(group, dict)
               for p in (group.get("params") if isinstance(group.get("params"), list) else ())}
        if state and all(isinstance(k, str) and k.isdecimal() and int(k) in ids for k in state):
            node["state"] = {int(k): v for k, v in state.items()}
    elif depth < 3 and isinstance(node, (dict, list)):
        for child in (node.values() if isinstance(node, dict) else node):
            _restore_parameter_ids(child, depth + 1)


class Writer:
    """A DCP directory written tensor by tensor (dcpwriter), replaced as a whole
    (atomic.atomic_directory); files beside the checkpoint in the old directory are carried over, but
    for those the command made (``Checkpoint.made``: a config.json). It is never one of the command's ``inputs``."""

    def __init__(self, folder: str, inputs: Inputs):
        self.folder, self.inputs = folder, inputs

    def write(self, ckpt: Checkpoint) -> list[str]:
        """Save ``ckpt`` (every entry of the file) as a DCP directory; a note names the ties it cannot keep."""
        with atomic_directory(self.folder, carry=lambda name: not is_own_file(name), owns=is_own_file,
                              what="a DCP checkpoint", inputs=self.inputs) as staging:
            dcpwriter.write(staging, ckpt.root, ckpt.source)
            for name, content in ckpt.made.items():
                with new_file(os.path.join(staging, name)) as sink:
                    sink.write(content)
        return _ties_note(ckpt.ties())


def _ties_note(groups: list[list[str]]) -> list[str]:
    """DCP records no ties: ``dcp.save`` stores each name's values apart, and so does this writer."""
    if not groups:
        return []
    shown = "; ".join(" = ".join(g) for g in groups[:3]) + (f" and {len(groups) - 3} more" if len(groups) > 3 else "")
    return [f"note: a DCP checkpoint records no ties: each name of {shown} is stored with its own copy, as dcp.save"
            " stores them (dcp.load into a model that ties them fills the shared parameter)"]


def is_own_file(name: str) -> bool:
    """Whether a file name in a directory is part of a DCP checkpoint."""
    return name == ".metadata" or name.endswith(".distcp")
