"""Commands that only read: inspect."""

from typing import Annotated, Optional

import typer

from .. import report
from ..inspection import inspect as inspect_checkpoint
from .common import color_on_stdout, emit, open_checkpoint, progress, selected_names, terminal_width
from .options import READ, SELECT, ReadOptions, SelectOptions, options

CKPT = Annotated[Optional[str], typer.Argument(
    metavar="CKPT", help="Checkpoint file, sharded directory or index; '-' or omitted: standard input.",
    show_default=False)]


@options(READ, SELECT)
def inspect(
    ckpt: CKPT = None,
    no_stats: Annotated[bool, typer.Option("--no-stats", help="Shapes and dtypes only: reads no tensor data.")] = False,
    json_: Annotated[bool, typer.Option("--json", help="Print one JSON document (schema in the README).")] = False,
    tree: Annotated[bool, typer.Option("--tree", help="Parameter counts per module instead of per tensor.")] = False,
    depth: Annotated[Optional[int], typer.Option("--depth", min=0, help="With --tree: levels to show.")] = None,
    hash_: Annotated[bool, typer.Option("--hash", help="Add the sha256 of each tensor's values.")] = False,
    read: ReadOptions = None,
    select: SelectOptions = None,
):
    """Show every tensor (name, kind, shape, dtype, statistics), ties, totals and the rest of the file.

    Example: paramsurgeon inspect samples/resnet.pt -p 'layer1.*'
    """
    checkpoint = open_checkpoint(ckpt, read)
    names = selected_names(checkpoint, select)
    stats = not (no_stats or tree)
    reads_data = stats or hash_
    tensors = checkpoint.tensors
    with progress(sum(tensors[n].nbytes for n in names) if reads_data else 0, "reading") as advance:
        result = inspect_checkpoint(checkpoint, names, stats=stats, hashes=hash_, tree=tree,
                                    progress=advance if reads_data else None)
    if json_:
        emit(report.to_json(report.inspection_document(result)))
    elif tree:
        emit(report.tree_text(result.tree, depth, terminal_width(), color_on_stdout()))
    else:
        emit(report.inspection_text(result, terminal_width(), color_on_stdout()))
