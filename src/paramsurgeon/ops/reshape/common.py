"""What resize, split, concat and transpose share: dims counted as torch counts them, lists of
indices, and the torch values of a lazy tensor."""

from __future__ import annotations

from ...checkpoint import Tensor
from ...errors import UsageError

MAX_INDICES = 1 << 26


def numbers(text: str, flag: str) -> list[int]:
    """'3,7,0:5' -> [3, 7, 0, 1, 2, 3, 4] (A:B is A up to B, B left out, as in Python)."""
    found = []
    for piece in str(text).split(","):
        piece = piece.strip()
        ends = piece.split(":")
        if len(ends) > 2 or not all(e.isdigit() for e in ends):
            raise UsageError(f"{flag} {text}: '{piece}' is not an index or a range A:B of whole numbers >= 0")
        if len(ends) == 2 and int(ends[0]) > int(ends[1]):
            raise UsageError(f"{flag} {text}: the range {piece} is empty (its start is past its end)")
        found += list(range(int(ends[0]), int(ends[1]))) if len(ends) == 2 else [int(piece)]
        if len(found) > MAX_INDICES:
            raise UsageError(f"{flag} {text:.60}: more than {MAX_INDICES:,} indices")
    return found


def pair(text: str, flag: str) -> tuple[int, int]:
    """'0,1' -> (0, 1)."""
    parts = str(text).split(",")
    try:
        a, b = (int(p) for p in parts)
    except ValueError:
        raise UsageError(f"{flag} {text}: expected two dimensions A,B, e.g. 0,1") from None
    return a, b


def dim_of(tensor: Tensor, dim: int) -> int | None:
    """``dim`` counted from the front (a negative one from the back), or None when out of range."""
    ndim = len(tensor.shape)
    return dim + ndim if -ndim <= dim < 0 else (dim if 0 <= dim < ndim else None)


def no_dim(tensor: Tensor, dim: int, flag: str = "--dim") -> str:
    ndim = len(tensor.shape)
    return f"has {ndim} dimension{'s' if ndim != 1 else ''} {list(tensor.shape)}, so {flag} {dim} does not exist"


def torch_of(tensor: Tensor):
    from ...checkpoint.values import to_torch

    return to_torch(tensor)


def own(values):
    """``values`` as a contiguous tensor of its own (never a view of an input file)."""
    import torch

    return values.clone(memory_format=torch.contiguous_format)
