"""What the reading commands do: inspect, diff, check, groups."""

import typer

from .. import formats, report
from ..checkpoint import Checkpoint
from ..checks import RuleResult, parse_expectations, run_rules, validate_rules
from ..compare import bytes_to_compare, compare
from ..errors import UsageError
from ..groups import decay_groups
from ..inspection import inspect as inspect_checkpoint
from .common import color_on_stdout, emit, open_checkpoint, progress, selected_names, terminal_width
from .options import SelectOptions


def inspect(ckpt, no_stats, json_, tree, depth, hash_, read, select):
    """Show every tensor (name, kind, shape, dtype, statistics), ties, totals and the rest of the file."""
    checkpoint = open_checkpoint(ckpt, read)
    names = selected_names(checkpoint, select)
    stats = not (no_stats or tree)
    reads_data = stats or hash_
    tensors = checkpoint.tensors
    with progress(sum(tensors[n].nbytes for n in names) if reads_data else 0, "reading") as advance:
        result = inspect_checkpoint(checkpoint, names, stats=stats, hashes=hash_, tree=tree,
                                    progress=advance if reads_data else None)
    if json_:
        emit(report.to_json(report.inspection_document(result)), raw=True)
    elif tree:
        emit(report.tree_text(result.tree, depth, terminal_width(), color_on_stdout()))
    else:
        emit(report.inspection_text(result, terminal_width(), color_on_stdout()))


def _union_names(a: Checkpoint, b: Checkpoint, select: SelectOptions) -> tuple[list[str], list[str]]:
    """The selection applied to both sides (a selector must match something on one of them)."""
    picked = set(selected_names(a, select, {**b.tensors, **a.tensors}))
    return [n for n in a.tensors if n in picked], [n for n in b.tensors if n in picked]


def diff(a, b, atol, rtol, no_values, tensors_only, json_, read, select):
    """Compare two checkpoints: tensors, the rest of the file and ties; exit 0 when equal, 1 when not.
    A selection (or --tensors-only) limits the comparison to the tensors it picks, without ties."""
    first, second = open_checkpoint(a, read), open_checkpoint(b, read)
    names_a, names_b = _union_names(first, second, select)
    whole = not (tensors_only or select.pattern or select.regex or select.exclude or select.kind)
    size = 0 if no_values else bytes_to_compare(first, names_a, whole)
    with progress(2 * size, "comparing") as advance:
        result = compare(first, second, names_a, names_b, atol=atol, rtol=rtol, values=not no_values, whole=whole,
                         progress=advance)
    if json_:
        emit(report.to_json(report.diff_document(result)), raw=True)
    else:
        emit(report.diff_text(result, terminal_width(), color_on_stdout()))
    raise typer.Exit(0 if result.equal else 1)


def check(ckpt, finite, max_abs, like, expect, expect_file, dtype, json_, read, select):
    """Check rules for CI: exit 0 when every rule holds, 1 with a report of each violation."""
    dtype = validate_rules(max_abs, dtype)
    expectations = parse_expectations(expect, "--expect")
    if expect_file is not None:
        try:
            with open(expect_file, encoding="utf-8") as f:
                expectations.update(parse_expectations(f.read().splitlines(), expect_file))
        except OSError as e:
            raise UsageError(f"cannot read '{expect_file}': {e.strerror}") from e
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
                           expect=expectations, dtype=dtype, progress=advance)
    _report_check(checkpoint.source, rules, json_)


def _report_check(source: str, rules: list, json_: bool):
    if json_:
        emit(report.to_json(report.check_document(source, rules)), raw=True)
    else:
        emit(report.check_text(source, rules))
    raise typer.Exit(0 if all(rule.ok for rule in rules) else 1)


def groups(ckpt, no_decay, decay, json_, read, select):
    """Split parameters into weight-decay groups: biases, norm and PReLU weights get none."""
    checkpoint = open_checkpoint(ckpt, read)
    names = selected_names(checkpoint, select)
    result = decay_groups(checkpoint, names, no_decay=tuple(no_decay), decay=tuple(decay))
    if json_:
        emit(report.to_json(report.groups_document(checkpoint.source, result)), raw=True)
    else:
        emit(report.groups_text(checkpoint, result))
