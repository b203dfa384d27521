"""Tables as text, laid out with our own arithmetic in passes over the cells (rich took 40 s
for 100,000 rows: a measure per column dropped, then the drawing). Piped, a table is aligned columns,
one line per row, every column kept (for grep and awk). On a terminal it fits the width in
cells (wide characters count two): the rightmost columns give way (those of a lower ``priority``
first) until only the ``core`` ones are left, then the first column folds its long values onto continuation lines, every
character kept, to no less than _MIN_FOLD; when that is not enough more columns give way,
and with two or fewer left the first folds as far as it must. Columns are two spaces apart,
numbers right-justified, the header underlined with '─' and bold in colour, nothing else
styled. Cells are escaped (control characters shown as ``\\x1b``) before they are laid out,
so a name from a file cannot drive the terminal."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import repeat
from unicodedata import category, east_asian_width

from .escape import printable

_MIN_FOLD = 24
_BOLD, _RESET = "\x1b[1m", "\x1b[0m"


@dataclass
class Column:
    header: str
    right: bool = False  # right-justified (numbers)
    priority: int = 0  # columns of a higher priority give way after those of a lower one, wherever they stand


def render(columns: list[Column], rows: list[list[str]], width: int | None = None, color: bool = False,
           core: int | None = None) -> tuple[str, list[str]]:
    """The table of ``rows`` (a list of cells each), and the headers of the columns left out to fit ``width``."""
    return render_columns(columns, [list(column) for column in zip(*rows)] or [[] for _ in columns], width, color,
                          core)


def render_columns(columns: list[Column], cells: list[list[str]], width: int | None = None, color: bool = False,
                   core: int | None = None) -> tuple[str, list[str]]:
    """``render`` of the table whose cells come column by column (``cells[i]``: column i's, top down)."""
    if width is None:
        lines = _plain(columns, cells)
        if not all(map(str.isprintable, lines)):  # most tables need no escape: told from the lines made anyway
            lines = _plain(columns, _escaped(cells))
        return "\n".join(lines) + "\n", []
    text = "".join(map("".join, cells))  # one pass over every cell
    if not text.isprintable():
        cells = _escaped(cells)
    measure = len if text.isascii() else _cells
    columns, cells, core, hidden = _by_priority(columns, cells, width, core or len(columns), measure)
    lines, heading, kept = _fitted(columns, cells, width, core, measure)
    if color:
        lines[:heading] = [_BOLD + line + _RESET for line in lines[:heading]]
    return "\n".join(lines) + "\n", hidden + [c.header for c in columns[kept:]]


def _by_priority(columns: list[Column], cells: list[list[str]], width: int, core: int, measure):
    """The columns that may stay at ``width`` when they give way in the order of their priority
    (``core`` counted in that order), left in their places; the others' headers."""
    order = sorted(range(len(columns)), key=lambda i: -columns[i].priority)  # stable: the rightmost go first
    if order == sorted(order):
        return columns, cells, core, []
    kept, _ = _fit([max(map(measure, [columns[i].header, *cells[i]])) for i in order], width, core)
    staying = sorted(order[:kept])
    return ([columns[i] for i in staying], [cells[i] for i in staying], len(staying),
            [columns[i].header for i in order[kept:]])


def _escaped(cells: list[list[str]]) -> list[list[str]]:
    return [list(map(printable, column)) for column in cells]


def _plain(columns: list[Column], cells: list[list[str]]) -> list[str]:
    """The lines of the table, without their line ends."""
    grid = _grid(columns, cells)
    widths = [max(map(len, column)) for column in grid]
    header, *lines = _lines(columns, grid, widths, len)
    return [header, _rule(widths), *lines]


def _fitted(columns: list[Column], cells: list[list[str]], width: int, core: int, measure) -> tuple[list[str], int, int]:
    """The lines of the table fitted to ``width`` terminal cells (``measure`` counts a text's),
    how many of them are the header, and how many columns are kept."""
    grid = _grid(columns, cells)
    widths = [max(map(measure, column)) for column in grid]
    kept, fold = _fit(widths, width, core)
    if fold == widths[0]:
        header, *lines = _lines(columns, grid[:kept], widths[:kept], measure)
        return [header, _rule(widths[:kept]), *lines], 1, kept
    widths = [fold, *widths[1:kept]]
    header, *names = [_fold(name, fold) for name in grid[0]]  # a Python pass per row, only when names fold
    firsts = _lines(columns, [[header[-1], *(name[0] for name in names)], *grid[1:kept]], widths, measure)
    # the other headers stand on the last line of a folded one, just above the rule
    lines = [*_lines(columns, [header[:-1]], widths, measure), firsts[0], _rule(widths)]
    for first, name in zip(firsts[1:], names):
        lines.append(first)
        if len(name) > 1:
            lines += _lines(columns, [name[1:]], widths, measure)
    return lines, len(header), kept


def _grid(columns: list[Column], cells: list[list[str]]) -> list[list[str]]:
    """Each column's cells headed by its header."""
    return [[c.header, *column] for c, column in zip(columns, cells)]


def _lines(columns: list[Column], grid: list[list[str]], widths: list[int], measure) -> list[str]:
    """One line per row of ``grid``, each column justified to its width, two spaces apart."""
    # column by column, each a pass in C when measure is len (100,000 rows are as many lines)
    justified = [_justified(column, w, c.right, measure) for c, w, column in zip(columns, widths, grid)]
    return list(map(str.rstrip, map("  ".join, zip(*justified))))


def _rule(widths: list[int]) -> str:
    return "─" * (sum(widths) + 2 * (len(widths) - 1))


def _fit(widths: list[int], width: int, core: int) -> tuple[int, int]:
    """How many columns (of these natural ``widths``) to keep, and how wide the first may be."""
    kept = len(widths)
    while True:
        excess = sum(widths[:kept]) + 2 * (kept - 1) - width
        if excess <= 0:
            return kept, widths[0]
        if kept <= core and (widths[0] - excess >= _MIN_FOLD or kept <= 2):
            return kept, max(1, widths[0] - excess)  # at least one cell: a line may then overflow
        kept -= 1


def _fold(text: str, width: int) -> list[str]:
    """``text`` in pieces of at most ``width`` terminal cells (one character wider than that
    alone), every character kept."""
    if text.isascii():
        return [text[i:i + width] for i in range(0, len(text), width)] or [""]
    pieces, piece, used = [], "", 0
    for char in text:
        size = _cells(char)
        if piece and used + size > width:
            pieces.append(piece)
            piece, used = "", 0
        piece, used = piece + char, used + size
    return [*pieces, piece]


def _justified(column: list[str], width: int, right: bool, measure):
    justify = str.rjust if right else str.ljust
    if measure is len:
        return map(justify, column, repeat(width))  # a pass in C
    return [justify(cell, width + len(cell) - measure(cell)) for cell in column]


def _cells(text: str) -> int:
    """How many terminal cells ``text`` takes: East Asian wide characters two, combining marks
    and format characters none."""
    return sum(2 if east_asian_width(c) in ("W", "F") else 0 if category(c) in ("Mn", "Me", "Cf") and c != "\xad" else 1
               for c in text)
