"""A DCP checkpoint's files, written one tensor at a time.

DCP's own planner lays the checkpoint out (names, chunks, the ``.metadata``) from meta
tensors that stand for ours, so the metadata is exactly what ``dcp.save`` writes for one
process; the bytes are then written as its FileSystemWriter writes them (``_write_item``):
every tensor, and every other entry, a ``torch.save`` archive of its own at an offset of
``__0_0.distcp``. A tensor's values are read (or computed) only when its turn comes, and
an unchanged one is copied from its input file by the kernel, so memory holds one tensor.
"""

from __future__ import annotations

import io
import os
import pickle
from typing import Any

from ..checkpoint import Checkpoint, Tensor
from ..checkpoint.opaque import GlobalMeta, Opaque, describe
from ..errors import OutputError
from . import torchzip
from .atomic import new_file
from .files import Sink

DATA_FILE = "__0_0.distcp"


def write(folder: str, root: Any, source: str) -> None:
    """Write the checkpoint whose object is ``root`` into the empty directory ``folder``."""
    import torch
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
    from torch.distributed.checkpoint.filesystem import CURRENT_DCP_VERSION, _StorageInfo
    from torch.distributed.checkpoint.planner import WriteItemType

    ours: dict[int, Tensor] = {}
    try:
        stand_in = _stand_ins(root, source, ours, {})
    except RecursionError as e:
        raise OutputError(f"{source}: its objects nest too deeply for a DCP checkpoint; pass --tensors-only") from e
    planner = DefaultSavePlanner()
    planner.set_up_planner(state_dict=stand_in, storage_meta=None, is_coordinator=True)
    plans, metadata = planner.create_global_plan([planner.create_local_plan()])
    locations, position = {}, 0
    with new_file(os.path.join(folder, DATA_FILE)) as data:
        for item in planner.finish_plan(plans[0]).items:
            piece = Sink(fd=data.fd, name=data.name)  # a torch.save archive's offsets count from its start
            value = planner.lookup_object(item.index)
            if item.type == WriteItemType.BYTE_IO:
                buffer = io.BytesIO()
                torch.save(_real(value, ours), buffer)  # as DefaultSavePlanner.resolve_data does
                piece.write(buffer.getbuffer())
                piece.flush()
            else:
                _write_tensor(piece, ours[id(value)], source)
            locations[item.index] = _StorageInfo(DATA_FILE, position, piece.position)
            position += piece.position
    metadata.storage_data, metadata.version = locations, CURRENT_DCP_VERSION
    with new_file(os.path.join(folder, ".metadata")) as sink:
        sink.write(pickle.dumps(metadata))


def _write_tensor(sink: Sink, tensor: Tensor, source: str) -> None:
    """One tensor as torch.save writes it alone: a plain tensor over a storage of its own."""
    start, end = tensor.byte_span()
    if start == 0 and end == tensor.storage.nbytes:
        alone = Tensor(tensor.storage, tensor.dtype, tensor.shape, tensor.stride, tensor.offset)
    else:  # a view of a larger storage (a tie, a slice): DCP saves a compact copy
        from ..checkpoint.values import from_torch, to_torch

        alone = from_torch(to_torch(tensor))
    torchzip.Writer(sink).write(Checkpoint(source=source, format="torch", root=alone))


def _stand_ins(node: Any, source: str, ours: dict[int, Tensor], seen: dict[int, Any]) -> Any:
    """The tree with a meta tensor standing for each of ours (``ours`` maps it back)."""
    import torch

    from .. import dtypes

    if id(node) in seen:
        return seen[id(node)]
    if isinstance(node, Tensor):
        result = torch.empty_strided(node.shape, node.stride, dtype=dtypes.torch_dtype(node.dtype), device="meta")
        ours[id(result)] = node
    elif isinstance(node, dict):
        result = seen[id(node)] = {}  # registered first: a pickle may hold cycles
        result.update((k, _stand_ins(v, source, ours, seen)) for k, v in node.items())
    elif isinstance(node, list):
        result = seen[id(node)] = []
        result.extend(_stand_ins(v, source, ours, seen) for v in node)
    elif isinstance(node, tuple):
        result = tuple(_stand_ins(v, source, ours, seen) for v in node)
    elif isinstance(node, (Opaque, GlobalMeta)):
        raise OutputError(f"{source} holds {describe(node, 40)}, which a DCP checkpoint cannot store;"
                          " pass --tensors-only, or write a torch file")
    else:
        result = node
    seen[id(node)] = result
    return result


def _real(node: Any, ours: dict[int, Tensor], seen: dict[int, Any] | None = None) -> Any:
    """A non-tensor entry with our tensors' values in place of their stand-ins (a tuple of tensors)."""
    seen = {} if seen is None else seen
    if id(node) in seen:
        return seen[id(node)]
    if id(node) in ours:
        from ..checkpoint.values import to_torch

        result = to_torch(ours[id(node)])
    elif isinstance(node, dict):
        result = seen[id(node)] = {}
        result.update((k, _real(v, ours, seen)) for k, v in node.items())
    elif isinstance(node, list):
        result = seen[id(node)] = []
        result.extend(_real(v, ours, seen) for v in node)
    elif isinstance(node, tuple):
        result = tuple(_real(v, ours, seen) for v in node)
    else:
        result = node
    seen[id(node)] = result
    return result
