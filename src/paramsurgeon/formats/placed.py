"""The computed tensors of one file, written by worker processes at their offsets.

A safetensors file's layout is known before any value is computed: each tensor's offset and
size follow from its dtype and shape. The writer writes the header and the spans it copies and
leaves a hole for each tensor to compute (``Sink.skip``); ``fill`` then has the workers
(parallel.spread) compute runs of those tensors, each run written into its holes through a
descriptor of the worker's own on the file. The bytes are those of a write in one process; the
writer's caller syncs the file and renames it into place as ever (atomic.py).
"""

from __future__ import annotations

import os
from typing import Callable

from ..checkpoint import Tensor
from ..parallel import Work, spread
from .files import Sink

UNIT = 32 << 20  # most bytes of tensors in a unit of work (a few per worker): small tensors are not a task each

Hole = tuple[int, Tensor]  # where in the file a tensor's bytes go, and the tensor


def worth(sink: Sink, tensors: list[Tensor], work: Work) -> bool:
    """Whether ``tensors``, to be computed for ``sink``, are worth more than one process: a new
    regular file (others can open it) and a local ``work`` of several processes for their bytes."""
    nbytes = sum(t.nbytes for t in tensors)
    return sink.path is not None and work.scheduler is None and work.processes(len(tensors), nbytes) > 1


def fill(sink: Sink, holes: list[Hole], work: Work, write: Callable[[Tensor, Sink], None],
         progress: Callable[[int], None] | None = None) -> None:
    """Write each hole's tensor at its offset in ``sink``'s file (``write(tensor, sink)`` appends
    its bytes), spread over ``work``'s processes; ``progress`` is told the bytes of each run done."""
    sink.flush()
    os.ftruncate(sink.fd, sink.offset)  # the file's size, a hole at its end included
    nbytes = sum(t.nbytes for _, t in holes)
    units = runs(holes, min(UNIT, nbytes // (4 * work.processes(len(holes), nbytes)) or 1))
    sizes = {i: sum(t.nbytes for _, t in unit) for i, unit in enumerate(units)}

    def compute(index: int) -> None:
        fd = os.open(sink.path, os.O_WRONLY | os.O_CLOEXEC)  # a position of its own
        try:
            os.lseek(fd, units[index][0][0], os.SEEK_SET)
            out = Sink(fd=fd, name=sink.name)
            for _, tensor in units[index]:
                write(tensor, out)
            out.flush()
            out.start_writeback()
        finally:
            os.close(fd)

    for index, _ in spread(compute, sizes, work, "tensors"):
        if progress is not None:
            progress(sizes[index])


def runs(holes: list[Hole], size: int) -> list[list[Hole]]:
    """``holes`` in runs of adjacent ones of about ``size`` bytes (a larger tensor is a run alone)."""
    found: list[list[Hole]] = []
    end = filled = 0
    for offset, tensor in holes:
        if not found or offset != end or filled + tensor.nbytes > size:
            found.append([])
            filled = 0
        found[-1].append((offset, tensor))
        end, filled = offset + tensor.nbytes, filled + tensor.nbytes
    return found
