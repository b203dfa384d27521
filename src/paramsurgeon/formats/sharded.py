"""Hugging Face sharded checkpoints: a directory of shards and a ``*.index.json`` whose
``weight_map`` says which shard holds each tensor. Read as one checkpoint; written
shard by shard, in the hub's names and with its splitting rule, the directory replaced whole.
"""

from __future__ import annotations

import json
import os
import re
from collections import OrderedDict
from typing import Callable

from ..checkpoint import Checkpoint, Tensor, tie_groups
from ..errors import CorruptCheckpointError, InputError, NotACheckpointError
from ..parsing import parse_document
from ..sizes import plural
from . import safetensors as st
from ..parallel import Work, spread
from ..parallel.cluster import rebuilding
from . import journal, registry
from .atomic import atomic_directory, link_or_copy, new_file, remove
from .files import InputFile, reproduces, same_file
from .places import dirname, is_file, join, open_many, read_all
from .inputs import Inputs

DEFAULT_SHARD_SIZE = 5 * 10**9
_HUB_PARTS = [name.rsplit(".", 1) for name in registry.hub_names()]  # ["model", "safetensors"], ...
_HUB_NAME = re.compile(rf"({'|'.join(re.escape(stem) for stem, _ in _HUB_PARTS)})(-\d{{5}}-of-\d{{5}})?"
                       rf"\.({'|'.join(re.escape(suffix) for _, suffix in _HUB_PARTS)})")  # any stem, any suffix


def read_index(path: str) -> tuple[dict, dict[str, str]]:
    """(index metadata, weight_map) of an index file, checked for shape."""
    try:
        index = parse_document(json.loads, read_all(path).decode("utf-8"))
    except OSError as e:
        raise InputError(f"cannot read '{path}': {e.strerror}") from e
    except ValueError as e:  # UnicodeDecodeError is one
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
    folder = dirname(index_path)
    index_metadata, weight_map = read_index(index_path)
    shard_names = sorted(set(weight_map.values()))
    open_many([join(folder, s) for s in shard_names])
    missing = [s for s in shard_names if not is_file(join(folder, s))]
    if missing:
        raise InputError(f"{index_path}: shard{'s' if len(missing) > 1 else ''} {', '.join(missing)} missing;"
                         " download or restore them (the index names every shard)")
    tensors: dict[str, Tensor] = OrderedDict()
    metadata: dict[str, str] = {}
    shard_of: dict[str, str] = {}
    problems = []
    formats = set()
    for shard in shard_names:
        part = read_shard(open_file(join(folder, shard)))
        formats.add(registry.get(part.format).family)
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
    # an index that names no shard is read as the registry's first sharded layout (safetensors)
    family = formats.pop() if formats else next(f.family for f in registry.FORMATS if f.sharded)
    if registry.sharded_of(family) is None:
        raise NotACheckpointError(f"{index_path}: its shards are {family} files, which paramsurgeon reads only alone")
    metadata.update((k, v) for k, v in index_metadata.items() if isinstance(v, str))  # the whole checkpoint's
    st.restore_ties(index_path, tensors, metadata)
    return Checkpoint(source=index_path, format=registry.sharded_of(family), root=tensors, key=(),
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


class Writer:
    """A Hugging Face sharded directory, replaced as a whole (atomic.atomic_directory).

    Each shard is written by the file writer of its format, ``file_writer(sink, name,
    progress)``; a shard that would come out identical to the file of its name in the old
    directory (its tensors untouched, still read from that file) is hard-linked from it.
    Files beside the checkpoint (config.json, tokenizer) are carried over; every file of
    the old checkpoint, of either format or DCP, goes with it. When the checkpoint was read
    from another model directory, its side files come along: ``carry(ckpt, staging, folder, inputs)``
    copies them and returns notes (sidefiles.carry).
    """

    def __init__(self, folder: str, family: str, file_writer: Callable, carry: Callable, inputs: Inputs, *,
                 max_size: int | None = None, dedupe: bool = False, progress=None, work: Work = Work(),
                 resume: bool = False):
        self.folder, self.family, self.file_writer, self.carry = folder, family, file_writer, carry
        self.inputs = inputs  # the command's, which the directory may not be (unless rewritten in place)
        self.max_size, self.dedupe, self.progress = max_size, dedupe, progress
        self.work, self.resume = work, resume  # shards written in parallel; a journal kept (journal.py)

    def write(self, ckpt: Checkpoint) -> list[str]:
        """Shard ``ckpt``'s tensors: as its input shards were (no ``max_size``), else by size;
        returns notes on the side files carried from its input directory."""
        if self._recorded:
            entries, metadata = st.plan(ckpt, ckpt.metadata, self.dedupe)
        else:
            entries, metadata = list(ckpt.tensors.items()), {}
        layout = ckpt.shards if self.max_size is None else None
        shards = keep(entries, layout) if layout else split(entries, self.max_size or DEFAULT_SHARD_SIZE)
        names = shard_names(self.family, len(shards))
        metadata = {k: v for k, v in metadata.items() if k != st.TIES_KEY}
        # Several shards: the checkpoint's metadata (the operations applied) goes in the index,
        # so that a shard whose tensors did not change stays the same file.
        shard_metadata = metadata if len(shards) == 1 else {k: v for k, v in metadata.items() if k == "format"}
        parts = [Checkpoint(source=os.path.join(self.folder, name), format=self.family, root=OrderedDict(shard),
                            metadata=shard_metadata) for name, shard in zip(names, shards)]
        place = rebuilding("shards")
        if place is not None:  # a cluster worker's rerun: its shards, into the client's staging directory
            self._write_shards(parts, names, place, None)
        owned = checkpoint_files(self.folder)
        with atomic_directory(self.folder, carry=lambda name: name not in owned, owns=owned.__contains__,
                              what="a sharded checkpoint", inputs=self.inputs,
                              resume=journal.NAME if self.resume else None) as staging:
            fingerprint = self._fingerprint(parts, names, metadata) if self.resume else None
            self._write_shards(parts, names, staging, fingerprint and journal.Journal(staging, fingerprint))
            if len(shards) > 1:
                self._write_index(entries, shards, names, ckpt.tensors, metadata, staging)
            notes = self.carry(ckpt, staging, self.folder, self.inputs)
        return notes

    @property
    def _recorded(self) -> bool:
        """Whether the format records ties in its metadata (registry.Format.ties), as the index does then."""
        return registry.get(self.family).ties == "recorded"

    def _write_shards(self, parts: list[Checkpoint], names: list[str], staging: str,
                      record: journal.Journal | None) -> None:
        """Every shard into ``staging`` but those ``record`` keeps from an interrupted write (--resume),
        spread over the workers; each written one is recorded there."""
        sizes = [sum(t.nbytes for t in part.tensors.values()) for part in parts]
        done = record.kept(self.folder) if record is not None and os.path.exists(record.path) else set()
        if record is not None and not done:
            record.start()
        todo = {i: size for i, size in enumerate(sizes) if names[i] not in done}
        here = os.getpid()

        def write(index: int) -> tuple[str | None, bool]:
            # written by this process, the bar follows the bytes; by a worker (forked, or a cluster's), the shards
            shown = os.getpid() == here and rebuilding("shards") is None
            path = self._write_shard(parts[index], names[index], staging, self.progress if shown else None)
            return (journal.sha256_of(path) if self.resume else None), shown

        if self.progress is not None:
            self.progress(sum(sizes) - sum(todo.values()))
        for index, (digest, shown) in spread(write, todo, self.work, "shards", staging):
            if record is not None:
                record.record(names[index], digest)
            if not shown and self.progress is not None:
                self.progress(sizes[index])
        for name in os.listdir(staging):
            if name.endswith(".partial") or name == journal.NAME:
                remove(os.path.join(staging, name))  # a dead worker's unfinished shard; the journal

    def _write_shard(self, part: Checkpoint, name: str, staging: str, progress) -> str:
        """Write one shard under a name of its own, then rename it into place (a worker that dies
        leaves no shard behind, only its .partial file); returns its path."""
        old = os.path.join(self.folder, name)
        path = os.path.join(staging, name)
        partial = os.path.join(staging, f".{name}.{os.getpid()}.partial")
        remove(partial)
        if _still_in(part, old) and reproduces(old, lambda sink: self.file_writer(sink, name, None).write(part)):
            link_or_copy(old, partial)
            if progress is not None:
                progress(sum(t.nbytes for t in part.tensors.values()))
        else:
            with new_file(partial, like=old) as sink:
                self.file_writer(sink, name, progress).write(part)
        os.replace(partial, path)
        return path

    def _fingerprint(self, parts: list[Checkpoint], names: list[str], metadata: dict) -> str:
        """What identifies this output: its shards' names, tensors (name, dtype, shape), metadata
        (the operations applied) and the inputs it is made from (path, size, modification time)."""
        inputs = []
        for path in self.inputs.opened:
            try:
                status = os.stat(path)
                inputs.append([os.path.abspath(path), status.st_size, status.st_mtime_ns])
            except OSError:
                inputs.append([path])  # a URL, or standard input
        shards = [[name, [[n, t.dtype.name, list(t.shape)] for n, t in part.tensors.items()]]
                  for name, part in zip(names, parts)]
        return journal.fingerprint({"family": self.family, "shards": shards, "metadata": metadata, "inputs": inputs})

    def _write_index(self, entries, shards, names, tensors, metadata, staging) -> None:
        index_name = index_name_of(self.family)
        index = {"metadata": {**{k: v for k, v in metadata.items() if k != "format"},
                              "total_size": sum(t.nbytes for _, t in entries)},
                 "weight_map": {n: names[i] for i, shard in enumerate(shards) for n, _ in shard}}
        groups = tie_groups(tensors)
        if groups and self._recorded:
            index["metadata"][st.TIES_KEY] = json.dumps(groups, separators=(",", ":"))
        with new_file(os.path.join(staging, index_name), like=os.path.join(self.folder, index_name)) as sink:
            sink.write((json.dumps(index, indent=2, sort_keys=True) + "\n").encode())


def shard_names(family: str, count: int) -> list[str]:
    """The hub's file names: model.safetensors alone, else model-00001-of-00003.safetensors, ..."""
    single = registry.get(family).hub_name
    if count == 1:
        return [single]
    stem, suffix = single.rsplit(".", 1)
    return [f"{stem}-{i:05d}-of-{count:05d}.{suffix}" for i in range(1, count + 1)]


def index_name_of(family: str) -> str:
    """The hub's name of the shard index of ``family``'s shards ('model.safetensors.index.json')."""
    return registry.get(family).hub_name + ".index.json"


def checkpoint_files(folder: str) -> set[str]:
    """Names in ``folder`` that belong to a checkpoint: every index and the shards it names,
    hub-named weight files, the files of a directory format (DCP). Writing a checkpoint there
    replaces them all."""
    try:
        names = os.listdir(folder)
    except (FileNotFoundError, NotADirectoryError):
        return set()
    owned = {n for n in names if n.endswith(".index.json") or _HUB_NAME.fullmatch(n)
             or registry.owned_by_directory_format(n)}
    for index in [n for n in owned if n.endswith(".index.json")]:
        try:
            owned |= set(read_index(os.path.join(folder, index))[1].values())
        except InputError:
            continue  # a damaged index names no shards
    return owned


def _still_in(part: Checkpoint, path: str) -> bool:
    """Whether every tensor of ``part`` is still read, untouched, from the file at ``path``."""
    return all(not t.storage.in_memory and same_file(t.storage.file, path) for t in part.tensors.values())


def verify(index_path: str, read_shard: Callable[[str], Checkpoint]) -> list[dict]:
    """Every way the index and the shards disagree: missing or unreadable shards, tensors not
    where the index says, sizes that do not add up. Never raises for the shards' sake."""
    folder = dirname(index_path)
    index_metadata, weight_map = read_index(index_path)
    problems: list[dict] = []
    found: dict[str, str] = {}
    unread: set[str] = set()  # shards missing or unreadable: what they hold is not known
    total = 0
    open_many([join(folder, s) for s in set(weight_map.values())])
    for shard in sorted(set(weight_map.values())):
        listed = [n for n, s in weight_map.items() if s == shard]
        path = join(folder, shard)
        if not is_file(path):
            problems.append({"name": None, "message": f"shard {shard} is missing ({plural(len(listed), 'tensor')} listed for it)"})
            unread.add(shard)
            continue
        try:
            part = read_shard(path)
        except (CorruptCheckpointError, NotACheckpointError, InputError) as e:
            problems.append({"name": None, "message": f"shard {shard} is unreadable: {e}"})
            unread.add(shard)
            continue
        for name, tensor in part.tensors.items():
            found[name] = shard
            total += tensor.nbytes
            if weight_map.get(name) != shard:
                where = weight_map.get(name)
                problems.append({"name": name, "message": f"is in {shard} but the index lists it"
                                                          f" {'for ' + where if where else 'nowhere'}"})
    for name, shard in weight_map.items():
        if name not in found and shard not in unread:
            problems.append({"name": name, "message": f"is listed for {shard} but {shard} does not hold it"})
    claimed = index_metadata.get("total_size")
    if isinstance(claimed, int) and not any(p["name"] is None for p in problems) and claimed != total:
        problems.append({"name": None, "message": f"the index says total_size {claimed} but the shards hold"
                                                  f" {total} bytes of tensors"})
    return problems
