"""Write a checkpoint: choose the output format and place, then stream it there atomically."""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

from ..checkpoint import Checkpoint
from ..errors import OutputError, UsageError
from ..sizes import parse_size
from . import safetensors, sharded, torchzip
from .files import Sink, atomic_file, stdout_sink

FORMATS = {"pt": "torch", "torch": "torch", "safetensors": "safetensors", "dcp": "dcp"}
_EXTENSIONS = {".safetensors": "safetensors", ".pt": "torch", ".pth": "torch", ".bin": "torch",
               ".ckpt": "torch", ".tar": "torch"}
DEFAULT_SHARD_SIZE = 5 * 10**9


@dataclass
class Target:
    """Where and how a checkpoint is written: ``path`` None means standard output."""

    path: str | None
    family: str
    sharded: bool = False
    max_shard_size: int | None = None  # None: keep the input's shards, else split by DEFAULT_SHARD_SIZE


def resolve_target(ckpt: Checkpoint, output: str | None, fmt: str | None = None, in_place: bool = False,
                   max_shard_size: str | None = None) -> Target:
    """Decide the output place and format from the options, the output name and the input."""
    if fmt is not None and fmt not in FORMATS:
        raise UsageError(f"--format {fmt}: expected pt, safetensors or dcp")
    if in_place:
        if output not in (None, "-") and not _same(ckpt.path, output):
            raise UsageError("--in-place rewrites the input; do not also pass -o")
        if ckpt.path is None:
            raise UsageError("--in-place needs a checkpoint path, not standard input")
        output = ckpt.path
    elif output not in (None, "-") and ckpt.path is not None and _same(ckpt.path, output):
        raise OutputError(f"-o {output} is the input checkpoint; pass --in-place to rewrite it")
    input_family = ckpt.format.split("-")[0]
    if output in (None, "-"):
        if max_shard_size:
            raise UsageError("--max-shard-size writes a directory; pass -o DIR")
        family = FORMATS.get(fmt or "", input_family)
        if family == "dcp":
            if fmt:
                raise UsageError("--format dcp writes a directory; pass -o DIR")
            family = "torch"  # a DCP input piped on is written as one torch file
        return Target(None, family)
    extension = os.path.splitext(output)[1].lower()
    directory = bool(max_shard_size) or os.path.isdir(output) or output.endswith(os.sep) \
        or (ckpt.format.endswith("sharded") and extension not in _EXTENSIONS)
    family = FORMATS.get(fmt or "") or (None if directory else _EXTENSIONS.get(extension)) or input_family
    if family == "dcp" or (directory and input_family == "dcp" and not max_shard_size):
        return Target(output.rstrip(os.sep) or output, "dcp")
    size = parse_size(max_shard_size) if max_shard_size else None
    return Target(output.rstrip(os.sep) or output, family, directory, size)


def _same(a: str | None, b: str) -> bool:
    if a is None:
        return False
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def save(ckpt: Checkpoint, target: Target, *, dedupe: bool = False, tensors_only: bool = False,
         progress: Callable[[int], None] | None = None) -> None:
    """Write ``ckpt`` to ``target``; nothing appears at the target unless the write completes."""
    if target.family == "dcp":
        from . import dcp

        dcp.write(ckpt if not tensors_only else _tensors_only(ckpt), target.path)
        return
    if target.family == "safetensors" and ckpt.has_extras() and not tensors_only:
        raise OutputError(f"safetensors stores only tensors, but {ckpt.source} also holds"
                          f" {extras_list(ckpt)}; pass --tensors-only to write just its"
                          f" {len(ckpt.tensors)} tensors, or write a torch file")
    if target.sharded:
        if ckpt.has_extras() and not tensors_only:
            raise OutputError(f"a sharded checkpoint stores only tensors, but {ckpt.source} also holds"
                              f" {extras_list(ckpt)}; pass --tensors-only to shard just its tensors")
        layout = ckpt.shards if target.max_shard_size is None else None
        sharded.write(ckpt.tensors, ckpt.metadata, target.path, target.family,
                      target.max_shard_size or DEFAULT_SHARD_SIZE,
                      lambda tensors, metadata, sink: _write_tensors(tensors, metadata, target.family, sink,
                                                                     dedupe, "archive", progress),
                      dedupe=dedupe, layout=layout)
        return
    archive = _archive_name(target.path)
    if target.path is None:
        try:
            _write(ckpt, target.family, stdout_sink(), dedupe, tensors_only, archive, progress)
        except BrokenPipeError:
            raise
        except OSError as e:
            raise OutputError(f"cannot write to standard output: {e.strerror or e}; what was written is"
                              " incomplete") from e
        return
    mode_from = target.path if os.path.exists(target.path) else None
    with atomic_file(target.path, mode_from) as sink:
        _write(ckpt, target.family, sink, dedupe, tensors_only, archive, progress)


def _write(ckpt: Checkpoint, family: str, sink: Sink, dedupe: bool, tensors_only: bool, archive: str,
           progress) -> None:
    if family == "torch" and not tensors_only:
        torchzip.write(ckpt.root, sink, archive, progress)
    else:
        _write_tensors(ckpt.tensors, ckpt.metadata, family, sink, dedupe, archive, progress)


def _write_tensors(tensors: dict, metadata: dict, family: str, sink: Sink, dedupe: bool, archive: str,
                   progress) -> None:
    if family == "torch":
        torchzip.write(OrderedDict(tensors), sink, archive, progress)
    else:
        safetensors.write(tensors, {"format": "pt", **metadata}, sink, dedupe=dedupe, progress=progress)


def _tensors_only(ckpt: Checkpoint) -> Checkpoint:
    import dataclasses

    return dataclasses.replace(ckpt, root=OrderedDict(ckpt.tensors), key=())


def _archive_name(path: str | None) -> str:
    """The folder name inside a torch zip: the file's stem, as torch.save names it."""
    if path is None:
        return "archive"
    stem = os.path.splitext(os.path.basename(path))[0]
    return stem if re.fullmatch(r"[A-Za-z0-9_.\-]+", stem or "") else "archive"


def extras_list(ckpt: Checkpoint) -> str:
    """The non-tensor entries of a checkpoint, named briefly ('optimizer, epoch')."""
    names = [path for path, _ in ckpt.extra_items()]
    shown = ", ".join(names[:5])
    return shown + (f" and {len(names) - 5} more" if len(names) > 5 else "")
