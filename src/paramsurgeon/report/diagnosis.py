"""Histograms and health findings as text and JSON (inspect --hist, check --health)."""

from __future__ import annotations

import math

from ..sizes import plural
from .escape import printable

LEVELS = "▁▂▃▄▅▆▇█"
SPARK_WIDTH = 16  # characters of a sparkline: the histogram's bins, merged when there are more


def sparkline(counts: list[int], width: int = SPARK_WIDTH) -> str:
    """One character per group of bins: a space for none, then 8 levels up to the fullest."""
    if not counts:
        return ""
    chars = min(width, len(counts))
    groups = [sum(counts[i * len(counts) // chars:(i + 1) * len(counts) // chars]) for i in range(chars)]
    top = max(groups) or 1
    return "".join(" " if g == 0 else LEVELS[max(0, math.ceil(8 * g / top) - 1)] for g in groups)


def histogram_document(histogram) -> dict:
    """``{"edges", "counts", "exact"}`` of a stats.Histogram."""
    return {"edges": histogram.edges, "counts": histogram.counts, "exact": histogram.exact}


def with_findings(document: dict, findings: list | None) -> dict:
    """The check document, with ``findings`` when --health was asked for."""
    if findings is not None:
        document["findings"] = [f.as_dict() for f in findings]
    return document


def warning_text(findings: list | None) -> str:
    """The health warnings (rules that do not fail the check), after the check report."""
    warnings = [f for f in findings or [] if not f.fails]
    if not warnings:
        return ""
    lines = [f"  warn {plural(len(warnings), 'health warning')}:"]
    lines += [f"       {f.rule}: {f.name} {f.message}" for f in warnings]
    return "\n".join(printable(line) for line in lines) + "\n"
