"""The commands that read: inspect, diff, check, groups, and convert. Each is its options
(a dataclass, declared once) and a function that opens, calls the library, and prints;
the library is imported when the command runs, so --help starts fast.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import typer

from .. import declare
from ..declare import REQUIRED, option
from ..errors import UsageError
from ..selection import Selection
from .console import (color_on_stdout, emit, loader, note, open_checkpoint, output_target, progress, selected_names,
                      terminal_width, work, write_checkpoint, written)
from .options import Input, Json, Pair, Raw, Read, Workers, Write


@dataclass(kw_only=True)
class InspectOptions:
    no_stats: bool = option(False, "--no-stats", help="Shapes and dtypes only: reads no tensor data.")
    tree: bool = option(False, "--tree", help="Parameter counts per module instead of per tensor.")
    depth: int | None = option(None, "--depth", minimum=0, help="With --tree: levels to show.")
    hash: bool = option(False, "--hash", help="Add the sha256 of each tensor's values.")
    hist: bool = option(False, "--hist", help="Add a histogram of each tensor's values (a sparkline; --json: edges"
                                              " and counts).")
    bins: int | None = option(None, "--bins", metavar="N", minimum=1, help="With --hist: bins between min and max"
                                                                           " (default 32).")

    def __post_init__(self) -> None:
        declare.check(self, "inspect")
        if self.depth is not None and not self.tree:
            raise UsageError(f"--depth {self.depth} limits the levels of --tree; pass --tree --depth {self.depth}")
        if self.bins is not None and not self.hist:
            raise UsageError(f"--bins {self.bins} sets the bins of --hist; pass --hist --bins {self.bins}")
        if self.hist and (self.no_stats or self.tree):
            raise UsageError("--hist reads the values; it does not go with --no-stats or --tree")


def inspect(given: Input, options: InspectOptions, output: Json, read: Read, stored: Raw, select: Selection,
            spread: Workers) -> None:
    """Show every tensor (name, kind, shape, dtype, statistics), ties, totals and the rest of the file.

    A quantized weight is one row: its scheme in the dtype column, statistics of its dequantized
    values, the bytes its stored parts take; --raw lists the parts as they are stored.
    """
    from ..analysis.inspection import inspect as inspect_checkpoint
    from ..report import render

    load = loader(read, raw=stored.raw)
    checkpoint = open_checkpoint(given.ckpt, load)
    names = selected_names(checkpoint, select)
    stats = not (options.no_stats or options.tree)
    reads_data = stats or options.hash
    tensors = checkpoint.tensors
    with progress(sum(tensors[n].nbytes for n in names) if reads_data else 0, "reading") as advance:
        result = inspect_checkpoint(checkpoint, names, stats=stats, hashes=options.hash, tree=options.tree,
                                    progress=advance if reads_data else None,
                                    bins=(options.bins or 32) if options.hist else None,
                                    work=work(spread, load.inputs))
    if output.json:
        emit(render.to_json(render.inspection_document(result)), )
    elif options.tree:
        emit(render.tree_text(result.tree, options.depth, terminal_width(), color_on_stdout(), result.blocks))
    else:
        emit(render.inspection_text(result, terminal_width(), color_on_stdout()))


@dataclass(kw_only=True)
class DiffOptions:
    atol: float = option(0.0, "--atol", minimum=0, help="Values within atol + rtol*|b| count as equal.")
    rtol: float = option(0.0, "--rtol", minimum=0, help="Relative tolerance (see --atol).")
    no_values: bool = option(False, "--no-values", help="Compare names, shapes and dtypes only (reads no tensor"
                                                        " data).")
    tensors_only: bool = option(False, "--tensors-only", help="Compare the named tensors only, not the rest of the"
                                                              " file (optimizer state, epoch) nor ties.")


def diff(pair: Pair, options: DiffOptions, output: Json, read: Read, stored: Raw, select: Selection) -> None:
    """Compare two checkpoints: tensors, the rest of the file and ties; exit 0 when equal, 1 when not.

    The rest of the file (optimizer moments, EMA copies, the epoch) is compared by path, and ties
    (shared storage) by name; --tensors-only, or a selection, compares the chosen tensors only.
    """
    from ..analysis.compare import bytes_to_compare, compare
    from ..report import render

    if pair.a == pair.b == "-":  # the loader opens an input once: the second '-' would be the first
        raise UsageError("diff: only one checkpoint can come from standard input ('-')")
    load = loader(read, raw=stored.raw)
    first, second = open_checkpoint(pair.a, load), open_checkpoint(pair.b, load)
    picked = set(selected_names(first, select, {**second.tensors, **first.tensors}))
    names_a = [n for n in first.tensors if n in picked]
    names_b = [n for n in second.tensors if n in picked]
    whole = not (options.tensors_only or select.selector.narrows or select.exclude)
    size = 0 if options.no_values else bytes_to_compare(first, names_a, whole)
    with progress(2 * size, "comparing") as advance:
        result = compare(first, second, names_a, names_b, atol=options.atol, rtol=options.rtol,
                         values=not options.no_values, whole=whole, progress=advance)
    if output.json:
        emit(render.to_json(render.diff_document(result)), )
    else:
        emit(render.diff_text(result, terminal_width(), color_on_stdout()))
    raise typer.Exit(0 if result.equal else 1)


@dataclass(kw_only=True)
class CheckOptions:
    finite: bool = option(False, "--finite", help="No NaN or Inf in any floating-point tensor (the rule when none"
                                                  " is given).")
    max_abs: float | None = option(None, "--max-abs", metavar="X", minimum=0, help="Every |value| <= X.")
    like: str | None = option(None, "--like", metavar="OTHER", help="Same names, shapes and dtypes as OTHER.")
    expect: list[str] = option([], "--expect", metavar="NAME=SHAPE", help="This tensor exists, with this shape"
                                                                          " (64x3x7x7); repeatable.")
    expect_file: str | None = option(None, "--expect-file", metavar="FILE",
                                     help="Expected tensors, one 'NAME [SHAPE] [DTYPE]' per line.")
    dtype: str | None = option(None, "--dtype", metavar="D", help="Every floating-point tensor is of dtype D.")
    health: bool = option(False, "--health", help="Diagnose the float parameters: dead, constant, spike, exploding,"
                                                  " untrained; quantized weights: scale, orphan (README: the rules"
                                                  " and their thresholds).")
    ignore: list[str] = option([], "--ignore", metavar="RULE[:GLOB]", help="With --health: drop the findings of"
                               " RULE (on the tensors matching GLOB); repeatable.")
    strict: bool = option(False, "--strict", help="With --health: warnings fail the check too.")
    complete: bool = option(False, "--complete", help="Only that a sharded checkpoint's index and shards agree"
                            " (always checked first); reads headers and sizes, no tensor data, unless other"
                            " rules are given.")

    def __post_init__(self) -> None:
        from ..analysis.health import parse_ignores

        if (self.ignore or self.strict) and not self.health:
            shown = f"--ignore {self.ignore[0]}" if self.ignore else "--strict"
            raise UsageError(f"{shown} tunes the rules of --health; pass --health {shown}")
        parse_ignores(self.ignore)


def check(given: Input, options: CheckOptions, output: Json, read: Read, select: Selection,
          spread: Workers) -> None:
    """Check rules for CI: exit 0 when every rule holds, 1 with a report of each violation.

    A sharded checkpoint is also checked for agreement between its index and its shards.
    """
    from ..analysis import health
    from ..analysis.checks import RuleResult, parse_expectations, run_rules, validate_dtype

    dtype = validate_dtype(options.dtype)
    expectations = parse_expectations(options.expect, "--expect")
    if options.expect_file is not None:
        try:
            with open(options.expect_file, encoding="utf-8") as f:
                expectations.update(parse_expectations(f.read().splitlines(), options.expect_file))
        except OSError as e:
            raise UsageError(f"cannot read '{options.expect_file}': {e.strerror}") from e
    rules: list[RuleResult] = []
    load = loader(read)
    problems = load.shard_problems(given.ckpt)
    if problems is not None:
        shards = RuleResult("shards")
        shards.violations = problems
        rules.append(shards)
        if not shards.ok:
            _report_check(given.ckpt, rules, output.json)
    checkpoint = open_checkpoint(given.ckpt, load)
    if problems is None and options.complete:  # a single file: opening it checked its sizes fit it
        rules.append(RuleResult("shards"))
    names = selected_names(checkpoint, select)
    other = open_checkpoint(options.like, load) if options.like is not None else None
    default = not (options.finite or options.max_abs is not None or other or expectations or dtype or options.health
                   or options.complete)
    values = options.finite or default or options.max_abs is not None
    diagnosed = health.checked_names(checkpoint, names) if options.health else []
    ignores = health.parse_ignores(options.ignore, diagnosed, checkpoint.key)
    size = sum(checkpoint.tensors[n].nbytes for n in names) * values + sum(checkpoint.tensors[n].nbytes
                                                                           for n in diagnosed)
    with progress(size, "checking") as advance:
        rules += run_rules(checkpoint, names, finite=options.finite or default, max_abs=options.max_abs, like=other,
                           expect=expectations, dtype=dtype, progress=advance)
        findings = health.diagnose(checkpoint, health.measure(checkpoint, diagnosed, progress=advance,
                                                              work=work(spread, load.inputs)), names) \
            if options.health else None
    if findings is not None:
        findings = health.ignored(findings, ignores)
        findings = health.strict(findings) if options.strict else findings
        rules += health_rules(findings, options.strict, health.quantized(checkpoint))
    _report_check(checkpoint.source, rules, output.json, findings)


def health_rules(findings: list, strict: bool = False, quantized: bool = False) -> list:
    """The health rules that can fail as check rules (every rule with ``strict``; the warnings are
    reported beside them); those of quantized weights only for a checkpoint that holds some."""
    from ..analysis.checks import RuleResult
    from ..analysis.health import FAILING, QUANTIZED, RULES

    shown = [r for r in (RULES if strict else FAILING) if quantized or r not in QUANTIZED]
    rules = [RuleResult(f"health {rule}") for rule in shown]
    for finding in findings:
        if finding.fails:
            rules[shown.index(finding.rule)].add(finding.name, finding.message)
    return rules


def _report_check(source: str, rules: list, json: bool, findings: list | None = None) -> None:
    from ..report import diagnosis, render

    if json:
        emit(render.to_json(diagnosis.with_findings(render.check_document(source, rules), findings)))
    else:
        emit(render.check_text(source, rules) + diagnosis.warning_text(findings))
    raise typer.Exit(0 if all(rule.ok for rule in rules) else 1)


@dataclass(kw_only=True)
class GroupRules:
    no_decay: list[str] = option([], "--no-decay", metavar="GLOB",
                                 help="Also exempt these names from weight decay; repeatable.")
    decay: list[str] = option([], "--decay", metavar="GLOB", help="Decay these names whatever the rules say;"
                                                                  " repeatable.")


def groups(given: Input, rules: GroupRules, output: Json, read: Read, select: Selection) -> None:
    """Split parameters into weight-decay groups: biases, norm and PReLU weights get none."""
    from ..analysis.groups import decay_groups
    from ..report import render

    checkpoint = open_checkpoint(given.ckpt, loader(read))
    names = selected_names(checkpoint, select)
    warnings: list[str] | None = [] if select.allow_empty else None
    result = decay_groups(checkpoint, names, no_decay=tuple(rules.no_decay), decay=tuple(rules.decay),
                          warnings=warnings)
    for warning in warnings or []:
        note(f"warning: {warning}")
    if output.json:
        emit(render.to_json(render.groups_document(checkpoint.source, result)), )
    else:
        emit(render.groups_text(checkpoint, result))


@dataclass(kw_only=True)
class Sharding:
    max_shard_size: str | None = option(None, "--max-shard-size", metavar="SIZE", help="Write a Hugging Face"
                                        " sharded directory with shards of at most SIZE (5GB = 5*10^9 bytes, as the"
                                        " hub counts).")


@dataclass(kw_only=True)
class GgufOptions:
    dtype: str | None = option(None, "--dtype", metavar="D", help="GGUF input: the dtype of every tensor written"
                               " (default: F32/F16/BF16 kept as they are, quantized types dequantized to float32).")
    names: str | None = option(None, "--names", metavar="hf", help="GGUF input: 'hf' writes a llama-architecture"
                               " file under Hugging Face names, with its config.json, as a directory.")


def convert(given: Input, sharding: Sharding, gguf: GgufOptions, read: Read, write: Write,
            select: Selection) -> None:
    """Convert between torch, safetensors and GGUF, single file and sharded directory; values are
    untouched, but for a GGUF's quantized tensors (dequantized) and --dtype.

    A selection (-p, -x) writes just the tensors it picks.
    """
    import os

    from ..checkpoint import Tensor
    from ..formats import registry
    from ..sizes import human_bytes, plural

    load = loader(read)
    checkpoint = open_checkpoint(given.ckpt, load)
    names = selected_names(checkpoint, select)
    if checkpoint.format == "gguf" and write.format is None and write.output not in (None, "-") \
            and not registry.by_extension(os.path.splitext(write.output)[1]):
        write = dataclasses.replace(write, format="safetensors")  # a GGUF converted to a directory
    if gguf.dtype is not None or gguf.names is not None:
        checkpoint, write = _from_gguf(checkpoint, names, gguf, write)
    elif len(names) != len(checkpoint.tensors):
        checkpoint = checkpoint.with_container({n: t for n, t in checkpoint.container.items()
                                                if n in set(names) or not isinstance(t, Tensor)})
    target = output_target(checkpoint, write, load.inputs, sharding.max_shard_size)
    if checkpoint.made and not target.sharded:
        raise UsageError(f"--names hf writes a Hugging Face directory (weights and config.json); -o"
                         f" {write.output} names a file; pass a directory")
    where = target.path or "standard output"
    layout = target.family
    if target.sharded:
        layout += f", sharded by {human_bytes(target.max_shard_size)}" if target.max_shard_size \
            else ", sharded as before" if registry.get(checkpoint.format).sharded else ", a directory of one shard"
    if write.dry_run:
        count, size = written(checkpoint, target, write.dedupe, write.tensors_only)
        note(f"would write {plural(count, 'tensor')} ({human_bytes(size)}) to {where} as {layout}")
        return
    done = write_checkpoint(checkpoint, target, write)
    note(f"wrote {where} ({layout}, {done})" + "".join(f", and {name}" for name in checkpoint.made))


def _from_gguf(checkpoint, names: list[str], options: GgufOptions, write: Write):
    """(checkpoint, write options) for --dtype and --names of a GGUF input."""
    import os

    from ..analysis.checks import validate_dtype
    from ..dtypes import BY_NAME
    from ..formats.ggufconvert import is_gguf, plain

    if not is_gguf(checkpoint):
        shown = "--dtype" if options.dtype is not None else "--names"
        raise UsageError(f"{shown} applies to a GGUF input; {checkpoint.source} is {checkpoint.format}")
    if options.names not in (None, "hf"):
        raise UsageError(f"--names {options.names}: expected --names hf (or no --names: GGUF's own names)")
    dtype = BY_NAME[validate_dtype(options.dtype)] if options.dtype is not None else None
    hf = options.names == "hf"
    if hf and write.output not in (None, "-") and not os.path.splitext(write.output)[1] \
            and not write.output.endswith(os.sep):
        write = dataclasses.replace(write, output=write.output + os.sep)  # a directory, for config.json
    return plain(checkpoint, names, dtype, hf), write


@dataclass(kw_only=True)
class ReportOptions:
    output: str = option(REQUIRED, "-o", "--output", metavar="PATH", help="The HTML file to write ('-': standard"
                                                                           " output).")
    against: str | None = option(None, "--against", metavar="OTHER", help="Also show how far each tensor moved"
                                                                          " from OTHER: ||a - b|| / ||b||.")


def report(given: Input, options: ReportOptions, read: Read, select: Selection, spread: Workers) -> None:
    """Write one self-contained HTML page: statistics along the depth, health findings, histograms.

    The page loads nothing from the network; with --against, each tensor's relative change
    shows which layers fine-tuning moved. Needs matplotlib (pip install 'paramsurgeon[report]').
    """
    from ..analysis import drift, health
    from ..analysis.inspection import inspect as inspect_checkpoint
    from ..dtypes import BY_NAME
    from ..formats.atomic import output_file
    from ..report import html
    from ..sizes import human_bytes, plural

    html.require_matplotlib()
    load = loader(read)
    checkpoint = open_checkpoint(given.ckpt, load)
    names = selected_names(checkpoint, select)
    other = open_checkpoint(options.against, load, "--against") if options.against is not None else None
    if options.output != "-":
        load.inputs.refuse_overwrite(options.output)  # before the work
    result = inspect_checkpoint(checkpoint, names, stats=False)
    floats = [r.name for r in result.rows if BY_NAME[r.dtype].floating]
    size = sum(checkpoint.tensors[n].nbytes for n in floats) * (3 if other else 1)
    with progress(size, "reading") as advance:
        stats = health.measure(checkpoint, floats, bins=HISTOGRAM_BINS, drawn=html.drawn(result.rows),
                               progress=advance, work=work(spread, load.inputs), doing="report")
        changes = drift.relative_changes(checkpoint, other, floats, advance) if other is not None else None
    for row in result.rows:
        row.stats = stats.get(row.name)
    result.stats = True
    findings = health.diagnose(checkpoint, {n: stats[n] for n in health.checked_names(checkpoint, floats)})
    page = html.report_page(result, findings, changes, other.source if other else None).encode()
    if options.output == "-":
        emit(page)
        return
    with output_file(options.output, load.inputs) as sink:
        sink.write(page)
    note(f"wrote {options.output} ({human_bytes(len(page))}: {plural(len(result.rows), 'tensor')},"
         f" {plural(len(findings), 'finding')})")


HISTOGRAM_BINS = 32


EXAMPLES = {
    inspect: "paramsurgeon inspect samples/resnet.pt -p 'layer1.*'",
    diff: "paramsurgeon diff before.pt after.safetensors --atol 1e-6",
    check: "paramsurgeon check model.safetensors --finite --max-abs 100 --like reference.pt",
    groups: "paramsurgeon groups model.pt --json > groups.json",
    convert: "paramsurgeon convert samples/resnet.pt -o resnet.safetensors",
    report: "paramsurgeon report tuned.pt --against base.pt -o report.html",
}
