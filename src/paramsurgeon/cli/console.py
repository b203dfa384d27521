"""What every command does around its own work: open, select, show progress, print."""

import os
import shutil
import sys
from contextlib import contextmanager
from contextvars import ContextVar
from time import monotonic
from typing import TYPE_CHECKING, Callable, Iterator, Optional

from .. import formats
from ..checkpoint import Checkpoint
from ..errors import OutputError, UsageError
from ..redaction import redacted
from ..report.escape import printable
from ..selection import Selection
from .options import Read

if TYPE_CHECKING:
    from ..formats.inputs import Inputs
    from ..formats.loader import Loader


_HELD: ContextVar[Optional[list[str]]] = ContextVar("held_notes", default=None)


def note(message: str) -> None:
    """A note, warning or summary line: standard error, never the results (held while notes_held)."""
    line = printable(redacted(message)) + "\n"
    held = _HELD.get()
    if held is not None:
        held.append(line)
        return
    sys.stderr.write(line)
    sys.stderr.flush()


@contextmanager
def notes_held(hold: bool = True) -> Iterator[Callable[[], None]]:
    """Hold the notes of a command until it ends; the caller shows them (the function yielded) when
    the command did its work, and drops them when it failed, so that a failure is its one line
    (``hold`` False: shown as they come, as --debug wants)."""
    held: list[str] = []
    token = _HELD.set(held if hold else None)

    def show() -> None:
        sys.stderr.write("".join(held))
        sys.stderr.flush()
        held.clear()

    try:
        yield show
    finally:
        _HELD.reset(token)


def stdout_is_terminal() -> bool:
    return sys.stdout.isatty()


def color_on_stdout() -> bool:
    return stdout_is_terminal() and "NO_COLOR" not in os.environ and os.environ.get("TERM") != "dumb"


def terminal_width() -> Optional[int]:
    """The width to fit tables to: the terminal's, or None (unlimited) when piped."""
    return shutil.get_terminal_size().columns if stdout_is_terminal() else None


def emit(text: str | bytes) -> None:
    """Write a result to standard output as rendered (report/ escaped what came from the file
    before styling it; a URL's query hidden); a failed write (a full disk, a device error) is an
    OutputError."""
    try:
        if isinstance(text, bytes):
            sys.stdout.buffer.write(text)
        else:
            sys.stdout.write(redacted(text))
        sys.stdout.flush()
    except BrokenPipeError:
        raise  # the reader went away: the command ends quietly
    except OSError as e:
        raise OutputError(f"cannot write to standard output: {e.strerror or e}; what was written is incomplete") from e


def loader(read: Read, shared_key: bool = False, raw: bool = False) -> "Loader":
    """The command's one loader of its inputs, with its reading options (see formats/loader.py);
    ``raw``: each quantized tensor's stored parts as they are (--raw)."""
    from ..formats.loader import Loader

    return Loader(key=read.key, allow_globals=tuple(read.allow_global), unsafe_pickle=read.unsafe_pickle,
                  shared_key=shared_key, raw=raw, download=read.download)


def open_checkpoint(path: Optional[str], load: "Loader", role: Optional[str] = "the checkpoint",
                    named: bool = False) -> Checkpoint:
    """Open ``path`` with the command's --key, an input in the ``role`` the user gave it ('--against'),
    which no output may overwrite; notes (e.g. which --key was chosen) go to stderr, ``named`` after
    the input they are about (a command of several inputs, whose notes would otherwise read alike)."""
    ckpt = load.checkpoint(path, load.key, role)
    show_notes(ckpt, named)
    return ckpt


def show_notes(ckpt: Checkpoint, named: bool) -> None:
    """``ckpt``'s notes (which --key was chosen, a tie read as an alias) on stderr, ``named`` after it."""
    for message in ckpt.notes:
        about = f"{ckpt.source}: " if named and not message.startswith(ckpt.source) else ""
        note(f"note: {about}{message}")


def selected_names(ckpt: Checkpoint, selection: Selection, tensors: Optional[dict] = None) -> list[str]:
    """The names the selection flags pick among ``tensors`` (default: the checkpoint's; every
    tensor when no flag narrows it). --allow-empty's warnings go to stderr."""
    names, warnings = selection.choose(ckpt.tensors if tensors is None else tensors, ckpt.key)
    for warning in warnings:
        note(f"warning: {warning}")
    return names


def written(ckpt: Checkpoint, target: formats.Target, dedupe: bool, tensors_only: bool = False) -> tuple[int, int]:
    """How many tensors the output holds and their bytes: ``ckpt`` as the writer lays it out
    (formats.writing.writable: quantized parts, a GGUF dequantized for another format), with ties
    stored as the format stores them (registry.Format.ties): shared storage once (torch), every name
    or one per tie group with --dedupe (safetensors), or every name."""
    from ..formats import registry
    from ..formats.writing import writable

    ckpt = writable(ckpt, target, tensors_only)
    tensors, ties = ckpt.tensors, registry.get(target.family).ties
    if ties == "recorded":
        from ..formats.safetensors import plan

        entries, _ = plan(ckpt, {}, dedupe)
        return len(entries), sum(t.nbytes for _, t in entries)
    if target.family == "gguf":
        from ..formats.ggufwriter import stored_sizes

        sizes = stored_sizes(ckpt)
        if sizes is not None:
            return len(sizes), sum(sizes)
    aliases = {n for group in ckpt.ties() for n in group[1:]} if ties == "shared" else set()
    return len(tensors), sum(t.nbytes for n, t in tensors.items() if n not in aliases)


def output_target(ckpt: Checkpoint, write, inputs: "Inputs", max_shard_size: Optional[str] = None) -> formats.Target:
    """Where and in which format ``ckpt`` is written (the Write options), which may not be one of
    the command's ``inputs``; its notes go to stderr."""
    target = formats.resolve_target(ckpt, write.output, write.format, write.in_place, max_shard_size, inputs)
    for message in target.notes:
        note(f"note: {message}")
    if not target.sharded and not write.dry_run:
        if write.scheduler is not None:
            raise UsageError(f"--scheduler spreads the shards of a sharded output over a cluster;"
                             f" {target.path or 'standard output'} is one file; write a directory (-o DIR/, with"
                             " --max-shard-size for convert) or use --workers")
        if write.resume:
            raise UsageError(f"--resume finishes an interrupted sharded write; {target.path or 'standard output'}"
                             " is one file, written whole or not at all")
    return target


def write_checkpoint(ckpt: Checkpoint, target: formats.Target, write, seed: int | None = None) -> str:
    """Write ``ckpt`` (every storage moved to the cpu first with --device cpu), with a progress
    bar; returns what was written: '122 tensors, 273.4 kB'. ``seed``: the one drawn for the run,
    which a cluster's workers use too."""
    from ..checkpoint.locations import to_cpu
    from ..sizes import human_bytes, plural

    if write.device:
        to_cpu(ckpt)
    count, size = written(ckpt, target, write.dedupe, write.tensors_only)
    with progress(size, "writing") as advance:
        notes = formats.save(ckpt, target, dedupe=write.dedupe, tensors_only=write.tensors_only, progress=advance,
                             work=work(write, target.inputs, seed), resume=write.resume)
    for message in notes:
        note(message)
    return f"{plural(count, 'tensor')}, {human_bytes(size)}"


COMMAND_LINE: ContextVar[tuple[list[str], Callable]] = ContextVar("command_line")  # (argv, how to run it again)


def work(options, inputs: "Inputs", seed: int | None = None):
    """The parallel.Work of the command's Workers ``options``; for a cluster, with the command line
    its workers run again (and the seed drawn, if any, so that they draw the same values), which
    cannot read again what came on standard input (one of the command's ``inputs``)."""
    if options.scheduler is None:
        return options.work()
    if inputs.standard_input:
        raise UsageError("--scheduler: the cluster's workers read the inputs from their paths, and a checkpoint"
                         " on standard input has none; pass its path")
    from ..parallel.cluster import Job

    argv, rerun = COMMAND_LINE.get()
    return options.work(Job(tuple(argv + (["--seed", str(seed)] if seed is not None else [])), os.getcwd(), rerun))


PROGRESS_DELAY = float(os.environ.get("PARAMSURGEON_PROGRESS_DELAY", "1.0"))  # seconds before a bar shows


@contextmanager
def progress(total: int, label: str) -> Iterator[Callable[[int], None]]:
    """An ``advance(nbytes)`` callback that shows a bar on a terminal for work that takes about a
    second: once PROGRESS_DELAY has passed and, at the rate measured since the first advance, at
    least half of that delay of work remains (a small file read after a slow start shows none)."""
    if not sys.stderr.isatty() or "NO_COLOR" in os.environ or total <= 0:
        yield lambda n: None
        return
    started = monotonic()
    state: dict = {"bar": None, "done": 0, "first": None}

    def advance(nbytes: int) -> None:
        state["done"] += nbytes
        now = monotonic()
        if state["bar"] is None and state["first"] is not None and now - started >= PROGRESS_DELAY:
            first_time, first_done = state["first"]
            remaining = (total - state["done"]) * (now - first_time) / max(state["done"] - first_done, 1)
            if remaining >= PROGRESS_DELAY / 2:
                state["bar"], state["task"] = _bar(label, total)
        state["first"] = state["first"] or (now, state["done"])
        if state["bar"] is not None:
            state["bar"].update(state["task"], completed=state["done"])

    try:
        yield advance
    finally:
        if state["bar"] is not None:
            state["bar"].stop()


def _bar(label: str, total: int):
    """A started rich progress bar on standard error, and its task."""
    from rich.console import Console
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)

    bar = Progress(TextColumn(label), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
                   console=Console(stderr=True), transient=True)
    bar.start()
    return bar, bar.add_task(label, total=total)
