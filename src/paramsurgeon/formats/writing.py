"""Write a checkpoint: the writer of the target's format streams it to its place atomically.

Every writer has one shape, ``write(ckpt)``: it is handed the whole lazy checkpoint, because
every format needs all of it before its first byte (a safetensors header, torch's pickle of
the whole object, the shard count in shard names); the bytes are streamed only then.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Callable, Protocol

from ..checkpoint import Checkpoint
from ..checkpoint.quantized import Quantized, refuse_valueless, stored
from ..errors import OutputError
from ..parallel import Work
from ..sizes import plural
from . import registry, sharded, sidefiles
from .atomic import output_file
from .files import stdout_sink
from .inputs import Inputs
from .quantmeta import recorded_config, refuse_unrecorded, with_config, with_quantization
from .target import Target

Progress = Callable[[int], None]
FileWriter = Callable[..., "Writer"]  # (sink, path, progress[, work]) -> the Writer of one file


class Writer(Protocol):
    """Writes one whole checkpoint to one place; nothing appears there unless it completes."""

    def write(self, ckpt: Checkpoint) -> list[str] | None: ...


def save(ckpt: Checkpoint, target: Target, *, dedupe: bool = False, tensors_only: bool = False,
         progress: Progress | None = None, work: Work = Work(), resume: bool = False) -> list[str]:
    """Write ``ckpt`` to ``target``; nothing appears at the target unless the write completes.
    A sharded output's shards are written by ``work``'s workers, and so are the computed tensors
    of one safetensors file (placed.py); with ``resume``, a journal lets
    a later run finish an interrupted write (journal.py). Returns notes on what a directory output
    carried from the input's (sidefiles.carry). A format with metadata records there the
    quantization_config of the quantized weights written, and a directory in its config.json (quantmeta.py)."""
    ckpt = writable(ckpt, target, tensors_only)
    fmt, notes = registry.get(target.family), []
    recorded = recorded_config(ckpt, target.inputs)
    if fmt.metadata:
        ckpt = with_quantization(ckpt, recorded)
    if fmt.directory or target.sharded:
        ckpt, notes = with_config(ckpt, target, recorded)
    return notes + (writer(target, dedupe=dedupe, progress=progress, work=work, resume=resume).write(ckpt) or [])


def writer(target: Target, *, dedupe: bool = False, progress: Progress | None = None, work: Work = Work(),
           resume: bool = False) -> Writer:
    """The writer of ``target``'s format and place (a file, standard output, a directory)."""
    fmt = registry.get(target.family)
    make = registry.writer_of(target.family, target.path or "standard output")
    if fmt.directory:
        return make(target.path, target.inputs)
    file_writer = _file_writer(make, dedupe)
    if target.sharded:
        return sharded.Writer(target.path, target.family, file_writer, sidefiles.carry, target.inputs,
                              max_size=target.max_shard_size, dedupe=dedupe, progress=progress, work=work,
                              resume=resume)
    return SingleFile(target.path, file_writer, target.inputs, progress, work)


class SingleFile:
    """One file, at ``path`` (replaced atomically, or written through if it is a FIFO or a device;
    atomic.output_file) or on standard output (``path`` None); never one of the command's ``inputs``.
    A regular file's format writer may spread its tensors over ``work``'s processes."""

    def __init__(self, path: str | None, file_writer: FileWriter, inputs: Inputs, progress: Progress | None = None,
                 work: Work = Work()):
        self.path, self.file_writer, self.inputs, self.progress, self.work = path, file_writer, inputs, progress, work

    def write(self, ckpt: Checkpoint) -> list[str] | None:
        if self.path is not None:  # rewritten in place: the config.json beside it follows, as a directory's does
            config = sidefiles.config_beside(ckpt, self.path, self.inputs) if self.inputs.permits(self.path) else None
            with output_file(self.path, self.inputs) as sink:
                self.file_writer(sink, self.path, self.progress, self.work).write(ckpt)
            return config() if config else None
        try:
            self.file_writer(stdout_sink(), None, self.progress).write(ckpt)
        except BrokenPipeError:
            raise
        except OSError as e:
            raise OutputError(f"cannot write to standard output: {e.strerror or e}; what was written is"
                              " incomplete") from e


def _file_writer(make: Callable[..., Writer], dedupe: bool) -> FileWriter:
    """``make(sink, path, progress, work)``: the writer of one file of the format (a whole file, or a
    shard, whose tensors are written in the shard's process: no ``work``)."""
    return lambda sink, path, progress, work=Work(): make(sink, path, progress, dedupe, work)


def writable(ckpt: Checkpoint, target: Target, tensors_only: bool = False) -> Checkpoint:
    """``ckpt`` as the target can hold it: a format that stores quantized tensors whole (GGUF) is
    handed them so; another, each as its stored parts, but for a ``native`` scheme's (a format's own
    types, GGUF's), whose parts no other format lays out: those are written plain, dequantized to
    their dtype. What the input's format carries beside the tensors (``Checkpoint.layout``, its own
    metadata) goes only to that format. Just its tensors with ``tensors_only``; refuses to drop
    the rest of the file silently, and to write a single file without metadata whose quantized
    weights could not be read back without their quantization_config (quantmeta.refuse_unrecorded)."""
    if ckpt.layout is not None and registry.get(ckpt.format).family != target.family:
        kept = {k: v for k, v in ckpt.metadata.items() if k not in ckpt.layout.keys}
        ckpt = dataclasses.replace(ckpt, layout=None, metadata=kept)
    if not registry.get(target.family).quantized:
        ckpt = _laid_out(ckpt, target.family)
        if not (registry.get(target.family).metadata or registry.get(target.family).directory or target.sharded):
            refuse_unrecorded(ckpt, target)
    if tensors_only:
        return dataclasses.replace(ckpt, root=OrderedDict(ckpt.tensors), key=())
    fmt = registry.get(target.family)
    if not fmt.nested and ckpt.has_extras():
        raise OutputError(f"{fmt.display} stores only tensors, but {ckpt.source} also holds"
                          f" {extras_list(ckpt)}; pass --tensors-only to write just its"
                          f" {plural(len(ckpt.tensors), 'tensor')}, or write a torch file")
    if target.sharded and ckpt.has_extras():
        raise OutputError(f"a sharded checkpoint stores only tensors, but {ckpt.source} also holds"
                          f" {extras_list(ckpt)}; pass --tensors-only to shard just its tensors")
    return ckpt


def _laid_out(ckpt: Checkpoint, family: str) -> Checkpoint:
    """``ckpt`` for a format that lays quantized tensors out as their parts: a ``native`` scheme's
    as plain tensors (refused, all at once, where they have no values), the others as their parts."""
    tensors = ckpt.tensors
    native = [n for n, t in tensors.items() if type(t) is Quantized and t.scheme.native]
    if native:
        refuse_valueless(tensors, native, f"writing {family}")
        plain = {n: tensors[n].plain() for n in native}
        ckpt = ckpt.with_container({n: plain.get(n, v) for n, v in ckpt.container.items()})
    laid_out = stored(ckpt.container)
    if laid_out is None:
        return ckpt
    groups = {n: t for n, t in ckpt.tensors.items() if type(t) is Quantized}
    return dataclasses.replace(ckpt.with_container(laid_out), laid_out=groups)


def extras_list(ckpt: Checkpoint) -> str:
    """The non-tensor entries of a checkpoint, named briefly ('optimizer, epoch')."""
    names = [path for path, _ in ckpt.extra_items()]
    shown = ", ".join(names[:5])
    return shown + (f" and {len(names) - 5} more" if len(names) > 5 else "")
