"""Scales that apply to tiles of a 2-D weight: one scale for the whole tensor, one per row, per
group of columns or per 2-D block is each a tile shape [bm, bn] (edge tiles partial); values are
computed a band of whole tile rows at a time, so memory stays a few MiB beyond the output."""

from __future__ import annotations

import math
from typing import Iterator

ELEMENTS = 1 << 22  # float32 elements worked at a time


def grid(shape: tuple[int, ...], tile: tuple[int, int]) -> tuple[int, int]:
    """The scale grid of a weight of ``shape`` in tiles of ``tile``."""
    return math.ceil(shape[0] / tile[0]), math.ceil(shape[1] / tile[1])


def bands(shape: tuple[int, ...], tile_rows: int = 1) -> Iterator[tuple[int, int]]:
    """(start, stop) row ranges covering ``shape``, each whole tiles of ``tile_rows`` rows and
    about ELEMENTS values."""
    rows, columns = shape
    step = max(tile_rows, ELEMENTS // max(columns, 1) // tile_rows * tile_rows)
    for start in range(0, rows, step):
        yield start, min(start + step, rows)


def spread(scale, tile: tuple[int, int], start: int, stop: int, columns: int):
    """The scale of each value in rows ``start:stop`` (a multiple of the tile's rows) of a weight
    with ``columns`` columns: ``scale`` [rows / bm, columns / bn] repeated over its tiles."""
    bm, bn = tile
    tiles = scale[start // bm:(stop + bm - 1) // bm]
    return tiles.repeat_interleave(bm, 0)[:stop - start].repeat_interleave(bn, 1)[:, :columns]
