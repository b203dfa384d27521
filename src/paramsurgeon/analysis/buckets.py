"""The spread of a tensor's values, gathered in the statistics' one pass: ``Sorted`` keeps the
finite values of a short tensor (exact answers), ``Buckets`` counts a long one's.

``Buckets``: values counted by their top 16 bits as float32 (sign, exponent and 7 bits of
mantissa: the value truncated to bfloat16), in one streaming pass and a fixed 512 KiB.

Each of the 65,536 buckets is a range of values 1/128 of its magnitude wide; from the
counts come quantiles of |x| (to within one bucket), a histogram over any range (a bucket
across an edge shared out by width) and the Kolmogorov-Smirnov distance
to a reference distribution (measured at the bucket boundaries: never more than the
exact distance). Integer, float16 and float64 values are counted as float32.
"""

from __future__ import annotations

import torch

_INF = 0x7F80  # the magnitude code of infinity; codes above it are NaN
_CODES = torch.arange(_INF + 2, dtype=torch.int32).bitwise_left_shift(16).view(torch.float32).double()
_LOW, _HIGH_EDGE = _CODES[:_INF + 1], _CODES[1:_INF + 2].clone()
_HIGH_EDGE[_INF] = float("inf")
# every bucket in increasing order of value (negative magnitudes reversed, then positive ones): its
# ends, and the value a bfloat16 in it has (its end nearest zero)
_UPPERS = torch.cat([-_LOW.flip(0), _HIGH_EDGE])
_LOWERS = torch.cat([_UPPERS.new_full((1,), -float("inf")), _UPPERS[:-1]])
_POINTS = torch.where(_UPPERS <= 0, _UPPERS, _LOWERS)


_NOTHING = torch.zeros(65536, dtype=torch.int64)  # the counts before any value (shared, never written)


class Buckets:
    """Counts of values by their bfloat16 truncation; ``add`` each chunk, then ask."""

    def __init__(self) -> None:
        self.counts = _NOTHING

    def add(self, chunk: torch.Tensor, scratch: torch.Tensor | None = None) -> int:
        """Count a flat, contiguous chunk of floating-point (or double-converted) values; the keys
        go into ``scratch`` (at least 4 bytes a value) when given, saving a fresh allocation.
        Returns how many of them may be zero (0 means none is)."""
        bits = (chunk if chunk.dtype == torch.float32 else chunk.float()).contiguous().view(torch.int32)
        out = scratch.view(torch.int32)[:bits.numel()] if scratch is not None else None
        keys = torch.bitwise_right_shift(bits, 16, out=out).add_(32768)
        counts = torch.bincount(keys, minlength=65536)
        self.counts = counts if self.counts is _NOTHING else self.counts.add_(counts)
        return int(counts[0] + counts[32768])  # -0.0 and 0.0, with values below 2**-133 in magnitude

    @property
    def count(self) -> int:
        """How many values were counted (NaN left out)."""
        return int(self.magnitudes().sum())

    def magnitudes(self) -> torch.Tensor:
        """Counts by magnitude code 0 .. infinity (NaN left out): negative at 0..32767, positive above."""
        return (self.counts[:32768] + self.counts[32768:])[:_INF + 1]

    def abs_quantile(self, q: float) -> float | None:
        """The q-quantile of |x| (NaN left out), as the midpoint of the bucket that holds it:
        within 1/256 of the order statistic's magnitude."""
        counts = self.magnitudes()
        total = int(counts.sum())
        if total == 0:
            return None
        order = torch.tensor(int(q * (total - 1)))  # the lower of the two order statistics torch.quantile mixes
        index = int(torch.searchsorted(torch.cumsum(counts, 0), order, right=True))
        if index == 0:
            return 0.0
        return float((_LOW[index] + _HIGH_EDGE[index]) / 2)

    def ordered(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(upper end, count) of every bucket in increasing order of value, NaN left out."""
        negative, positive = self.counts[:_INF + 1].flip(0), self.counts[32768:32768 + _INF + 1]
        return _UPPERS, torch.cat([negative, positive])

    def ks_distance(self, cdf) -> float:
        """sup |F_n(t) - cdf(t)| over the bucket boundaries t (a lower bound of the exact distance)."""
        uppers, counts = self.ordered()
        total = int(counts.sum())
        if total == 0:
            return 0.0
        empirical = torch.cumsum(counts, 0).double() / total
        return float((empirical - cdf(uppers)).abs().max())

    def histogram(self, edges: torch.Tensor, low: float, high: float, points: bool) -> list[int]:
        """Counts between ``edges`` (float64, increasing; a value on an edge counts in the bin
        above it, as in numpy) of values lying in [low, high] (their finite range; infinities at
        its ends). ``points``: every value is its bucket's end nearest zero (the values were
        bfloat16 or narrower), and the counts are exact. Otherwise a bucket that straddles an
        edge is shared out in proportion to its width on either side, rounded along the running
        total so that every value is counted once: only values within 1/128 of their magnitude
        of an edge may be counted in the neighbouring bin."""
        _, counts = self.ordered()
        present = counts.nonzero().squeeze(1)
        counts = counts[present]
        if points:
            running = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
            inside = running[torch.searchsorted(_POINTS[present], edges[1:-1])]
            return torch.cat([running[:1], inside, running[-1:]]).diff().tolist()
        if not counts.numel():
            return [0] * (edges.numel() - 1)
        first, last = float(edges[0]), float(edges[-1])

        def within(ends: torch.Tensor) -> torch.Tensor:  # finite ends into the values' range, infinite ones out
            return torch.where(ends.isinf(), ends.clamp(first, last), ends.clamp(low, high))

        lowers, uppers = within(_LOWERS[present]), within(_UPPERS[present])
        before = torch.cumsum(counts, 0) - counts  # values in the buckets below each one
        inner = edges[1:-1]
        index = torch.searchsorted(uppers, inner).clamp(max=counts.numel() - 1)
        width = uppers[index] - lowers[index]
        share = torch.where(width > 0, (inner - lowers[index]) / width, (inner > uppers[index]).double())
        below = before[index] + counts[index] * share.clamp(0, 1)
        ends = torch.tensor([0.0, float(counts.sum())], dtype=torch.float64)
        running = torch.cat([ends[:1], (below + 0.5).floor(), ends[1:]]).long()
        return running.diff().tolist()


# Element types whose every value is a bfloat16: counted into buckets without rounding.
EXACT_IN_BFLOAT16 = {"bfloat16", "int8", "uint8", "bool", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
                     "float8_e5m2fnuz", "float8_e8m0fnu"}


SHORT = 1 << 16  # tensors of at most this many values keep them, sorted, instead of counting buckets


class Sorted:
    """The finite values of a short tensor, sorted: exact quantiles and KS distances (``add`` once)."""

    def __init__(self) -> None:
        self.values = torch.empty(0, dtype=torch.float64)

    def add(self, chunk: torch.Tensor, scratch: torch.Tensor | None = None) -> int:
        """Keep a chunk's finite values (``scratch`` is not needed); returns how many are zero, as
        Buckets.add says how many may be."""
        values = chunk.double()
        self.values = torch.cat([self.values, values[torch.isfinite(values)]]).sort().values
        return int((values == 0).sum())

    @property
    def count(self) -> int:
        return self.values.numel()

    def abs_quantile(self, q: float) -> float | None:
        """The q-quantile of |x|: the order statistic q*(n-1) rounds down to (torch.quantile's 'lower')."""
        if not self.count:
            return None
        return float(self.values.abs().sort().values[int(q * (self.count - 1))])

    def ks_distance(self, cdf) -> float:
        """The exact Kolmogorov-Smirnov distance sup |F_n - cdf|."""
        n = self.count
        if n == 0:
            return 0.0
        expected = cdf(self.values)
        steps = torch.arange(1, n + 1, dtype=torch.float64) / n
        return float(torch.maximum(steps - expected, expected - (steps - 1 / n)).max())
