"""Where and how a checkpoint is written: the output place and format, decided from the
options, the output's name and the input, with every contradiction refused before any work."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field

from ..checkpoint import Checkpoint
from ..errors import OutputError, UsageError
from ..sizes import parse_size
from . import registry
from .directories import refuse_foreign
from .files import is_url, output_kind
from .inputs import Inputs


@dataclass
class Target:
    """Where and how a checkpoint is written: ``path`` None means standard output.

    ``notes`` say what the write does that the user may not expect (for the CLI to show);
    ``inputs`` are the command's, which the write may not change.
    """

    path: str | None
    family: str
    sharded: bool = False
    max_shard_size: int | None = None  # None: keep the input's shards, else split by sharded.DEFAULT_SHARD_SIZE
    notes: list[str] = field(default_factory=list)
    inputs: Inputs = field(default_factory=Inputs)


def resolve_target(ckpt: Checkpoint, output: str | None, fmt: str | None = None, in_place: bool = False,
                   max_shard_size: str | None = None, inputs: Inputs | None = None) -> Target:
    """Decide the output place and format from the options, the output name and the input;
    ``inputs``: the command's (default: just ``ckpt``'s own file), which the output may not be.

    Raises:
        UsageError: options that contradict each other or the output's name.
        OutputError: the output is the input without ``in_place``, or the input may not be rewritten.
    """
    if fmt is not None and fmt not in registry.writable():
        choices = registry.format_choices(ckpt).split("|")
        raise UsageError(f"--format {fmt}: expected {', '.join(choices[:-1])} or {choices[-1]}")
    size = parse_size(max_shard_size) if max_shard_size else None
    if is_url(output):
        raise OutputError(f"-o {output}: outputs are written to local paths only; write here and upload the"
                          " result; nothing was written")
    if in_place and is_url(ckpt.path):
        raise OutputError(f"--in-place: {ckpt.path} is remote and outputs are written to local paths only;"
                          " pass -o PATH; nothing was written")
    if inputs is None:
        inputs = Inputs()
        inputs.record(ckpt.path, "the checkpoint")
    if in_place:
        target = _in_place(ckpt, output, fmt, size, inputs)
    elif output in (None, "-"):
        target = _to_stream(ckpt, None, fmt, size)
    elif _is_input(ckpt, output):
        raise OutputError(f"-o {output} is the input checkpoint; pass --in-place to rewrite it")
    elif output_kind(output) == "stream":  # a FIFO or a device (/dev/null): written through like stdout
        inputs.refuse_overwrite(output)
        target = _to_stream(ckpt, output, fmt, size)
    else:
        target = _to_path(ckpt, output, fmt, size, inputs)
    if not in_place:
        registry.writer_of(target.family, f"-o {output}" if output not in (None, "-") else "standard output", ckpt)
    target.inputs = inputs
    return target


def _to_stream(ckpt: Checkpoint, path: str | None, fmt: str | None, size: int | None) -> Target:
    """One file on standard output (``path`` None) or on a FIFO or device (named by --format, else by
    its extension, else the input's format), whatever the input's layout."""
    if size:
        raise UsageError("--max-shard-size writes a directory; pass -o DIR")
    named = registry.by_extension(os.path.splitext(path or "")[1])
    family = registry.writable().get(fmt or "", named or _family(ckpt))
    if fmt and registry.get(family).directory:
        raise UsageError(f"--format {fmt} writes a directory; pass -o DIR")
    return Target(path, registry.file_family(family))  # a DCP input piped on is one torch file


def _to_path(ckpt: Checkpoint, output: str, fmt: str | None, size: int | None, inputs: Inputs) -> Target:
    from .sharded import checkpoint_files

    named = registry.by_extension(os.path.splitext(output)[1])
    wanted = registry.writable().get(fmt or "")
    if named and wanted and named != wanted:
        extensions = registry.get(wanted).extensions
        fix = os.path.splitext(output)[0] + extensions[0] if extensions else "a directory name"
        raise UsageError(f"-o {output} names a {named} file but --format {fmt} asks for {wanted};"
                         f" drop --format, or name the output {fix}")
    if size and named and not os.path.isdir(output):
        raise UsageError(f"--max-shard-size writes a directory, but -o {output} names a {named} file;"
                         f" pass a directory (-o {os.path.splitext(output)[0]})")
    directory = bool(size) or os.path.isdir(output) or output.endswith(os.sep) \
        or ((_sharded(ckpt) or _model_directory(ckpt)) and not named)
    family = wanted or (None if directory else named) or _family(ckpt)
    path = output.rstrip(os.sep) or output
    inputs.refuse_overwrite(output)  # every input of the command: the output, a directory holding one, inside one
    written = registry.get(family)
    if written.directory:
        if size:
            raise UsageError(f"--max-shard-size writes a Hugging Face sharded directory, not {written.a_checkpoint};"
                             " drop one of them")
        refuse_foreign(output, path, written.owns, written.a_checkpoint)
        return Target(path, family)
    if directory and registry.sharded_of(family) is None:
        raise UsageError(f"-o {output} is a directory, but a {written.display} checkpoint is one file: name one"
                         f" (-o {path.rstrip(os.sep)}{written.extensions[0] if written.extensions else ''}), or pass"
                         " --format safetensors for a sharded directory")
    if directory:
        refuse_foreign(output, path, checkpoint_files(path).__contains__, "a sharded checkpoint")
    return Target(path, family, directory, size)


def _in_place(ckpt: Checkpoint, output: str | None, fmt: str | None, size: int | None, inputs: Inputs) -> Target:
    """The input's own place and format; refuses a change of format and an input we may not rewrite."""
    if output not in (None, "-") and not _is_input(ckpt, output):
        raise UsageError("--in-place rewrites the input; do not also pass -o")
    if ckpt.path is None:
        raise UsageError("--in-place needs a checkpoint path, not standard input")
    place, family, sharded = _place(ckpt), _family(ckpt), _sharded(ckpt)
    wanted = registry.writable().get(fmt or "")
    if wanted and wanted != family:
        raise UsageError(f"--in-place keeps the input's format ({family}); --format {fmt} would change it;"
                         f" write the {wanted} checkpoint elsewhere with -o PATH")
    if size and not sharded:
        raise UsageError(f"--in-place keeps the input's format, but --max-shard-size would make {place} a sharded"
                         " directory; write it elsewhere with -o DIR")
    registry.writer_of(family, "--in-place", ckpt)
    _check_rewritable(ckpt, place)
    inputs.permit(place)
    rewritten = registry.get(ckpt.format).in_place_note
    notes = [f"{place} was {rewritten}"] if rewritten else []
    return Target(place, family, sharded, size, notes)


def _check_rewritable(ckpt: Checkpoint, place: str) -> None:
    """--in-place puts a new file (or directory) of ours where the input was. Refuse inputs that
    are read-only (their mode says: do not change me), and, unless we are root and can give a
    new file its old owner, inputs of another user (they would silently become ours)."""
    paths = [place]
    if _sharded(ckpt):
        paths += [ckpt.source] + [os.path.join(place, s) for s in sorted(set((ckpt.shards or {}).values()))]
    root = os.geteuid() == 0
    modes = {p: os.stat(p) for p in paths}
    read_only = [p for p, s in modes.items() if not s.st_mode & (0o222 if root else stat.S_IWUSR)]
    if read_only:
        shown = ", ".join(f"'{p}' (mode {stat.S_IMODE(modes[p].st_mode):04o})" for p in read_only)
        raise OutputError(f"--in-place: {shown} {'is' if len(read_only) == 1 else 'are'} read-only; nothing was"
                          " written; make it writable (chmod u+w) or write the result elsewhere with -o")
    foreign = [p for p, s in modes.items() if not root and s.st_uid != os.geteuid()]
    if foreign:
        shown = ", ".join(f"'{p}' (uid {modes[p].st_uid})" for p in foreign)
        raise OutputError(f"--in-place: {shown} {'belongs' if len(foreign) == 1 else 'belong'} to another user,"
                          " and a rewrite would make it yours; nothing was written; write the result elsewhere"
                          " with -o")


def _family(ckpt: Checkpoint) -> str:
    """The format a write of the input produces (registry.Format.family)."""
    return registry.get(ckpt.format).family


def _sharded(ckpt: Checkpoint) -> bool:
    return registry.get(ckpt.format).sharded


def _model_directory(ckpt: Checkpoint) -> bool:
    """Whether the input was given as a directory (a model directory holding one weights file): an
    output named without an extension is a directory too, with the model's other files."""
    return ckpt.path is not None and os.path.isdir(ckpt.path)


def _place(ckpt: Checkpoint) -> str:
    """What the input is on disk: its file, or its directory (a sharded or DCP checkpoint)."""
    return os.path.dirname(ckpt.source) if _sharded(ckpt) else ckpt.source


def _is_input(ckpt: Checkpoint, output: str) -> bool:
    return ckpt.path is not None and (_same(ckpt.path, output) or _same(_place(ckpt), output))


def _same(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)
