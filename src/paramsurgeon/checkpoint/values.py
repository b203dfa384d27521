"""The bridge to torch: lazy tensors become torch tensors over the memory-mapped file,
and new torch values become in-memory storages. The core's one module that imports torch.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch

from .. import dtypes
from .tensor import Storage, Tensor, memory_of

CHUNK = 1 << 22  # elements per piece when a tensor is reduced in bounded memory


@contextmanager
def one_thread() -> Iterator[None]:
    """Compute on one thread: torch splits a sum between its threads, so a sum's last bits depend
    on how many there are; on one, statistics are the same whichever process, or how many
    workers, computed them (parallel/: the workers are the parallelism)."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def to_torch(tensor: Tensor) -> torch.Tensor:
    """A torch view of ``tensor``'s values, without copying them out of the file when possible."""
    dtype = dtypes.torch_dtype(tensor.dtype)
    if tensor.numel == 0:
        return torch.empty(tensor.shape, dtype=dtype)
    storage = tensor.storage
    values = storage.values if storage.values is not None or storage.loader is None else storage.loader()
    if isinstance(values, bytearray):
        base = torch.frombuffer(values, dtype=torch.uint8).view(dtype)
    elif values is not None:
        base = values.contiguous().reshape(-1).view(torch.uint8).view(dtype)
    else:
        raw = storage.view()
        base = torch.frombuffer(raw, dtype=torch.uint8)
        aligned = base.data_ptr() % tensor.dtype.itemsize == 0
        base = (base if aligned else base.clone()).view(dtype)
    return base.as_strided(tensor.shape, tensor.stride, tensor.offset)


def from_torch(values: torch.Tensor, location: str = "cpu", owned: bool = False) -> Tensor:
    """A lazy Tensor holding ``values``, copied into a fresh contiguous storage unless ``owned``
    says they are already the caller's own new values (then only made contiguous)."""
    values = values.detach().to("cpu").contiguous()
    if not owned:
        values = values.clone()
    storage = Storage(values.numel() * values.element_size(), values=values, location=location)
    return Tensor(storage, dtypes.from_torch(values.dtype), tuple(values.shape))


def computable(values: torch.Tensor) -> torch.Tensor:
    """``values`` in a dtype torch computes with on the CPU: float8, which has no CPU arithmetic,
    comparison nor isfinite, as float32 (exactly); any other dtype as it is."""
    return values.float() if values.is_floating_point() and values.element_size() == 1 else values


def overflowing(values: torch.Tensor, into: dtypes.DType, *origins: torch.Tensor) -> int:
    """How many of ``values`` would, rounded to ``into``, be Inf or NaN or leave its range (be
    clamped: float8_e4m3fn has no Inf), where every one of ``origins`` (same shape) is finite.
    ``values`` are those before their last rounding (wider than ``into``, or already ``into``);
    counted a piece at a time (a whole-tensor mask would be as large as the values)."""
    if not (values.is_floating_point() or values.is_complex()):
        return 0
    wider = not values.is_complex() and dtypes.from_torch(values.dtype).largest > into.largest
    halfway, away = into.halfway if wider else (math.inf, True)
    count = 0
    for piece, *before in chunks(values, *origins):
        piece = computable(piece)
        if _within(piece, halfway, away):
            continue
        bad = ~torch.isfinite(piece)
        if wider:  # compared in float32 at least, where every halfway of a narrower dtype is exact
            magnitude = piece.abs().float() if piece.element_size() < 4 else piece.abs()
            bad |= magnitude >= halfway if away else magnitude > halfway
        for earlier in before:
            bad &= torch.isfinite(computable(earlier))
        count += int(bad.sum())
    return count


def _within(values: torch.Tensor, halfway: float, away: bool) -> bool:
    """Whether every value is finite and rounds below ``halfway`` (see overflowing): told by the
    extremes, which NaN propagates to (a pass 20 times quicker than isfinite's mask, for bfloat16)."""
    if values.is_complex():
        return bool(torch.isfinite(values).all())
    low, high = (float(v) for v in torch.aminmax(values))
    return -halfway < low and high < halfway if away else -halfway <= low and high <= halfway


def contiguous_memory(tensor: Tensor) -> memoryview:
    """The values of ``tensor`` in row-major order (a copy only when it is not contiguous)."""
    return memory_of(to_torch(tensor).contiguous())


def pieces(*values: torch.Tensor) -> Iterator[tuple[torch.Tensor, ...]]:
    """``chunks`` of a quarter of CHUNK, for arithmetic that makes several float32 or float64
    temporaries of each piece (merge, diff, report --against): they stay a few MiB each."""
    return chunks(*values, size=max(1, CHUNK // 4))


def value_chunks(tensor: Tensor, wider: torch.dtype | None = None) -> Iterator[torch.Tensor]:
    """The flat ``chunks`` of ``tensor``'s values, the same pieces in the same order; a tensor whose
    values are computed (a quantized weight) is computed a few MiB at a time where its storage can
    (``pieces``), so memory holds a chunk of it rather than the whole. Such chunks come as ``wider``
    (when given) for the reduction that would widen them, which costs nothing more while they are copied,
    each in one buffer that the next overwrites."""
    streamed = getattr(tensor.storage, "pieces", None)
    whole = tensor.offset == 0 and tensor.is_contiguous and tensor.nbytes == tensor.storage.nbytes
    stream = streamed() if streamed is not None and whole and tensor.numel else None
    if stream is None:
        yield from (chunk for (chunk,) in chunks(to_torch(tensor)))
        return
    left, buffer, chunk, filled = tensor.numel, None, None, 0
    for piece in stream:
        flat, start = piece.reshape(-1), 0
        while start < flat.numel():
            if chunk is None:
                if buffer is None:
                    buffer = torch.empty(min(CHUNK, left), dtype=wider or flat.dtype)
                chunk, filled = buffer[:min(CHUNK, left)], 0
            taken = min(chunk.numel() - filled, flat.numel() - start)
            chunk[filled:filled + taken] = flat[start:start + taken]
            filled, start, left = filled + taken, start + taken, left - taken
            if filled == chunk.numel():
                yield chunk
                chunk = None


def chunks(*values: torch.Tensor, size: int | None = None) -> Iterator[tuple[torch.Tensor, ...]]:
    """Matching flat pieces of same-shaped tensors, at most ``size`` (default CHUNK) elements each:
    views when contiguous, copies of a few rows otherwise, so memory does not grow with the tensor."""
    size = size or CHUNK
    first = values[0]
    if first.numel() == 0:
        return
    if first.numel() <= size or first.dim() == 0:
        yield tuple(v.reshape(-1) for v in values)
    elif all(v.is_contiguous() for v in values):
        flat = [v.reshape(-1) for v in values]
        for start in range(0, first.numel(), size):
            yield tuple(f[start:start + size] for f in flat)
    elif first[0].numel() > size:
        for rows in zip(*values):
            yield from chunks(*rows, size=size)
    else:
        step = max(1, size // first[0].numel())
        for start in range(0, first.shape[0], step):
            yield tuple(v[start:start + step].reshape(-1) for v in values)
