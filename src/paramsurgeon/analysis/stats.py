"""Per-tensor statistics and digests, computed in bounded memory.

Values are read in chunks (tensors.chunks) straight from the memory-mapped
file; means and variances of the chunks are merged exactly (Chan et al.), so memory
does not grow with the tensor beyond one chunk of scratch space. Results follow torch's own reductions: ``std`` is the
sample standard deviation, and a NaN anywhere makes mean, std, min and max NaN.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass

from ..checkpoint import Tensor
from ..checkpoint.tensor import blocks

@dataclass
class Stats:
    """mean, std (None for fewer than two values), min, max, abs_max; counts of zeros, NaN, Inf."""

    mean: float | None
    std: float | None
    min: float | None
    max: float | None
    abs_max: float | None
    zeros: int
    nan: int
    inf: int

    def as_dict(self) -> dict:
        return asdict(self)


def tensor_stats(tensor: Tensor) -> Stats | None:
    """Statistics of ``tensor``'s values; None for complex tensors."""
    if tensor.dtype.complex:
        return None
    import torch

    from ..checkpoint.values import chunks, to_torch

    values = to_torch(tensor)
    count, mean, m2 = 0, 0.0, 0.0
    low, high = math.inf, -math.inf
    zeros = nan = inf = 0
    scratch = None
    for (chunk,) in chunks(values):
        if chunk.dtype == torch.bool or not chunk.is_floating_point():
            chunk = chunk.double()
        elif chunk.dtype not in (torch.float32, torch.float64):
            chunk = chunk.float()
        n = chunk.numel()
        # Centred sum of squares in the chunk's own precision with torch's cascade summation:
        # three vectorised passes, where var_mean's Welford updates run three times slower.
        chunk_mean = float(chunk.sum()) / n
        if scratch is None or scratch.dtype != chunk.dtype or scratch.numel() < n:
            scratch = torch.empty(n, dtype=chunk.dtype)
        centred = torch.sub(chunk, chunk_mean, out=scratch[:n])
        var = float(centred.mul_(centred).sum()) / n
        chunk_low, chunk_high = torch.aminmax(chunk)
        delta = chunk_mean - mean
        total = count + n
        mean += delta * n / total
        m2 += var * n + delta * delta * count * n / total
        count = total
        low, high = _nan_min(low, float(chunk_low)), _nan_max(high, float(chunk_high))
        zeros += n - int(torch.count_nonzero(chunk))
        if not (math.isfinite(chunk_mean) and math.isfinite(var) and math.isfinite(float(chunk_low))
                and math.isfinite(float(chunk_high))):
            nan += int(torch.isnan(chunk).sum())
            inf += int(torch.isinf(chunk).sum())
    if count == 0:
        return Stats(None, None, None, None, None, 0, 0, 0)
    if nan:
        mean = low = high = math.nan
    std = math.sqrt(m2 / (count - 1)) if count > 1 and not nan else (math.nan if nan and count > 1 else None)
    abs_max = math.nan if nan else max(abs(low), abs(high))
    if not tensor.dtype.floating:  # integer and bool tensors have integer extremes
        low, high, abs_max = int(low), int(high), int(abs_max)
    return Stats(mean, std, low, high, abs_max, zeros, nan, inf)


def _nan_min(a: float, b: float) -> float:
    return math.nan if math.isnan(a) or math.isnan(b) else min(a, b)


def _nan_max(a: float, b: float) -> float:
    return math.nan if math.isnan(a) or math.isnan(b) else max(a, b)


def sha256(tensor: Tensor) -> str:
    """sha256 of the tensor's values in row-major order (the bytes safetensors would store)."""
    digest = hashlib.sha256()
    view = tensor.contiguous_bytes()
    if view is None:
        from ..checkpoint.values import contiguous_memory

        view = contiguous_memory(tensor)
    for block in blocks(view):
        digest.update(block)
    return digest.hexdigest()
