"""Commands that only read: inspect, diff, check, groups."""

from typing import Annotated, List, Optional

import typer

from .. import formats, report
from ..checkpoint import Checkpoint
from ..checks import RuleResult, parse_expectations, run_rules
from ..compare import compare
from ..dtypes import BY_NAME
from ..errors import UsageError
from ..groups import decay_groups
from ..inspection import inspect as inspect_checkpoint
from ..select import Selector
from ..select import select as choose
from .common import color_on_stdout, emit, note, open_checkpoint, progress, selected_names, terminal_width
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


def _union_names(a: Checkpoint, b: Checkpoint, select: SelectOptions) -> tuple[list[str], list[str]]:
    """The selection applied to both sides (a selector must match something on one of them)."""
    union = {**b.tensors, **a.tensors}
    selector = Selector(select.pattern, select.regex, select.exclude, select.kind)
    chosen, warnings = choose(union, selector, allow_empty=select.allow_empty)
    for warning in warnings:
        note(f"warning: {warning}")
    picked = set(chosen)
    return [n for n in a.tensors if n in picked], [n for n in b.tensors if n in picked]


@options(READ, SELECT)
def diff(
    a: Annotated[str, typer.Argument(metavar="A", help="The first checkpoint.", show_default=False)],
    b: Annotated[str, typer.Argument(metavar="B", help="The second checkpoint.", show_default=False)],
    atol: Annotated[float, typer.Option("--atol", min=0, help="Values within atol + rtol*|b| count as equal.")] = 0.0,
    rtol: Annotated[float, typer.Option("--rtol", min=0, help="Relative tolerance (see --atol).")] = 0.0,
    no_values: Annotated[bool, typer.Option("--no-values", help="Compare names, shapes and dtypes only (reads"
                                            " no tensor data).")] = False,
    json_: Annotated[bool, typer.Option("--json", help="Print one JSON document (schema in the README).")] = False,
    read: ReadOptions = None,
    select: SelectOptions = None,
):
    """Compare two checkpoints tensor by tensor; exit 0 when they are equal, 1 when they differ.

    Example: paramsurgeon diff before.pt after.safetensors --atol 1e-6
    """
    first, second = open_checkpoint(a, read), open_checkpoint(b, read)
    names_a, names_b = _union_names(first, second, select)
    size = 0 if no_values else sum(first.tensors[n].nbytes for n in names_a)
    with progress(2 * size, "comparing") as advance:
        result = compare(first, second, names_a, names_b, atol=atol, rtol=rtol, values=not no_values,
                         progress=advance)
    if json_:
        emit(report.to_json(report.diff_document(result)))
    else:
        emit(report.diff_text(result, terminal_width(), color_on_stdout()))
    raise typer.Exit(0 if result.equal else 1)


@options(READ, SELECT)
def check(
    ckpt: CKPT = None,
    finite: Annotated[bool, typer.Option("--finite", help="No NaN or Inf in any floating-point tensor"
                                         " (the rule when none is given).")] = False,
    max_abs: Annotated[Optional[float], typer.Option("--max-abs", metavar="X", help="Every |value| <= X.")] = None,
    like: Annotated[Optional[str], typer.Option("--like", metavar="OTHER", help="Same names, shapes and dtypes"
                                                " as OTHER.")] = None,
    expect: Annotated[List[str], typer.Option("--expect", metavar="NAME=SHAPE", help="This tensor exists, with"
                                              " this shape (64x3x7x7); repeatable.")] = [],
    expect_file: Annotated[Optional[str], typer.Option(
        "--expect-file", metavar="FILE", help="Expected tensors, one 'NAME [SHAPE] [DTYPE]' per line.")] = None,
    dtype: Annotated[Optional[str], typer.Option("--dtype", metavar="D", help="Every floating-point tensor is"
                                                 " of dtype D.")] = None,
    json_: Annotated[bool, typer.Option("--json", help="Print one JSON document (schema in the README).")] = False,
    read: ReadOptions = None,
    select: SelectOptions = None,
):
    """Check rules for CI: exit 0 when every rule holds, 1 with a report of each violation.

    A sharded checkpoint is also checked for agreement between its index and its shards.

    Example: paramsurgeon check model.safetensors --finite --max-abs 100 --like reference.pt
    """
    expectations = parse_expectations(expect, "--expect")
    if expect_file is not None:
        try:
            with open(expect_file, encoding="utf-8") as f:
                expectations.update(parse_expectations(f.read().splitlines(), expect_file))
        except OSError as e:
            raise UsageError(f"cannot read '{expect_file}': {e.strerror}") from e
    if dtype is not None and dtype.removeprefix("torch.") not in BY_NAME:
        raise UsageError(f"--dtype {dtype}: unknown dtype")
    rules: list[RuleResult] = []
    index = formats.sharded_index(ckpt)
    if index is not None:
        shards = RuleResult("shards")
        shards.violations = formats.verify_shards(ckpt, tuple(read.allow_global), read.unsafe_pickle)
        rules.append(shards)
        if not shards.ok:
            return _report_check(ckpt, rules, json_)
    checkpoint = open_checkpoint(ckpt, read)
    names = selected_names(checkpoint, select)
    other = open_checkpoint(like, read) if like is not None else None
    default = not (finite or max_abs is not None or other or expectations or dtype)
    tensors = checkpoint.tensors
    with progress(sum(tensors[n].nbytes for n in names), "checking") as advance:
        rules += run_rules(checkpoint, names, finite=finite or default, max_abs=max_abs, like=other,
                           expect=expectations, dtype=dtype and dtype.removeprefix("torch."), progress=advance)
    _report_check(checkpoint.source, rules, json_)


def _report_check(source: str, rules: list, json_: bool):
    if json_:
        emit(report.to_json(report.check_document(source, rules)))
    else:
        emit(report.check_text(source, rules))
    raise typer.Exit(0 if all(rule.ok for rule in rules) else 1)


@options(READ, SELECT)
def groups(
    ckpt: CKPT = None,
    no_decay: Annotated[List[str], typer.Option("--no-decay", metavar="GLOB", help="Also exempt these names"
                                                " from weight decay; repeatable.")] = [],
    decay: Annotated[List[str], typer.Option("--decay", metavar="GLOB", help="Decay these names whatever the"
                                             " rules say; repeatable.")] = [],
    json_: Annotated[bool, typer.Option("--json", help='Print {"decay": [...], "no_decay": [...]}.')] = False,
    read: ReadOptions = None,
    select: SelectOptions = None,
):
    """Split parameters into weight-decay groups: biases, norm and PReLU weights get none.

    Example: paramsurgeon groups model.pt --json > groups.json
    """
    checkpoint = open_checkpoint(ckpt, read)
    names = selected_names(checkpoint, select)
    result = decay_groups(checkpoint, names, no_decay=tuple(no_decay), decay=tuple(decay))
    if json_:
        emit(report.to_json(report.groups_document(checkpoint.source, result)))
    else:
        emit(report.groups_text(checkpoint, result))
