"""The only place that renders: rich tables for people, JSON documents for programs.

Functions here build text; printing is the caller's. Tables fit the terminal they are
shown on (low-priority columns give way, long names fold, nothing is cut); piped, they
keep every column on one line per tensor so that grep and awk work.
"""

from __future__ import annotations

import io
import json
import math

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .dtypes import BY_NAME
from .inspection import Inspection, Row
from .units import human_bytes

SCHEMA_VERSION = 1
_FORMAT_NAMES = {"torch": "torch zip", "torch-legacy": "torch legacy pickle", "safetensors": "safetensors",
                 "safetensors-sharded": "sharded safetensors", "torch-sharded": "sharded torch"}


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
        items = [f"{inner}{json.dumps(str(k), ensure_ascii=False)}: {_json(v, inner)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + f"\n{indent}}}"
    if isinstance(value, list) and value and any(isinstance(v, (dict, list)) for v in value):
        return "[\n" + ",\n".join(inner + _json(v, inner) for v in value) + f"\n{indent}]"
    return json.dumps(value, ensure_ascii=False)


def inspection_document(result: Inspection) -> dict:
    """The ``inspect --json`` document (schema in the README)."""
    tensors = []
    for row in result.rows:
        entry = {"name": row.name, "shape": list(row.shape), "dtype": row.dtype, "numel": row.numel,
                 "nbytes": row.nbytes, "kind": row.kind, "role": row.role, "tied_to": row.tied,
                 "stats": {k: number(v) for k, v in row.stats.as_dict().items()} if row.stats else None}
        if row.sha256 is not None:
            entry["sha256"] = row.sha256
        tensors.append(entry)
    document = {"schema_version": SCHEMA_VERSION, "command": "inspect", "source": result.source,
                "format": result.format, "key": result.key, "tensors": tensors, "ties": result.ties,
                "totals": result.totals, "extras": result.extras, "metadata": result.metadata,
                "notes": result.notes}
    if result.tree is not None:
        document["tree"] = result.tree
    return document


def short_number(value) -> str:
    """Numbers in at most about 8 characters: 0.0678, -0.349, 1234, -1.02e-4, 3.5e6."""
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
        return f"{value:#.3g}"
    if 1e3 <= abs(value) < 1e4:
        return f"{value:.0f}"
    mantissa, exponent = f"{value:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def _plural(count: int, noun: str) -> str:
    return f"{count:,} {noun}" + ("" if count == 1 else "s")


def shape_text(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape)) if shape else "scalar"


def _columns(result: Inspection) -> list[tuple[str, str, callable]]:
    """(header, justify, cell) for each column, most important first."""
    cols = [("name", "left", lambda r: escape(r.name)), ("kind", "left", lambda r: r.kind),
            ("shape", "right", lambda r: shape_text(r.shape)), ("dtype", "left", lambda r: BY_NAME[r.dtype].short)]
    if result.stats:
        stats = [("mean", "mean"), ("std", "std"), ("min", "min"), ("max", "max")]
        if any(r.stats and (r.stats.nan or r.stats.inf) for r in result.rows):
            cols += [("nan", "right", lambda r: _count(r, "nan")), ("inf", "right", lambda r: _count(r, "inf"))]
        cols += [(h, "right", lambda r, k=k: short_number(getattr(r.stats, k)) if r.stats else "-") for h, k in stats]
        cols.append(("zeros", "right", lambda r: f"{100 * r.stats.zeros / r.numel:.1f}%" if r.stats and r.numel else "-"))
        cols.append(("|max|", "right", lambda r: short_number(r.stats.abs_max) if r.stats else "-"))
    if any(r.sha256 for r in result.rows):
        cols.insert(4, ("sha256", "left", lambda r: r.sha256 or ""))
    cols.append(("numel", "right", lambda r: f"{r.numel:,}"))
    return cols


def _count(row: Row, field: str) -> str:
    value = getattr(row.stats, field) if row.stats else 0
    return f"{value:,}" if value else ""


def inspection_text(result: Inspection, width: int | None, color: bool) -> str:
    """The ``inspect`` report: a header line, the table, ties, totals, other entries."""
    out = io.StringIO()
    console = Console(file=out, width=width or 100_000, no_color=not color, highlight=False,
                      force_terminal=color, soft_wrap=width is None)
    totals = result.totals
    key = f" [dim]({escape(result.key)})[/dim]" if result.key else ""
    console.print(f"[bold]{escape(result.source)}[/bold]{key}: {_FORMAT_NAMES.get(result.format, result.format)},"
                  f" {_plural(totals['tensors'], 'tensor')}, {totals['parameters']:,} parameters"
                  + (f" + {totals['buffers']:,} in buffers" if totals["buffers"] else "")
                  + f", {human_bytes(totals['bytes'])}", soft_wrap=True)
    table, hidden = _table(result, width)
    console.print(table)
    if hidden:
        console.print(f"[dim](not shown at this width: {', '.join(hidden)}; --json has every field)[/dim]",
                      soft_wrap=True)
    for line in footer_lines(result):
        console.print(line, soft_wrap=True)
    return "\n".join(line.rstrip() for line in out.getvalue().splitlines()) + "\n"


def _table(result: Inspection, width: int | None) -> tuple[Table, list[str]]:
    """The per-tensor table. On a terminal, low-priority columns give way until it fits;
    before mean, std, min or max would go, long names fold instead (nothing is cut)."""
    cols = _columns(result)
    cells = [[cell(r) for _, _, cell in cols] for r in result.rows]
    headers = [h for h, _, _ in cols]
    core = headers.index("max") + 1 if "max" in headers else 4
    natural = max([len(headers[0])] + [len(row[0]) for row in cells])
    keep = list(range(len(cols)))
    while True:
        table = _build(cols, cells, keep, None)
        excess = 0 if width is None else _width(table) - width
        if excess <= 0:
            break
        if len(keep) <= core and (natural - excess >= 24 or len(keep) == 4):
            table = _build(cols, cells, keep, max(24, natural - excess))
            break
        keep.pop()
    return table, [headers[i] for i in range(len(cols)) if i not in keep]


def _build(cols, cells, keep, name_width: int | None) -> Table:
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1, 0, 0),
                  header_style="bold", expand=False)
    for i in keep:
        header, justify, _ = cols[i]
        table.add_column(header, justify=justify, overflow="fold", no_wrap=i != 0,
                         max_width=name_width if i == 0 else None)
    for row in cells:
        table.add_row(*(row[i] for i in keep))
    return table


def _width(table: Table) -> int:
    console = Console(width=100_000)
    return console.measure(table).maximum


def footer_lines(result: Inspection) -> list[str]:
    lines = []
    by_dtype = result.totals["by_dtype"]
    if len(by_dtype) > 1:
        lines.append("by dtype: " + "; ".join(f"{d} {_plural(v['tensors'], 'tensor')}, {v['numel']:,} elements,"
                                              f" {human_bytes(v['bytes'])}" for d, v in by_dtype.items()))
    for group in result.ties:
        lines.append("tied (one storage): " + " = ".join(escape(n) for n in group))
    if result.extras:
        lines.append("other entries:")
        lines += [f"  {escape(e['path'])}: {escape(e['summary'])}" for e in result.extras]
    if result.metadata:
        lines.append("metadata: " + ", ".join(f"{escape(k)}={escape(v[:60])}" for k, v in result.metadata.items()))
    lines += [f"note: {escape(n)}" for n in result.notes]
    return lines


def tree_text(tree: dict, depth: int | None, width: int | None, color: bool) -> str:
    """The ``inspect --tree`` report: parameters and buffers per module, indented."""
    out = io.StringIO()
    console = Console(file=out, width=width or 100_000, no_color=not color, highlight=False, force_terminal=color)
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1, 0, 0), header_style="bold")
    for header, justify in (("module", "left"), ("parameters", "right"), ("buffers", "right"), ("bytes", "right"),
                            ("share", "right")):
        table.add_column(header, justify=justify, overflow="fold" if header == "module" else "ellipsis")
    total = max(tree["parameters"], 1)

    def add(node: dict, level: int) -> None:
        label = "(all)" if level == 0 else "  " * (level - 1) + node["name"].rpartition(".")[2]
        table.add_row(escape(label), f"{node['parameters']:,}", f"{node['buffers']:,}" if node["buffers"] else "",
                      human_bytes(node["bytes"]), f"{100 * node['parameters'] / total:.1f}%")
        if depth is None or level < depth:
            for child in node["children"]:
                add(child, level + 1)

    add(tree, 0)
    console.print(table)
    return "\n".join(line.rstrip() for line in out.getvalue().splitlines()) + "\n"


def plan_document(plan, rows: list[dict], ckpt, output: str | None, dry_run: bool) -> dict:
    """The JSON document of a writing command's plan (--json)."""
    return {"schema_version": SCHEMA_VERSION, "command": plan.command, "source": ckpt.source,
            "output": output, "dry_run": dry_run, "changes": rows, "notes": plan.notes}


def recipe_document(planned, ckpt, output: str | None, dry_run: bool) -> dict:
    """The JSON document of an ``apply`` plan: each step's changes."""
    return {"schema_version": SCHEMA_VERSION, "command": "apply", "source": ckpt.source, "output": output,
            "dry_run": dry_run, "steps": [{"step": step.number, "op": step.op, "changes": rows, "notes": plan.notes}
                                          for step, plan, rows in planned]}


def plan_text(plan, rows: list[dict], width: int | None, color: bool, prefix: str = "") -> str:
    """The --dry-run table: each affected tensor, its shape and dtype, and what happens to it."""
    out = io.StringIO()
    console = Console(file=out, width=width or 100_000, no_color=not color, highlight=False, force_terminal=color)
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1, 0, 0), header_style="bold")
    for header, justify in (("name", "left"), ("shape", "right"), ("dtype", "left"), ("action", "left")):
        table.add_column(header, justify=justify, overflow="fold")
    for row in rows:
        shape, dtype = shape_text(tuple(row["shape"])), BY_NAME[row["dtype"]].short
        if row["new_shape"] is not None and row["new_shape"] != row["shape"]:
            shape += f" -> {shape_text(tuple(row['new_shape']))}"
        if row["new_dtype"] is not None and row["new_dtype"] != row["dtype"]:
            dtype += f" -> {BY_NAME[row['new_dtype']].short}"
        table.add_row(escape(row["name"]), shape, dtype, escape(row["action"]))
    console.print(f"{escape(prefix)}[bold]{plan.command}[/bold]: {_plural(len(rows), 'tensor')} would change"
                  " (dry run: nothing written)", soft_wrap=True)
    console.print(table)
    return "\n".join(line.rstrip() for line in out.getvalue().splitlines()) + "\n"


def diff_document(result) -> dict:
    """The ``diff --json`` document."""
    def entry(d) -> dict:
        return {"name": d.name, "status": d.status, "shape_a": list(d.shape_a), "shape_b": list(d.shape_b),
                "dtype_a": d.dtype_a, "dtype_b": d.dtype_b, "max_abs": number(d.max_abs),
                "max_rel": number(d.max_rel), "mismatched": d.mismatched if d.max_abs is not None else None}

    return {"schema_version": SCHEMA_VERSION, "command": "diff", "a": result.source_a, "b": result.source_b,
            "equal": result.equal, "atol": result.atol, "rtol": result.rtol, "values_compared": result.values,
            "identical": result.identical, "only_a": result.only_a, "only_b": result.only_b,
            "changed": [entry(d) for d in result.diffs], "extras": result.extras}


def diff_text(result, width: int | None, color: bool) -> str:
    """The ``diff`` report: a summary line, then each difference."""
    out = io.StringIO()
    console = Console(file=out, width=width or 100_000, no_color=not color, highlight=False, force_terminal=color)
    counts = [f"{result.identical} {'identical' if result.values else 'alike (values not compared)'}"]
    for status, label in (("different", "different"), ("close", "within tolerance"), ("shape", "reshaped"),
                          ("dtype", "retyped")):
        if result.of(status):
            counts.append(f"{len(result.of(status))} {label}")
    counts += [f"{len(result.only_a)} only in A", f"{len(result.only_b)} only in B"]
    verdict = "[green]equal[/green]" if result.equal else "[red]different[/red]"
    console.print(f"{escape(result.source_a)} (A) vs {escape(result.source_b)} (B): {verdict}: "
                  + ", ".join(counts), soft_wrap=True)
    if result.diffs:
        table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1, 0, 0), header_style="bold")
        for header, justify in (("name", "left"), ("change", "left"), ("shape", "right"), ("dtype", "left"),
                                ("max |a-b|", "right"), ("max rel", "right"), ("mismatched", "right")):
            table.add_column(header, justify=justify, overflow="fold")
        for d in result.diffs:
            shape = shape_text(d.shape_a) + ("" if d.shape_a == d.shape_b else f" -> {shape_text(d.shape_b)}")
            dtype = BY_NAME[d.dtype_a].short + ("" if d.dtype_a == d.dtype_b else f" -> {BY_NAME[d.dtype_b].short}")
            mismatched = f"{d.mismatched:,}/{d.numel:,}" if d.max_abs is not None else "-"
            table.add_row(escape(d.name), d.status, shape, dtype, short_number(d.max_abs), short_number(d.max_rel),
                          mismatched)
        console.print(table)
    for label, names in (("only in A", result.only_a), ("only in B", result.only_b)):
        if names:
            console.print(f"{label} ({len(names)}):", soft_wrap=True)
            for name in names:
                console.print(f"  {escape(name)}", soft_wrap=True)
    for e in result.extras:
        console.print(f"other entry {escape(e['path'])}: {escape(str(e['a']))} -> {escape(str(e['b']))}",
                      soft_wrap=True)
    return "\n".join(line.rstrip() for line in out.getvalue().splitlines()) + "\n"


def check_document(source: str, rules) -> dict:
    """The ``check --json`` document."""
    return {"schema_version": SCHEMA_VERSION, "command": "check", "source": source, "ok": all(r.ok for r in rules),
            "rules": [{"rule": r.rule, "ok": r.ok, "violations": r.violations} for r in rules]}


def check_text(source: str, rules) -> str:
    """The ``check`` report: one line per rule, then one per violation."""
    ok = all(r.ok for r in rules)
    lines = [f"{source}: {'every rule holds' if ok else 'FAILED'}"
             f" ({sum(not r.ok for r in rules)} of {len(rules)} rules broken)"]
    for rule in rules:
        lines.append(f"  {'ok  ' if rule.ok else 'FAIL'} {rule.rule}"
                     + ("" if rule.ok else f": {len(rule.violations)} violation{'s' if len(rule.violations) != 1 else ''}"))
        lines += [f"       {v['name'] + ' ' if v['name'] else ''}{v['message']}" for v in rule.violations]
    return "\n".join(lines) + "\n"


def groups_document(source: str, groups: dict) -> dict:
    """The ``groups --json`` document: names for each weight-decay group."""
    return {"schema_version": SCHEMA_VERSION, "command": "groups", "source": source, **groups}


def groups_text(ckpt, groups: dict) -> str:
    tensors = ckpt.tensors
    lines = []
    for label in ("decay", "no_decay", "buffers"):
        names = groups[label]
        title = {"buffers": "not parameters (buffers)"}.get(label, label)
        lines.append(f"{title}: {_plural(len(names), 'tensor')}, {sum(tensors[n].numel for n in names):,} values")
        lines += [f"  {n}" for n in names]
    return "\n".join(lines) + "\n"
