"""The merge command: open every input, rehearse the plan (all checks before anything is
computed), print it (--dry-run, --json) or write the result, streaming: each merged tensor is
computed when the writer reaches it."""

from __future__ import annotations

from typing import Optional

from .. import formats
from ..checkpoint import Checkpoint
from ..errors import ParamSurgeonError, SelectionError, UsageError
from ..formats.files import refuse_terminal
from ..ops.merge import Merge
from ..ops.surgery import Step, draw_seeds, perform, rehearse
from ..report import render
from ..report.escape import printable
from ..report.tables import Column
from ..report.tables import render as table
from ..sizes import human_bytes, plural
from .console import color_on_stdout, emit, note, progress, terminal_width
from .options import Read, Surgery, Write

EXAMPLE = "paramsurgeon merge ft-a.pt ft-b.pt --base base.pt --method ties --density 0.5 -o merged.pt"


def run_merge(merge: Merge, read: Read, write: Write, surgery: Surgery) -> None:
    """Combine checkpoints tensor by tensor (linear, slerp, task-arithmetic, ties, dare-linear,
    dare-ties), streaming: one tensor of each input in memory at a time.

    The first checkpoint (the --base for task methods) is the one written: tensors that are not
    merged (integers, unselected) and the rest of the file come from it.
    """
    steps, seeds = draw_seeds([Step(merge)], None)
    for message in seeds:
        note(f"merge: {message}")
    merge = steps[0].operation
    load = _loader(read)
    ckpt = load(merge.written, None)
    for message in ckpt.notes:
        note(f"note: {message}")
    target = formats.resolve_target(ckpt, write.output, write.format, write.in_place)
    if target.path is None and not write.dry_run:
        refuse_terminal()  # before any value is computed
        if surgery.json:
            raise UsageError("--json prints the plan on standard output, where the checkpoint is going;"
                             " pass -o PATH or --dry-run")
    [(_, plan, rows)] = rehearse(ckpt, steps, load)
    for message in plan.notes:
        note(f"merge: {message}")
    if surgery.json:
        emit(render.to_json({**render.plan_document(plan, rows, ckpt, target.path, write.dry_run),
                             **plan.document()}))
    elif write.dry_run:
        emit(_plan_text(plan, rows, ckpt))
    if write.dry_run:
        return
    [done], notes = perform(ckpt, steps, load, reset_optimizer=surgery.reset_optimizer)
    for message in notes:
        note(f"merge: {message}")
    tensors = ckpt.tensors
    size = sum(t.nbytes for t in tensors.values())
    with progress(size, "merging") as advance:
        formats.save(ckpt, target, dedupe=write.dedupe, tensors_only=write.tensors_only, progress=advance)
    note(f"merge: {done.summary()}; wrote {target.path or 'standard output'} ({len(tensors)} tensors,"
         f" {human_bytes(size)})")


def _loader(read: Read):
    """``load(path, key)`` opening each input once; --key applies to the torch inputs (a
    safetensors or sharded input is already a flat mapping of names to tensors)."""
    opened: dict = {}
    options = {"allow_globals": tuple(read.allow_global), "unsafe_pickle": read.unsafe_pickle}

    def open_one(path: Optional[str]) -> Checkpoint:
        try:
            return formats.load(path, key=read.key, **options)
        except SelectionError as e:
            if read.key is None or path in (None, "-"):
                raise
            try:
                flat = formats.load(path, **options)
            except ParamSurgeonError:
                raise e from None
            if flat.format.split("-")[0] in ("torch", "dcp"):
                raise
            return flat

    def load(path: Optional[str], _key: Optional[str]) -> Checkpoint:
        if path not in opened:
            opened[path] = open_one(path)
        return opened[path]

    return load


def _plan_text(plan, rows: list[dict], ckpt: Checkpoint) -> str:
    """The dry run: the method and inputs, the tensors merged, those taken from the first input and why."""
    width, color = terminal_width(), color_on_stdout()
    text = render.plan_text(plan, rows, width, color)
    text = f"{printable(plan.description)}\n{text}"
    if plan.kept:
        tensors = ckpt.tensors
        cells = [[k["name"], render.shape_text(tensors[k["name"]].shape), tensors[k["name"]].dtype.short, k["reason"]]
                 for k in plan.kept]
        title = f"taken from {ckpt.source} as they are: {plural(len(plan.kept), 'tensor')}"
        text += f"{printable(title)}\n" + table([Column("name"), Column("shape", True), Column("dtype"), Column("why")], cells,
                                     width, color)[0]
    return text


__all__ = ["EXAMPLE", "run_merge"]
