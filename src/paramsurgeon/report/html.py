"""The ``report`` page: one self-contained HTML file (inline SVG drawn by matplotlib, inline
CSS, no script, nothing fetched when opened) with the statistics along the network's depth,
the health findings, per-tensor histograms and, against another checkpoint, how far each
tensor moved."""

from __future__ import annotations

import html
import importlib
import io
import math
import warnings

from ..analysis.depth import depth_order
from ..analysis.drift import Change
from ..analysis.inspection import Inspection, Row
from ..dtypes import BY_NAME
from ..errors import UsageError
from ..redaction import redacted
from ..sizes import human_bytes, plural
from .render import shape_text, short_number

MAX_HISTOGRAMS = 48  # small multiples: tensors with findings first, then spread along the depth
MAX_BARS = 256  # of the change chart, one labelled bar each: a 7B Llama's 291 tensors, its 256 evenly spaced
_STYLE = """body{font:14px system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222;background:#fff}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:12px}td,th{padding:2px 8px;text-align:left;border-bottom:1px solid #eee}
td.n{text-align:right;font-variant-numeric:tabular-nums}.fail{color:#b00020;font-weight:600}.warning{color:#a05a00}
svg{max-width:100%;height:auto}.note{color:#555}"""
_COLORS = {"conv": "#1f77b4", "linear": "#ff7f0e", "embedding": "#2ca02c", "batchnorm": "#d62728",
           "layernorm": "#9467bd", "groupnorm": "#8c564b", "rmsnorm": "#e377c2", "norm": "#7f7f7f", "prelu": "#bcbd22",
           "rnn": "#17becf", "unknown": "#555555"}


def require_matplotlib() -> None:
    """Refuse early, with the fix, when the plotting library is not installed."""
    try:
        importlib.import_module("matplotlib")
    except ImportError:
        raise UsageError("report draws its charts with matplotlib, which is not installed; install it with"
                         " pip install 'paramsurgeon[report]' (or pip install matplotlib)") from None


def report_page(result: Inspection, findings: list, changes: dict | None, against: str | None) -> str:
    """The whole page as text; ``result.rows`` carry stats with histograms (floating tensors)."""
    rows = [r for r in result.rows if r.stats is not None and r.numel and _finite(r)]
    layers = [r for r in rows if r.role == "weight" and len(r.shape) >= 2] or [r for r in rows if r.role != "buffer"]
    layers = _along_the_depth(layers)
    parts = [f"<h1>{_e(redacted(result.source))}</h1>", _summary(result, findings, against)]
    parts += ["<h2>Health</h2>", _findings_table(findings)]
    if layers:
        parts += ["<h2>Along the depth (weight matrices and kernels, in the network's order)</h2>",
                  _depth_chart(layers)]
    if changes is not None:
        parts += [f"<h2>Relative change against {_e(against)}: ||a - b|| / ||b||</h2>", _change_section(result, changes)]
    chosen = _histogram_rows(rows, findings)
    if chosen:
        note = "" if len(chosen) == len(rows) else (f"<p class=note>{len(chosen)} of {len(rows)} tensors: those with"
                                                    " findings, then weight matrices and kernels evenly spaced along"
                                                    " the file, then other parameters.</p>")
        parts += ["<h2>Histograms (between each tensor's min and max)</h2>", note, _histograms(chosen)]
    parts += ["<h2>Every tensor</h2>", _tensor_table(result.rows, changes)]
    body = "\n".join(parts)
    return (f"<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8><title>paramsurgeon report:"
            f" {_e(redacted(result.source))}</title><style>{_STYLE}</style></head><body>\n{body}\n</body></html>\n")


def _along_the_depth(rows: list[Row]) -> list[Row]:
    """``rows`` in the network's order: numbers in names compare as numbers."""
    by_name = {r.name: r for r in rows}
    return [by_name[name] for name in depth_order(list(by_name))]


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _finite(row: Row) -> bool:
    return not (row.stats.nan or row.stats.inf)


def _summary(result: Inspection, findings: list, against: str | None) -> str:
    totals = result.totals
    failing = sum(f.fails for f in findings)
    verdict = (f"<span class=fail>{plural(failing, 'failing finding')}</span>" if failing else "no failing finding") + \
        f", {plural(len(findings) - failing, 'warning')}"
    compared = f"; compared with {_e(against)}" if against else ""
    return (f"<p>{_e(result.format)}, {plural(totals['tensors'], 'tensor')}, {plural(totals['parameters'], 'parameter')}"
            f", {human_bytes(totals['bytes'])}; health: {verdict}{compared}.</p>")


def _findings_table(findings: list) -> str:
    if not findings:
        return "<p>No rule is broken (dead, constant, spike, exploding, untrained, nonfinite).</p>"
    lines = ["<table><tr><th>rule</th><th>severity</th><th>tensor</th><th>value</th><th>threshold</th><th>finding</th>"
             "</tr>"]
    for f in findings:
        severity = "fail" if f.fails else "warning"
        lines.append(f"<tr><td class={severity}>{f.rule}</td><td class={severity}>{severity}</td><td>{_e(f.name)}</td>"
                     f"<td class=n>{_e(short_number(f.value))}</td><td class=n>{_e(short_number(f.threshold))}</td>"
                     f"<td>{_e(f.message)}</td></tr>")
    return "\n".join(lines) + "</table>"


def _svg(figure) -> str:
    """The figure as inline SVG (text as text, fixed ids, no metadata)."""
    import matplotlib

    out = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "paramsurgeon"}), warnings.catch_warnings():
        # text stays text, drawn by the browser's fonts: a glyph matplotlib's font lacks (CJK) is no problem
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        figure.savefig(out, format="svg", metadata={"Date": None, "Creator": None, "Type": None, "Format": None})
    text = out.getvalue()
    return text[text.index("<svg"):]


def _figure(width: float, height: float, **margins):
    """A figure with fixed margins (a layout engine would measure every label: seconds per page)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height))
    figure.subplots_adjust(**margins)
    return figure


def _depth_ticks(ax, names: list[str]) -> None:
    step = max(1, math.ceil(len(names) / 24))
    ax.set_xticks(range(0, len(names), step), [names[i] for i in range(0, len(names), step)], rotation=90,
                  fontsize=6)


def _depth_chart(layers: list[Row]) -> str:
    label = _label_inches(layers)
    figure = _figure(11, 6 + label, left=0.08, right=0.99, top=0.98, bottom=label / (6 + label), hspace=0.08)
    axes = figure.subplots(3, 1, sharex=True)
    colors = [_COLORS.get(r.kind, "#555555") for r in layers]
    series = [("std", [r.stats.std or 0.0 for r in layers]), ("max |x|", [r.stats.abs_max for r in layers]),
              ("L2 norm", [_norm(r) for r in layers])]
    for ax, (label, values) in zip(axes, series):
        ax.plot(range(len(layers)), values, color="#bbbbbb", linewidth=0.8, zorder=1)
        ax.scatter(range(len(layers)), values, c=colors, s=10, zorder=2)
        ax.set_ylabel(label)
        _scale(ax, values)
        ax.grid(True, alpha=0.3)
    kinds = list(dict.fromkeys(r.kind for r in layers))
    axes[0].legend(handles=[_marker(k) for k in kinds], loc="upper right", fontsize=7, ncols=min(len(kinds), 6))
    _depth_ticks(axes[-1], [r.name for r in layers])
    return _svg(figure)


def _scale(ax, values: list[float], axis: str = "y") -> bool:
    """A log axis when the positive values span more than a decade (labelled in plain text, 1e-05
    or 0.02: matplotlib's default 10^x labels go through its TeX parser, a third of a second per
    page); else the linear one. Returns whether it is logarithmic."""
    from matplotlib.ticker import LogFormatter

    positive = [v for v in values if v > 0]
    if not positive or max(positive) <= 10 * min(positive):
        return False
    getattr(ax, f"set_{axis}scale")("log")
    getattr(ax, f"{axis}axis").set_major_formatter(LogFormatter())
    getattr(ax, f"{axis}axis").set_minor_formatter(LogFormatter(labelOnlyBase=False))
    return True


_LABEL_CHARACTERS = 50  # a name longer than this is shortened in the middle where it labels a bar


def _label_inches(rows: list) -> float:
    """Room for the names beside a chart (6 pt)."""
    longest = min(_LABEL_CHARACTERS, max(len(r if isinstance(r, str) else r.name) for r in rows))
    return 0.25 + 0.055 * longest


def _marker(kind: str):
    from matplotlib.lines import Line2D

    return Line2D([], [], marker="o", linestyle="", color=_COLORS.get(kind, "#555555"), label=kind)


def _norm(row: Row) -> float:
    """sqrt(sum x^2) from the mean and the sample variance."""
    s = row.stats
    return math.sqrt(max(0.0, (row.numel - 1) * (s.std or 0.0) ** 2 + row.numel * s.mean ** 2))


def _change_section(result: Inspection, changes: dict[str, Change | None]) -> str:
    compared = [(n, changes[n]) for n in depth_order([r.name for r in result.rows if changes.get(r.name) is not None])]
    if not compared:
        return "<p>No tensor has the same name, shape and a floating dtype in both checkpoints.</p>"
    moved = [(n, c) for n, c in compared if 0 < c.value < math.inf]  # NaN or Inf in a tensor: no measure drawn
    ranked = sorted(moved, key=lambda item: -item[1].value)[:20]
    table = ["<table><tr><th>most moved</th><th>relative change</th></tr>"]
    table += [f"<tr><td>{_e(n)}</td><td class=n>{_change_text(c)}</td></tr>" for n, c in ranked]
    was_zero = sum(c.was_zero for _, c in compared)
    note = (f"; {plural(was_zero, 'tensor')} all zeros in the other checkpoint (marked <i>was zero</i>): their"
            " change is RMS(a - b) / RMS(b), b's root mean square over every compared tensor" if was_zero else "")
    bars = moved if len(moved) <= MAX_BARS else [moved[int(i * len(moved) / MAX_BARS)] for i in range(MAX_BARS)]
    if len(bars) < len(moved):
        note += f"; the chart shows {len(bars)} of the {len(moved):,} that moved, evenly spaced along the depth"
    return (_change_chart(bars) if bars else "") + "\n" + "\n".join(table) + "</table>" + \
        f"<p class=note>{plural(len(compared), 'tensor')} compared, {sum(c.value == 0 for _, c in compared):,}" \
        f" unchanged{note}.</p>"


def _change_text(change: Change | None) -> str:
    if change is None:
        return "-"
    return _e(short_number(change.value)) + (" (was zero)" if change.was_zero else "")


def _change_chart(moved: list[tuple[str, Change]]) -> str:
    """One horizontal bar per tensor that moved, top to bottom along the depth, each labelled
    with its name; tensors that were zero in the other checkpoint in their own colour."""
    label = _label_inches([n for n, _ in moved])
    height = 0.8 + 0.14 * len(moved)
    figure = _figure(11, height, left=label / 11, right=0.99, top=1 - 0.15 / height, bottom=0.5 / height)
    ax = figure.subplots()
    values = [c.value for _, c in moved]
    logarithmic = _scale(ax, values, "x")
    left = min(values) / 2 if logarithmic else 0.0
    colors = ["#ff7f0e" if c.was_zero else "#1f77b4" for _, c in moved]
    bars = ax.hlines(range(len(moved)), left, values, colors=colors, linewidth=max(0.5, min(8.0, 600 / len(moved))))
    bars.set_gid("change-bars")  # one collection, however many tensors
    ax.set_ylim(len(moved) - 0.5, -0.5)
    ax.set_yticks(range(len(moved)), [_shorten(n, _LABEL_CHARACTERS) for n, _ in moved], fontsize=6)
    ax.set_xlabel("||a - b|| / ||b||")
    ax.grid(True, axis="x", alpha=0.3)
    if any(c.was_zero for _, c in moved):
        from matplotlib.lines import Line2D

        ax.legend(handles=[Line2D([], [], color="#ff7f0e", label="was zero: RMS(a - b) / RMS(b)")], loc="lower right",
                  fontsize=7)
    return _svg(figure)


def drawn(rows: list[Row]) -> set[str]:
    """The tensors whose histograms the page shows besides those with findings: weight matrices
    and kernels, then the other floating-point parameters, evenly spaced (known before reading)."""
    floats = [r for r in rows if BY_NAME[r.dtype].floating and r.role != "buffer" and r.numel]
    chosen: list[Row] = []
    for pool in ([r for r in floats if r.role == "weight" and len(r.shape) >= 2], floats):
        rest = [r for r in pool if r not in chosen]
        room = MAX_HISTOGRAMS - len(chosen)
        if room > 0 and rest:
            step = max(1, len(rest) / room)
            chosen += [rest[int(i * step)] for i in range(min(room, len(rest)))]
    return {r.name for r in chosen}


def _histogram_rows(rows: list[Row], findings: list) -> list[Row]:
    """At most MAX_HISTOGRAMS, in file order: tensors with findings, then those ``drawn`` chose."""
    flagged = {f.name for f in findings}
    drawable = [r for r in rows if r.stats.histogram and r.stats.histogram.counts]
    chosen = [r for r in drawable if r.name in flagged]
    chosen += [r for r in drawable if r.name not in flagged][:max(0, MAX_HISTOGRAMS - len(chosen))]
    chosen = chosen[:MAX_HISTOGRAMS]
    return sorted(chosen, key=rows.index)


def _histograms(rows: list[Row]) -> str:
    columns = 4
    lines = math.ceil(len(rows) / columns)
    figure = _figure(11, 1.3 * lines, left=0.01, right=0.99, top=1 - 0.3 / lines / 1.3, bottom=0.02, hspace=0.6,
                     wspace=0.05)
    axes = figure.subplots(lines, columns, squeeze=False).flatten()
    for ax, row in zip(axes, rows):
        histogram = row.stats.histogram
        ax.stairs(histogram.counts, histogram.edges, fill=True, color=_COLORS.get(row.kind, "#555555"))
        ax.set_title(f"{_shorten(row.name, 44)}\n[{short_number(histogram.edges[0])},"
                     f" {short_number(histogram.edges[-1])}]", fontsize=7)
        ax.set_xticks([])  # the range is in the title: ticks cost a layout each
        ax.set_yticks([])
    for ax in axes[len(rows):]:
        ax.set_visible(False)
    return _svg(figure)


def _shorten(name: str, width: int) -> str:
    return name if len(name) <= width else name[:width // 2 - 1] + "…" + name[-(width // 2 - 1):]


def _tensor_table(rows: list[Row], changes: dict | None) -> str:
    head = ["name", "kind", "shape", "dtype", "mean", "std", "max |x|", "zeros"] + (["change"] if changes else [])
    lines = ["<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    for r in rows:
        s = r.stats
        cells = [_e(r.name), r.kind, shape_text(r.shape), r.shown_dtype]
        numbers = [s.mean, s.std, s.abs_max] if s else [None] * 3
        cells += [f"<td class=n>{_e(short_number(v))}</td>" for v in numbers]
        cells.append(f"<td class=n>{100 * s.zeros / r.numel:.1f}%</td>" if s and r.numel else "<td></td>")
        if changes:
            cells.append(f"<td class=n>{_change_text(changes.get(r.name))}</td>")
        lines.append("<tr>" + "".join(c if c.startswith("<td") else f"<td>{c}</td>" for c in cells) + "</tr>")
    return "\n".join(lines) + "</table>"
