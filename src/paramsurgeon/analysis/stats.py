"""Per-tensor statistics and digests, computed in bounded memory.

Values are read in chunks (tensors.chunks) straight from the memory-mapped
file; means and variances of the chunks are merged exactly (Chan et al.), so memory
does not grow with the tensor beyond one chunk of scratch space. Results follow torch's own reductions: ``std`` is the
sample standard deviation. A tensor holding NaN or Inf has the statistics of its finite values,
with the counts of NaN and Inf beside them.

The same pass can count values into bfloat16-wide buckets (buckets.py: quantiles of |x|,
distances to an initialisation) and draw a histogram between min and max: exact (the
bins numpy.histogram draws) for a tensor of up to 65,536 values, from the buckets for a
longer one (exact for bfloat16 values; for wider ones a value within 1/128 of its
magnitude of an edge may be counted in the next bin). Nothing is read twice.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field, fields

from ..checkpoint import Tensor
from ..checkpoint.contents import row_major
from ..checkpoint.tensor import blocks

@dataclass
class Histogram:
    """``len(counts)`` bins between ``edges``; the last bin holds its upper edge. NaN is not
    counted; an infinity is counted in the first or last bin."""

    edges: list[float]
    counts: list[int]
    exact: bool


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
    histogram: Histogram | None = field(default=None, repr=False)
    buckets: object | None = field(default=None, repr=False)  # buckets.Buckets or Sorted, when asked for

    def as_dict(self) -> dict:
        """The statistics inspect --json prints (not the histogram nor the buckets)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("histogram", "buckets")}


def tensor_stats(tensor: Tensor, bins=None, buckets=False) -> Stats | None:
    """Statistics of ``tensor``'s values; None for complex tensors. ``bins``: also a histogram
    of that many bins (or a function of the statistics giving that number, or None for none);
    ``buckets``: also the spread of the values (Stats.buckets), True or a
    function of the statistics saying whether it is needed. A tensor of one chunk is still in
    memory when its statistics are known: its spread is counted only if needed; a longer one's
    always is (it cannot be known before the end). Histograms of more than SHORT values come
    from the spread (buckets.Buckets.histogram), shorter ones are exact."""
    if tensor.dtype.complex:
        return None
    from ..checkpoint.values import one_thread

    with one_thread():  # the sums come out the same in every process (see one_thread)
        return _tensor_stats(tensor, bins, buckets)


def _tensor_stats(tensor: Tensor, bins, buckets) -> Stats:
    import torch

    from ..checkpoint.values import CHUNK, value_chunks
    from .buckets import EXACT_IN_BFLOAT16, SHORT, Buckets, Sorted

    short, single = tensor.numel <= SHORT, tensor.numel <= CHUNK
    # a long tensor's spread is counted in the pass; so is a one-chunk tensor's when its histogram is
    # surely wanted and comes from the buckets (which then also count its zeros)
    surely_from_buckets = bins and not callable(bins) and not short
    in_pass = surely_from_buckets or ((buckets or bins) and not single)
    spread = Sorted() if buckets and short else Buckets() if in_pass else None
    whole = None  # the one chunk of a short tensor, for an exact histogram or a spread counted afterwards
    count, mean, m2 = 0, 0.0, 0.0
    low, high = math.inf, -math.inf
    zeros = nan = inf = 0
    scratch = None
    narrow = tensor.dtype.floating and tensor.dtype.itemsize < 4  # reduced in float32
    for chunk in value_chunks(tensor, torch.float32 if narrow else None):
        if chunk.dtype == torch.bool or not chunk.is_floating_point():
            chunk = chunk.double()
        elif chunk.dtype not in (torch.float32, torch.float64):
            chunk = chunk.float()
        n, chunk_mean, var, chunk_low, chunk_high, scratch = _moments(chunk, scratch)
        if not (math.isfinite(chunk_mean) and math.isfinite(var)):  # NaN or Inf: the finite values' statistics
            nan += int(torch.isnan(chunk).sum())
            inf += int(torch.isinf(chunk).sum())
            finite = chunk[torch.isfinite(chunk)]
            n, chunk_mean, var, chunk_low, chunk_high, scratch = _moments(finite, scratch)
            if not math.isfinite(var):  # finite values whose squares overflow float32 (|x| > 1.8e19)
                n, chunk_mean, var, chunk_low, chunk_high, scratch = _moments(finite.double(), scratch)
        if chunk.numel() if spread is None else spread.add(chunk, scratch):  # some may be zero
            zeros += chunk.numel() - int(torch.count_nonzero(chunk))
        if n:
            delta = chunk_mean - mean
            total = count + n
            mean += delta * n / total
            m2 += var * n + delta * delta * count * n / total
            count = total
            low, high = min(low, chunk_low), max(high, chunk_high)
        if single:
            whole = chunk
    if count == 0:  # no value, or none finite
        stats = Stats(None, None, None, None, None, zeros, nan, inf)
    else:
        std = math.sqrt(m2 / (count - 1)) if count > 1 else None
        abs_max = max(abs(low), abs(high))
        if not tensor.dtype.floating:  # integer and bool tensors have integer extremes
            low, high, abs_max = int(low), int(high), int(abs_max)
        stats = Stats(mean, std, low, high, abs_max, zeros, nan, inf)
    if not tensor.numel:
        stats.histogram = Histogram([], [], True) if bins else None
        stats.buckets = spread if buckets else None
        return stats
    wanted = bins(stats) if callable(bins) else bins
    if spread is None and ((wanted and not short) or (buckets and (buckets is True or buckets(stats)))):
        spread = Buckets()
        spread.add(whole, scratch)
    if wanted:
        points = tensor.dtype.name in EXACT_IN_BFLOAT16
        stats.histogram = _histogram(whole if short else None, spread, wanted, low, high, bool(nan or inf), points)
    if buckets:
        stats.buckets = spread
    return stats


def _histogram(whole, spread, bins: int, low: float, high: float, nonfinite: bool, points: bool) -> Histogram:
    """``bins`` bins over [low, high], the range of the finite values (numpy's rule when low == high):
    from ``whole`` when given, else from ``spread`` (exact when ``points``, see Buckets.histogram)."""
    import torch

    if low > high:  # no finite value
        low = high = 0.0
    if whole is None:
        start, stop = (low - 0.5, high + 0.5) if low == high else (low, high)
        edges = torch.linspace(start, stop, bins + 1, dtype=torch.float64)
        return Histogram(edges.tolist(), spread.histogram(edges, low, high, points), points)
    if low == high:
        low, high = low - 0.5, high + 0.5
    finite = whole[torch.isfinite(whole)] if nonfinite else whole
    counts, edges = torch.histogram(finite, bins=bins, range=(low, high))
    counts = counts.long()
    if nonfinite:  # infinities at the ends, as Histogram says
        counts[0] += int(torch.isneginf(whole).sum())
        counts[-1] += int(torch.isposinf(whole).sum())
    return Histogram(edges.double().tolist(), counts.tolist(), True)


def _moments(chunk, scratch):
    """(count, mean, biased variance, min, max) of ``chunk``'s values, and the scratch space used.

    The centred sum of squares is taken in the chunk's own precision with torch's cascade
    summation: three vectorised passes, where var_mean's Welford updates run three times slower."""
    import torch

    n = chunk.numel()
    if not n:
        return 0, 0.0, 0.0, math.inf, -math.inf, scratch
    chunk_mean = float(chunk.sum()) / n
    if scratch is None or scratch.dtype != chunk.dtype or scratch.numel() < n:
        scratch = torch.empty(n, dtype=chunk.dtype)
    centred = torch.sub(chunk, chunk_mean, out=scratch[:n])
    var = float(centred.mul_(centred).sum()) / n
    low, high = torch.aminmax(chunk)
    return n, chunk_mean, var, float(low), float(high), scratch


def sha256(tensor: Tensor) -> str:
    """sha256 of the tensor's values in row-major order (the bytes safetensors would store)."""
    digest = hashlib.sha256()
    for block in blocks(row_major(tensor)):
        digest.update(block)
    return digest.hexdigest()
