"""The only place that renders: text reports for people, JSON documents for programs.

Functions here build text; printing is the caller's. ``width`` is the terminal's (tables
fit it, see tables.py) or None when piped (plain columns, one line per row). Text that came
from a file (names, entries, metadata) is escaped here, before it is styled: tables escape
their cells, and ``_escaped`` the other lines.
"""

from __future__ import annotations

import functools
import json
import math
from operator import attrgetter

from ..bulk import paused_gc
from ..dtypes import BY_NAME
from ..formats import registry
from ..analysis.inspection import Inspection, Row
from .tables import Column, render, render_columns
from ..sizes import human_bytes, plural
from .diagnosis import histogram_document, sparkline
from .escape import printable

SCHEMA_VERSION = 1


def number(value: float | None):
    """A JSON-safe number: non-finite values become the strings 'nan', 'inf', '-inf'."""
    if value is None or not isinstance(value, float) or math.isfinite(value):
        return value
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")


def to_json(document) -> str:
    """Indented JSON with short lists of scalars (shapes, name groups) kept on one line."""
    return _json(document, "") + "\n"


def _json(value, indent: str) -> str:
    inner = indent + "  "
    if isinstance(value, dict) and value:
        items = [f"{inner}{_encoded(str(k))}: {_json(v, inner)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + f"\n{indent}}}"
    if isinstance(value, list) and value and any(isinstance(v, (dict, list)) for v in value):
        return "[\n" + ",\n".join(inner + _json(v, inner) for v in value) + f"\n{indent}]"
    return _encoded(value)


def _encoded(value) -> str:
    """json.dumps(value, ensure_ascii=False), made in C for the common values without an encoder
    per call (a document of 100,000 tensors has a million of them)."""
    kind = type(value)
    if kind is str:
        return _quoted(value)
    if kind is int:
        return int.__repr__(value)
    if kind is list and all(map(int.__instancecheck__, value)) and not any(map(bool.__instancecheck__, value)):
        return "[" + ", ".join(map(int.__repr__, value)) + "]"  # a shape
    return _encoder(value)


_quoted = json.encoder.encode_basestring  # a string as json.dumps(ensure_ascii=False) writes it
_encoder = json.JSONEncoder(ensure_ascii=False).encode


def inspection_document(result: Inspection) -> dict:
    """The ``inspect --json`` document (schema in the README)."""
    tensors = []
    for row in result.rows:
        entry = {"name": row.name, "shape": list(row.shape), "dtype": row.dtype, "numel": row.numel,
                 "nbytes": row.nbytes, "kind": row.kind, "role": row.role, "device": row.device, "tied_to": row.tied,
                 "stats": {k: number(v) for k, v in row.stats.as_dict().items()} if row.stats else None}
        if row.quant is not None:
            entry["quant"] = row.quant
        if row.sha256 is not None:
            entry["sha256"] = row.sha256
        if row.gguf_type is not None:
            entry["gguf_type"] = row.gguf_type
        if row.stats and row.stats.histogram is not None:
            entry["histogram"] = histogram_document(row.stats.histogram)
        tensors.append(entry)
    document = {"schema_version": SCHEMA_VERSION, "command": "inspect", "source": result.source,
                "format": result.format, "key": result.key, "tensors": tensors, "ties": result.ties,
                "totals": result.totals, "extras": result.extras, "metadata": result.metadata,
                "notes": result.read_notes + result.notes}
    if result.tree is not None:
        document["tree"], document["blocks"] = result.tree, result.blocks
    return document


def short_number(value) -> str:
    """Numbers in at most about 8 characters: 0.0678, -0.349, 100, 1234, -1.02e-4, 3.5e6."""
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if value == 0:
        return "0"
    if 1e-3 <= abs(value) < 1e3:
        return f"{value:#.3g}".removesuffix(".")  # 3 significant digits kept: 0.100, 1.50, 100
    if 1e3 <= abs(value) < 1e4:
        return f"{value:.0f}"
    mantissa, exponent = f"{value:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


@functools.lru_cache(maxsize=4096)
def shape_text(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape)) if shape else "scalar"


def _columns(result: Inspection) -> list[tuple[Column, callable]]:
    """Each column and how to fill it from all the rows at once (a pass in C each, where the cells
    are the rows' own fields: 100,000 tensors are 100,000 rows); on a narrow terminal the columns
    of priority 0 give way first, from the right (a histogram or digest asked for outlasts them)."""
    rows = result.rows
    cols = [(Column("name", priority=1), _each(_NAME)), (Column("kind", priority=1), _each(_KIND)),
            (Column("shape", True, 1), lambda rows: list(map(shape_text, map(_SHAPE, rows)))),
            (Column("dtype", priority=1), _dtypes)]
    if any(map(_GGUF_TYPE, rows)):
        cols.append((Column("gguf", priority=1), _each(_GGUF_TYPE)))
    if set(map(_DEVICE, rows)) - {"cpu"}:
        cols.append((Column("device", priority=1), _each(_DEVICE)))
    if result.stats:
        if any(r.stats and (r.stats.nan or r.stats.inf) for r in rows):
            cols += [(Column("nan", True, 1), _each(lambda r: _count(r, "nan"))),
                     (Column("inf", True, 1), _each(lambda r: _count(r, "inf")))]
        for key in ("mean", "std", "min", "max"):
            cols.append((Column(key, True), _each(lambda r, k=key: short_number(getattr(r.stats, k)) if r.stats else "-")))
        cols.append((Column("zeros", True),
                     _each(lambda r: f"{100 * r.stats.zeros / r.numel:.1f}%" if r.stats and r.numel else "-")))
        cols.append((Column("|max|", True), _each(lambda r: short_number(r.stats.abs_max) if r.stats else "-")))
        if any(r.stats and r.stats.histogram for r in rows):
            cols.append((Column("histogram", priority=1), _each(lambda r: sparkline(r.stats.histogram.counts)
                                                   if r.stats and r.stats.histogram else "")))
    if any(map(_SHA256, rows)):
        cols.insert(4, (Column("sha256", priority=1), _each(lambda r: r.sha256 or "")))
    cols.append((Column("numel", True), _numels))
    return cols


def _numels(rows: list[Row]) -> list[str]:
    """'1,024' for each row: formatted once per distinct count (a large model repeats a few)."""
    counts = list(map(_NUMEL, rows))
    shown = {n: f"{n:,}" for n in set(counts)}
    return list(map(shown.__getitem__, counts))


def _each(cell):
    """A column filled with ``cell(row)`` for every row."""
    return lambda rows: list(map(cell, rows))


def _dtypes(rows: list[Row]) -> list[str]:
    """'f32' for each row (a quantized tensor's scheme, 'fp8-block'): looked up once per dtype."""
    short = {name: BY_NAME[name].short for name in set(map(_DTYPE, rows))}
    shown = list(map(short.__getitem__, map(_DTYPE, rows)))
    return [r.quant["scheme"] if r.quant else d for r, d in zip(rows, shown)] if any(map(_QUANT, rows)) else shown


_NAME, _KIND, _SHAPE, _DTYPE, _NUMEL = (attrgetter("name"), attrgetter("kind"), attrgetter("shape"), attrgetter("dtype"),
                                        attrgetter("numel"))
_DEVICE, _SHA256, _GGUF_TYPE, _QUANT = attrgetter("device"), attrgetter("sha256"), attrgetter("gguf_type"), attrgetter("quant")


def _count(row: Row, field: str) -> str:
    value = getattr(row.stats, field) if row.stats else 0
    return f"{value:,}" if value else ""


@paused_gc()
def inspection_text(result: Inspection, width: int | None, color: bool) -> str:
    """The ``inspect`` report: a header line, the table, ties, totals, other entries."""
    totals = result.totals
    key = f" ({result.key})" if result.key else ""
    lines = [f"{result.source}{key}: {registry.get(result.format).display},"
             f" {plural(totals['tensors'], 'tensor')}, {plural(totals['parameters'], 'parameter')}"
             + (f" + {totals['buffers']:,} in buffers" if totals["buffers"] else "") + f", {human_bytes(totals['bytes'])}"]
    cols = _columns(result)
    cells = [fill(result.rows) for _, fill in cols]
    staying = [c.header for c, _ in sorted(cols, key=lambda col: -col[0].priority)]  # the order columns give way in
    table, hidden = render_columns([c for c, _ in cols], cells, width, color,
                                   core=staying.index("max") + 1 if "max" in staying else 4)
    notes = [f"(not shown at this width: {', '.join(hidden)}; --json has every field)"] if hidden else []
    return "\n".join(_escaped(lines) + [table.rstrip("\n")] + _escaped(notes + footer_lines(result))) + "\n"


def _escaped(lines: list[str]) -> list[str]:
    """Plain report lines with control characters escaped (tables escape their own cells)."""
    return [printable(line) for line in lines]


def footer_lines(result: Inspection) -> list[str]:
    lines = []
    by_dtype = result.totals["by_dtype"]
    if len(by_dtype) > 1:
        lines.append("by dtype: " + "; ".join(f"{d} {plural(v['tensors'], 'tensor')}, {plural(v['numel'], 'element')},"
                                              f" {human_bytes(v['bytes'])}" for d, v in by_dtype.items()))
    lines += ["tied (one storage): " + " = ".join(group) for group in result.ties]
    if result.extras:
        lines.append("other entries:")
        lines += [f"  {e['path']}: {e['summary']}" for e in result.extras]
    if result.metadata:
        lines.append("metadata: " + ", ".join(f"{k}={v[:60]}" for k, v in result.metadata.items()))
    return lines + [f"note: {n}" for n in result.notes]


def tree_text(tree: dict, depth: int | None, width: int | None, color: bool, blocks: list[dict] = ()) -> str:
    """The ``inspect --tree`` report: parameters and buffers per module, indented; then the repeated
    blocks ('repeated block: model.layers.N x 6')."""
    rows = []
    total = max(tree["parameters"], 1)

    def add(node: dict, level: int) -> None:
        label = "(all)" if level == 0 else "  " * (level - 1) + node["name"].rpartition(".")[2]
        rows.append([label, f"{node['parameters']:,}", f"{node['buffers']:,}" if node["buffers"] else "",
                     human_bytes(node["bytes"]), f"{100 * node['parameters'] / total:.1f}%"])
        if depth is None or level < depth:
            for child in node["children"]:
                add(child, level + 1)

    add(tree, 0)
    columns = [Column("module"), Column("parameters", True), Column("buffers", True), Column("bytes", True),
               Column("share", True)]
    return render(columns, rows, width, color)[0] + "".join(f"repeated block: {b['prefix']}.N x {b['count']}\n"
                                                            for b in blocks)


def plan_document(plan, rows: list[dict], ckpt, output: str | None, dry_run: bool) -> dict:
    """The JSON document of a writing command's plan (--json)."""
    return {"schema_version": SCHEMA_VERSION, "command": plan.command, "source": ckpt.source,
            "output": output, "dry_run": dry_run, "changes": rows, "notes": plan.notes, **plan.document()}


def recipe_document(planned, ckpt, output: str | None, dry_run: bool) -> dict:
    """The JSON document of an ``apply`` plan: each step's changes."""
    return {"schema_version": SCHEMA_VERSION, "command": "apply", "source": ckpt.source, "output": output,
            "dry_run": dry_run, "steps": [{"step": number, "op": plan.command, "changes": rows, "notes": plan.notes}
                                          for number, (_, plan, rows) in enumerate(planned, 1)]}


def plan_text(plan, rows: list[dict], width: int | None, color: bool, prefix: str = "") -> str:
    """The --dry-run table: each affected tensor, its shape and dtype, and what happens to it."""
    cells = []
    for row in rows:
        shape, dtype = shape_text(tuple(row["shape"])), BY_NAME[row["dtype"]].short
        if row["new_shape"] is not None and row["new_shape"] != row["shape"]:
            shape += f" -> {shape_text(tuple(row['new_shape']))}"
        if row["new_dtype"] is not None and row["new_dtype"] != row["dtype"]:
            dtype += f" -> {BY_NAME[row['new_dtype']].short}"
        cells.append([row["name"], shape, dtype, row["action"]])
    columns = [Column("name"), Column("shape", True), Column("dtype"), Column("action")]
    title = f"{prefix}{plan.command}: {plural(len(rows), 'tensor')} would change (dry run: nothing written)"
    text = "".join(printable(line) + "\n" for line in (plan.heading, title) if line)
    text += render(columns, cells, width, color)[0]
    if plan.kept:
        cells = [[k["name"], shape_text(tuple(k["shape"])), BY_NAME[k["dtype"]].short, k["reason"]] for k in plan.kept]
        text += printable(f"left as they are: {plural(len(plan.kept), 'tensor')}") + "\n"
        text += render([Column("name"), Column("shape", True), Column("dtype"), Column("why")], cells, width, color)[0]
    return text


def extraction_document(extract, extraction, dry_run: bool) -> dict:
    """The ``extract-lora --json`` document: the inputs, the adapter's config and each module."""
    return {"schema_version": SCHEMA_VERSION, "command": "extract-lora", "base": extract.base, "tuned": extract.tuned,
            "output": extract.output, "dry_run": dry_run, "config": extraction.config, "modules": extraction.rows}


def extraction_text(extraction, output: str, dry_run: bool, width: int | None, color: bool) -> str:
    """The ``extract-lora`` table: each tensor, its shape, layout, rank and (when computed) its
    relative reconstruction error; a dry run says so above it and has no error column."""
    rows = extraction.rows
    cells = [[r["tensor"], "x".join(map(str, r["shape"])), r["layout"], str(r["rank"] or "-"),
              "-" if r["error"] is None or r["rank"] is None else f"{r['error']:.3g}"] for r in rows]
    columns = [Column("tensor"), Column("shape", True), Column("layout"), Column("rank", True), Column("error", True)]
    if not dry_run:
        return render(columns, cells, width, color)[0]
    title = f"extract-lora: {plural(len(rows), 'tensor')} would go into {output} (dry run: nothing written)\n"
    return title + render(columns[:-1], [c[:-1] for c in cells], width, color)[0]


def diff_document(result) -> dict:
    """The ``diff --json`` document."""
    def entry(d) -> dict:
        return {"name": d.name, "status": d.status, "shape_a": list(d.shape_a), "shape_b": list(d.shape_b),
                "dtype_a": d.dtype_a, "dtype_b": d.dtype_b, "max_abs": number(d.max_abs),
                "max_rel": number(d.max_rel), "mismatched": d.mismatched if d.max_abs is not None else None}

    return {"schema_version": SCHEMA_VERSION, "command": "diff", "a": result.source_a, "b": result.source_b,
            "equal": result.equal, "atol": result.atol, "rtol": result.rtol, "values_compared": result.values,
            "whole_file": result.whole, "identical": result.identical, "only_a": result.only_a,
            "only_b": result.only_b, "changed": [entry(d) for d in result.diffs],
            "ties": {"only_a": result.ties_a, "only_b": result.ties_b}, "extras": result.extras,
            "extra_tensors": [entry(d) for d in result.extra_diffs], "extra_identical": result.extra_identical}


def diff_text(result, width: int | None, color: bool) -> str:
    """The ``diff`` report: a summary line, then each difference."""
    counts = [f"{result.identical:,} {'identical' if result.values else 'alike (values not compared)'}"]
    for status, label in (("different", "different"), ("close", "within tolerance"), ("shape", "reshaped"),
                          ("dtype", "retyped")):
        if result.of(status):
            counts.append(f"{len(result.of(status)):,} {label}")
    counts += [f"{len(result.only_a):,} only in A", f"{len(result.only_b):,} only in B"]
    summary = f"{result.source_a} (A) vs {result.source_b} (B): {'equal' if result.equal else 'different'}: " \
              + ", ".join(counts)
    if result.extra_identical or result.extras or result.extra_diffs:
        close = sum(d.status == "close" for d in result.extra_diffs)
        different = len(result.extras) + len(result.extra_diffs) - close
        rest = [f"{result.extra_identical:,} identical"] + ([f"{different:,} different"] if different else []) \
            + ([f"{close:,} within tolerance"] if close else [])
        summary += "; rest of the file: " + ", ".join(rest)
        summary += "; ties differ" if result.ties_a or result.ties_b else ""
    lines = _escaped([summary])
    if result.diffs:
        lines.append(_diff_table(result.diffs, "name", width, color))
    for label, names in (("only in A", result.only_a), ("only in B", result.only_b)):
        if names:
            lines += _escaped([f"{label} ({len(names):,}):"] + [f"  {name}" for name in names])
    if result.extras or result.extra_diffs:
        lines += _escaped(["rest of the file:"] + [f"  {e['path']}: {_side(e['a'])} -> {_side(e['b'])}"
                                                   for e in result.extras])
    if result.extra_diffs:
        lines.append(_diff_table(result.extra_diffs, "path", width, color))
    lines += _escaped([f"tied in {side} only: " + " = ".join(group)
                       for side, groups in (("A", result.ties_a), ("B", result.ties_b)) for group in groups])
    return "\n".join(lines) + "\n"


def _side(summary: str | None) -> str:
    return "(absent)" if summary is None else summary


def _diff_table(diffs, first: str, width: int | None, color: bool) -> str:
    """One row per tensor that differs: its change, shape, dtype and the largest differences."""
    rows = []
    for d in diffs:
        shape = shape_text(d.shape_a) + ("" if d.shape_a == d.shape_b else f" -> {shape_text(d.shape_b)}")
        dtype = BY_NAME[d.dtype_a].short + ("" if d.dtype_a == d.dtype_b else f" -> {BY_NAME[d.dtype_b].short}")
        mismatched = f"{d.mismatched:,}/{d.numel:,}" if d.max_abs is not None else "-"
        rows.append([d.name, d.status, shape, dtype, short_number(d.max_abs), short_number(d.max_rel), mismatched])
    columns = [Column(first), Column("change"), Column("shape", True), Column("dtype"), Column("max |a-b|", True),
               Column("max rel", True), Column("mismatched", True)]
    return render(columns, rows, width, color)[0].rstrip("\n")


def check_document(source: str, rules) -> dict:
    """The ``check --json`` document."""
    return {"schema_version": SCHEMA_VERSION, "command": "check", "source": source, "ok": all(r.ok for r in rules),
            "rules": [{"rule": r.rule, "ok": r.ok, "violations": r.violations} for r in rules]}


SHOWN_VIOLATIONS = 20  # per rule in the text report; --json lists every one


def check_text(source: str, rules) -> str:
    """The ``check`` report: one line per rule, then one per violation (at most SHOWN_VIOLATIONS)."""
    broken = sum(not r.ok for r in rules)
    verdict = "FAILED" if broken else "every rule holds"
    lines = [f"{source}: {verdict} ({broken} of {plural(len(rules), 'rule')} broken)"]
    for rule in rules:
        lines.append(f"  {'FAIL' if rule.violations else 'ok  '} {rule.rule}"
                     + (f": {plural(len(rule.violations), 'violation')}" if rule.violations else ""))
        lines += [f"       {v['name'] + ' ' if v['name'] else ''}{v['message']}"
                  for v in rule.violations[:SHOWN_VIOLATIONS]]
        if len(rule.violations) > SHOWN_VIOLATIONS:
            lines.append(f"       ... and {len(rule.violations) - SHOWN_VIOLATIONS} more (--json lists every one)")
    return "\n".join(_escaped(lines)) + "\n"


def groups_document(source: str, groups: dict) -> dict:
    """The ``groups --json`` document: names for each weight-decay group."""
    return {"schema_version": SCHEMA_VERSION, "command": "groups", "source": source, **groups}


def groups_text(ckpt, groups: dict) -> str:
    tensors = ckpt.tensors
    lines = []
    for label in ("decay", "no_decay", "buffers"):
        names = groups[label]
        title = {"buffers": "not parameters (buffers)"}.get(label, label)
        values = plural(sum(tensors[n].numel for n in names), "value")
        lines.append(f"{title}: {plural(len(names), 'tensor')}, {values}")
        lines += [f"  {n}" for n in names]
    return "\n".join(_escaped(lines)) + "\n"
