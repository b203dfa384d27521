"""A tensor's values as bytes in row-major order: a view of the file when the tensor is
contiguous, else laid out through torch (imported only then)."""

from __future__ import annotations

from .tensor import Tensor, blocks


def row_major(tensor: Tensor) -> memoryview:
    """The values of ``tensor`` in row-major order (a copy only when it is not contiguous)."""
    view = tensor.contiguous_bytes()
    if view is None:
        from .values import contiguous_memory

        view = contiguous_memory(tensor)
    return view


def same_values(a: Tensor, b: Tensor) -> bool:
    """Whether two tensors of one shape and dtype hold the same bytes (NaNs included)."""
    return all(bytes(x) == bytes(y) for x, y in zip(blocks(row_major(a)), blocks(row_major(b))))
