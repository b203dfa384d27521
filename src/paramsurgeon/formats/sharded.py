"""Hugging Face sharded checkpoints: a directory of shards and a ``*.index.json`` whose
``weight_map`` says which shard holds each tensor. Read as one checkpoint; written
shard by shard, in the hub's names and with its splitting rule.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import OrderedDict
from typing import Callable

from ..checkpoint import Checkpoint, Tensor, tie_groups
from ..errors import CorruptCheckpointError, InputError, NotACheckpointError, OutputError
from . import safetensors as st
from .files import InputFile, Sink, atomic_file, temporary_name

INDEX_NAMES = {"safetensors": "model.safetensors.index.json", "torch": "pytorch_model.bin.index.json"}
SINGLE_NAMES = {"safetensors": "model.safetensors", "torch": "pytorch_model.bin"}


def read_index(path: str) -> tuple[dict, dict[str, str]]:
    """(index metadata, weight_map) of an index file, checked for shape."""
    try:
        with open(path, "rb") as handle:
            index = json.loads(handle.read().decode("utf-8"))
    except OSError as e:
        raise InputError(f"cannot read '{path}': {e.strerror}") from e
    except (UnicodeDecodeError, ValueError) as e:
        raise CorruptCheckpointError(f"{path}: the shard index is not valid JSON ({e})") from e
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in weight_map.items()):
        raise CorruptCheckpointError(f"{path}: the shard index has no valid weight_map")
    for shard in set(weight_map.values()):
        if os.path.isabs(shard) or ".." in shard.replace("\\", "/").split("/"):
            raise CorruptCheckpointError(f"{path}: shard name '{shard}' points outside the checkpoint directory")
    metadata = index.get("metadata") if isinstance(index.get("metadata"), dict) else {}
    return metadata, weight_map


def read(index_path: str, read_shard: Callable[[InputFile], Checkpoint], open_file: Callable) -> Checkpoint:
    """Read every shard named by the index as one checkpoint."""
    folder = os.path.dirname(index_path)
    index_metadata, weight_map = read_index(index_path)
    shard_names = sorted(set(weight_map.values()))
    missing = [s for s in shard_names if not os.path.isfile(os.path.join(folder, s))]
    if missing:
        raise InputError(f"{index_path}: shard{'s' if len(missing) > 1 else ''} {', '.join(missing)} missing;"
                         " download or restore them (the index names every shard)")
    tensors: dict[str, Tensor] = OrderedDict()
    metadata: dict[str, str] = {}
    shard_of: dict[str, str] = {}
    problems = []
    formats = set()
    for shard in shard_names:
        part = read_shard(open_file(os.path.join(folder, shard)))
        formats.add(part.format.removesuffix("-legacy"))
        if part.has_extras():
            problems.append(f"shard {shard} holds more than a flat mapping of tensors")
        for name, tensor in part.tensors.items():
            if weight_map.get(name) != shard:
                where = weight_map.get(name)
                problems.append(f"'{name}' is in {shard} but the index says {where or 'nothing'}")
                continue
            tensors[name] = tensor
            shard_of[name] = shard
        for key, value in part.metadata.items():
            metadata.setdefault(key, value)
    absent = [n for n, s in weight_map.items() if n not in shard_of]
    problems += [f"'{n}' is listed for {weight_map[n]} but not in it" for n in absent[:3]]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CorruptCheckpointError(f"{index_path}: index and shards disagree: {'; '.join(problems[:3])}{more};"
                                     " run 'paramsurgeon check' for the full list")
    if len(formats) > 1:
        raise NotACheckpointError(f"{index_path}: shards mix formats ({', '.join(sorted(formats))})")
    if st.TIES_KEY in index_metadata:
        metadata[st.TIES_KEY] = str(index_metadata[st.TIES_KEY])
    st.restore_ties(index_path, tensors, metadata)
    family = formats.pop() if formats else "safetensors"
    return Checkpoint(source=index_path, format=f"{family}-sharded", root=tensors, key=(),
                      metadata={k: v for k, v in metadata.items() if k != st.TIES_KEY}, shards=shard_of)


def split(entries: list[tuple[str, Tensor]], max_size: int) -> list[list[tuple[str, Tensor]]]:
    """Hugging Face's rule: start a new shard when the next tensor would pass ``max_size``."""
    shards: list[list[tuple[str, Tensor]]] = [[]]
    size = 0
    for name, tensor in entries:
        if shards[-1] and size + tensor.nbytes > max_size:
            shards.append([])
            size = 0
        shards[-1].append((name, tensor))
        size += tensor.nbytes
    return shards


def keep(entries: list[tuple[str, Tensor]], layout: dict[str, str]) -> list[list[tuple[str, Tensor]]]:
    """The input's grouping: each tensor in its old shard (a new name joins the tensor before it)."""
    groups: dict[str, list] = {}
    current = None
    for name, tensor in entries:
        current = layout.get(name, current) or next(iter(layout.values()), "")
        groups.setdefault(current, []).append((name, tensor))
    return [groups[shard] for shard in sorted(groups)]


def write(tensors: dict[str, Tensor], metadata: dict[str, str], folder: str, family: str, max_size: int,
          write_file: Callable[[dict, dict, Sink], None], dedupe: bool = False,
          layout: dict[str, str] | None = None) -> list[str]:
    """Write ``tensors`` into ``folder`` as shards plus an index; return the files written.

    With ``layout`` (name -> shard file of the input), each tensor goes back to its shard;
    otherwise shards are cut at ``max_size``.
    """
    if family == "safetensors":
        entries, metadata = st.plan(tensors, metadata, dedupe)
    else:
        entries = list(tensors.items())
    shards = keep(entries, layout) if layout else split(entries, max_size)
    index_name, single_name = INDEX_NAMES[family], SINGLE_NAMES[family]
    stem, suffix = single_name.rsplit(".", 1)
    names = [single_name] if len(shards) == 1 else [f"{stem}-{i:05d}-of-{len(shards):05d}.{suffix}"
                                                     for i in range(1, len(shards) + 1)]
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise OutputError(f"'{folder}' is not a directory")
    if not os.path.exists(folder):  # a new directory appears whole, or not at all
        staging = temporary_name(folder)
        os.mkdir(staging)
        try:
            written = _write_into(staging, names, shards, entries, tensors, metadata, family, index_name, write_file)
            os.rename(staging, folder)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return written
    previous = set(read_index(os.path.join(folder, index_name))[1].values()) \
        if os.path.isfile(os.path.join(folder, index_name)) else set()
    written = _write_into(folder, names, shards, entries, tensors, metadata, family, index_name, write_file)
    for stale in previous - set(written):  # shards of the old layout that the new index no longer names
        os.remove(os.path.join(folder, stale))
    if len(shards) == 1 and os.path.isfile(os.path.join(folder, index_name)):
        os.remove(os.path.join(folder, index_name))
    return written


def _write_into(folder, names, shards, entries, tensors, metadata, family, index_name, write_file) -> list[str]:
    """Each shard and the index, each file written atomically."""
    for name, shard in zip(names, shards):
        shard_metadata = {k: v for k, v in metadata.items() if k != st.TIES_KEY}
        with atomic_file(os.path.join(folder, name)) as sink:
            write_file(OrderedDict(shard), shard_metadata, sink)
    written = list(names)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.nbytes for _, t in entries)},
                 "weight_map": {n: names[i] for i, shard in enumerate(shards) for n, _ in shard}}
        groups = tie_groups(tensors)
        if groups and family == "safetensors":
            index["metadata"][st.TIES_KEY] = json.dumps(groups, separators=(",", ":"))
        with atomic_file(os.path.join(folder, index_name)) as sink:
            sink.write((json.dumps(index, indent=2, sort_keys=True) + "\n").encode())
        written.append(index_name)
    return written


def verify(index_path: str, read_shard: Callable[[str], Checkpoint]) -> list[dict]:
    """Every way the index and the shards disagree: missing or unreadable shards, tensors not
    where the index says, sizes that do not add up. Never raises for the shards' sake."""
    folder = os.path.dirname(index_path)
    index_metadata, weight_map = read_index(index_path)
    problems: list[dict] = []
    found: dict[str, str] = {}
    total = 0
    for shard in sorted(set(weight_map.values())):
        listed = [n for n, s in weight_map.items() if s == shard]
        path = os.path.join(folder, shard)
        if not os.path.isfile(path):
            problems.append({"name": None, "message": f"shard {shard} is missing ({len(listed)} tensors listed for it)"})
            continue
        try:
            part = read_shard(path)
        except (CorruptCheckpointError, NotACheckpointError, InputError) as e:
            problems.append({"name": None, "message": f"shard {shard} is unreadable: {e}"})
            continue
        for name, tensor in part.tensors.items():
            found[name] = shard
            total += tensor.nbytes
            if weight_map.get(name) != shard:
                where = weight_map.get(name)
                problems.append({"name": name, "message": f"is in {shard} but the index lists it"
                                                          f" {'for ' + where if where else 'nowhere'}"})
    for name, shard in weight_map.items():
        if name not in found and os.path.isfile(os.path.join(folder, shard)):
            problems.append({"name": name, "message": f"is listed for {shard} but {shard} does not hold it"})
    claimed = index_metadata.get("total_size")
    if isinstance(claimed, int) and not any(p["name"] is None for p in problems) and claimed != total:
        problems.append({"name": None, "message": f"the index says total_size {claimed} but the shards hold"
                                                  f" {total} bytes of tensors"})
    return problems
