"""The spread of a tensor's values, gathered in the statistics' one pass: ``Sorted`` keeps the
finite values of a short tensor (exact answers), ``Buckets`` counts a long one's.

``Buckets``: values counted by their top 16 bits as float32 (sign, exponent and 7 bits of
mantissa: the value truncated to bfloat16), in one streaming pass and a fixed 512 KiB.

Each of the 65,536 buckets is a range of values 1/128 of its magnitude wide; from the
counts come quantiles of |x| (to within one bucket), a histogram over any range (each
bucket's values fall in the bin of its midpoint) and the Kolmogorov-Smirnov distance
to a reference distribution (measured at the bucket boundaries: never more than the
exact distance). Integer, float16 and float64 values are counted as float32.
"""

from __future__ import annotations

import sys

import torch

_HIGH = slice(1, None, 2) if sys.byteorder == "little" else slice(0, None, 2)
_INF = 0x7F80  # the magnitude code of infinity; codes above it are NaN
_CODES = torch.arange(_INF + 2, dtype=torch.int32).bitwise_left_shift(16).view(torch.float32).double()
_LOW, _HIGH_EDGE = _CODES[:_INF + 1], _CODES[1:_INF + 2].clone()
_HIGH_EDGE[_INF] = float("inf")


class Buckets:
    """Counts of values by their bfloat16 truncation; ``add`` each chunk, then ask."""

    def __init__(self) -> None:
        self.counts = torch.zeros(65536, dtype=torch.int64)

    def add(self, chunk: torch.Tensor) -> None:
        """Count a flat, contiguous chunk of floating-point (or double-converted) values."""
        values = chunk if chunk.dtype == torch.float32 else chunk.float()
        keys = values.contiguous().view(torch.int16)[_HIGH].to(torch.int32).add_(32768)
        self.counts += torch.bincount(keys, minlength=65536)

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
        uppers = torch.cat([-_LOW.flip(0), _HIGH_EDGE])
        return uppers, torch.cat([negative, positive])

    def ks_distance(self, cdf) -> float:
        """sup |F_n(t) - cdf(t)| over the bucket boundaries t (a lower bound of the exact distance)."""
        uppers, counts = self.ordered()
        total = int(counts.sum())
        if total == 0:
            return 0.0
        empirical = torch.cumsum(counts, 0).double() / total
        return float((empirical - cdf(uppers)).abs().max())

    def histogram(self, bins: int, low: float, high: float) -> list[int]:
        """Counts of ``bins`` equal bins over [low, high], each bucket in the bin of its midpoint
        (clipped to the range): a count is off at most by the buckets straddling its edges."""
        uppers, counts = self.ordered()
        lowers = torch.cat([uppers[:1].new_full((1,), -float("inf")), uppers[:-1]])
        present = counts > 0
        middle = torch.where(torch.isinf(lowers) | torch.isinf(uppers), torch.where(uppers < 0, lowers, uppers),
                             (lowers + uppers) / 2)[present].clamp(low, high)
        width = (high - low) or 1.0
        index = ((middle - low) / width * bins).floor().clamp(0, bins - 1).long()
        return torch.zeros(bins, dtype=torch.int64).scatter_add_(0, index, counts[present]).tolist()


SHORT = 1 << 16  # tensors of at most this many values keep them, sorted, instead of counting buckets


class Sorted:
    """The finite values of a short tensor, sorted: exact quantiles and KS distances (``add`` once)."""

    def __init__(self) -> None:
        self.values = torch.empty(0, dtype=torch.float64)

    def add(self, chunk: torch.Tensor) -> None:
        values = chunk.double()
        self.values = torch.cat([self.values, values[torch.isfinite(values)]]).sort().values

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
