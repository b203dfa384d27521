"""Tables as text. Piped, a table is plain aligned columns, one line per row, every column
kept (for grep and awk; rich is not even imported). On a terminal, rich draws it to fit
the width: the rightmost columns give way, and before the ``core`` ones would, the first
column folds its long values (nothing is cut). Cells are escaped (control characters shown
as ``\\x1b``) before they are drawn, so a name from a file cannot drive the terminal."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import repeat

from .escape import printable

_MIN_FOLD = 24


@dataclass
class Column:
    header: str
    right: bool = False  # right-justified (numbers)


def render(columns: list[Column], rows: list[list[str]], width: int | None = None, color: bool = False,
           core: int | None = None) -> tuple[str, list[str]]:
    """The table, and the headers of the columns left out to fit ``width``."""
    if width is None:
        lines = _plain(columns, rows)
        if not all(map(str.isprintable, lines)):  # most tables need no escape: told from the lines made anyway
            lines = _plain(columns, _escaped(rows))
        return "\n".join(lines) + "\n", []
    if not "".join(map("".join, rows)).isprintable():  # one pass over every cell
        rows = _escaped(rows)
    return _fitted(columns, rows, width, color, core or len(columns))


def _escaped(rows: list[list[str]]) -> list[list[str]]:
    return [[printable(cell) for cell in row] for row in rows]


def _plain(columns: list[Column], rows: list[list[str]]) -> list[str]:
    """The lines of the table, without their line ends."""
    cells = list(zip(*rows)) or [()] * len(columns)
    widths = [max(len(c.header), max(map(len, column), default=0)) for c, column in zip(columns, cells)]
    header = "  ".join(c.header.rjust(w) if c.right else c.header.ljust(w) for c, w in zip(columns, widths))
    # column by column, each a pass in C (100,000 rows are as many lines)
    padded = [map(str.rjust if c.right else str.ljust, column, repeat(w)) for c, w, column in zip(columns, widths, cells)]
    return [header.rstrip(), "─" * (sum(widths) + 2 * (len(widths) - 1)), *map(str.rstrip, map("  ".join, zip(*padded)))]


def _fitted(columns: list[Column], rows: list[list[str]], width: int, color: bool, core: int) -> tuple[str, list[str]]:
    import io

    from rich.console import Console

    natural = max([len(columns[0].header)] + [len(r[0]) for r in rows])
    keep = list(range(len(columns)))
    while True:
        table = _rich_table(columns, rows, keep, None)
        excess = Console(width=100_000).measure(table).maximum - width
        if excess <= 0:
            break
        if len(keep) <= core and (natural - excess >= _MIN_FOLD or len(keep) <= 2):
            table = _rich_table(columns, rows, keep, max(_MIN_FOLD, natural - excess))
            break
        keep.pop()
    out = io.StringIO()
    Console(file=out, width=width, no_color=not color, force_terminal=color, highlight=False).print(table)
    text = "\n".join(line.rstrip() for line in out.getvalue().splitlines()) + "\n"
    return text, [columns[i].header for i in range(len(columns)) if i not in keep]


def _rich_table(columns: list[Column], rows: list[list[str]], keep: list[int], fold: int | None):
    from rich import box
    from rich.table import Table
    from rich.text import Text

    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1, 0, 0), header_style="bold")
    for i in keep:
        table.add_column(columns[i].header, justify="right" if columns[i].right else "left", overflow="fold",
                         no_wrap=i != 0, max_width=fold if i == 0 else None)
    for row in rows:
        table.add_row(*(Text(row[i]) for i in keep))
    return table
