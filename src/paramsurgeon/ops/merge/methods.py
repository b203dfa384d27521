"""The merge formulas, tensor by tensor (the binding rules of DESIGN.md, after mergekit).

Each function takes torch views of one tensor of every input (memory-mapped, not yet copied,
and never written to) and returns the merged values in ``dtype`` (the written tensor's). The
arithmetic runs in the working dtype (float32, or float64 when an input is float64) a piece at
a time (``assembled``): memory holds the result and a few pieces of the inputs, whatever the
tensor's size. Every formula is elementwise once a few numbers are known: slerp's angle (float64
dot products over the pieces) and each ties task vector's trimming threshold (a radix select
over the pieces, ``Cut``). DARE's drops (``Drop``) are drawn piece after piece, task vector by
task vector, from where one draw per whole task vector would take them: a seed gives the drops it
always gave.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ...checkpoint.values import CHUNK, chunks, pieces
from .registry.base import Params

DOT_THRESHOLD = 0.9995  # slerp: above this |cos| the two tensors are colinear and lerp is used
EPS = 1e-8  # slerp: a norm at most this leaves its tensor unnormalised
_PIECE = 1 << 20  # elements per piece of a float64 dot product


def assembled(views: list[torch.Tensor], dtype: torch.dtype, formula: Callable[..., torch.Tensor]) -> torch.Tensor:
    """A new tensor of ``dtype`` holding ``formula`` of matching flat pieces of ``views``, piece after
    piece in row-major order (each piece cast as ``.to`` casts the whole)."""
    result = torch.empty(views[0].shape, dtype=dtype)
    flat, start = result.view(-1), 0
    for piece in pieces(*views):
        values = formula(*piece)
        flat[start:start + values.numel()] = values
        start += values.numel()
    return result


def linear(values: list[torch.Tensor], params: Params, work: torch.dtype, dtype: torch.dtype) -> torch.Tensor:
    """``sum w_i x_i``, divided by ``sum w_i`` when ``normalize``."""
    weights, normalize = params.weights, params.normalize
    divisor = math.fsum(weights)

    def formula(*inputs: torch.Tensor) -> torch.Tensor:
        total = torch.zeros(inputs[0].shape, dtype=work)
        for x, w in zip(inputs, weights):
            total.add_(x.to(work), alpha=w)
        return total.div_(divisor) if normalize else total

    return assembled(values, dtype, formula)


def slerp(a: torch.Tensor, b: torch.Tensor, params: Params, work: torch.dtype, dtype: torch.dtype) -> torch.Tensor:
    """Spherical interpolation from ``a`` (t=0) to ``b`` (t=1), as mergekit does it: the angle from
    the normalised, flattened tensors; nearly colinear tensors (|cos| > 0.9995) fall back to lerp;
    the result combines the tensors as they are (not normalised)."""
    t = params.t
    aa, bb, ab = _dots(a, b, work)
    norm_a, norm_b = math.sqrt(aa), math.sqrt(bb)
    cos = ab / ((norm_a if norm_a > EPS else 1.0) * (norm_b if norm_b > EPS else 1.0))
    if abs(cos) > DOT_THRESHOLD:
        s0, s1 = 1.0 - t, t
    else:
        theta = math.acos(cos)
        s0, s1 = math.sin(theta - theta * t) / math.sin(theta), math.sin(theta * t) / math.sin(theta)
    return assembled([a, b], dtype, lambda x, y: torch.mul(x.to(work), s0).add_(y.to(work), alpha=s1))


def _dots(a: torch.Tensor, b: torch.Tensor, work: torch.dtype) -> tuple[float, float, float]:
    """a.a, b.b and a.b of the flattened tensors (their values in ``work``), accumulated in float64
    piece by piece."""
    aa, bb, ab = [], [], []
    for x, y in chunks(a, b):
        for i in range(0, x.numel(), _PIECE):
            px, py = x[i:i + _PIECE].to(work).double(), y[i:i + _PIECE].to(work).double()
            aa.append(torch.dot(px, px).item())
            bb.append(torch.dot(py, py).item())
            ab.append(torch.dot(px, py).item())
    return math.fsum(aa), math.fsum(bb), math.fsum(ab)


def task_arithmetic(base: torch.Tensor, values: list[torch.Tensor], params: Params, work: torch.dtype,
                    dtype: torch.dtype, generator: torch.Generator | None = None) -> torch.Tensor:
    """``base + lambda * sum w_i (x_i - base)`` (divided by ``sum w_i`` when ``normalize``); with
    a ``generator``, each task vector goes through DARE at ``density`` first (dare-linear)."""
    weights, lambda_, normalize = params.weights, params.lambda_, params.normalize
    divisor = math.fsum(weights) if normalize else 1.0
    divisor = divisor if abs(divisor) >= 1e-8 else 1.0
    drops = Drop.each(generator, params.density, base.numel(), work, len(values)) if generator is not None else None

    def formula(base: torch.Tensor, *tuned: torch.Tensor) -> torch.Tensor:
        base = base.to(work)
        total = torch.zeros(base.shape, dtype=work)
        for i, (x, w) in enumerate(zip(tuned, weights)):
            delta = torch.sub(x.to(work), base)
            total.add_(drops[i].apply(delta) if drops else delta, alpha=w)
        if normalize:
            total.div_(divisor)
        return total.mul_(lambda_).add_(base)

    return assembled([base, *values], dtype, formula)


def ties(base: torch.Tensor, values: list[torch.Tensor], params: Params, work: torch.dtype, dtype: torch.dtype,
         generator: torch.Generator | None = None) -> torch.Tensor:
    """TIES: each task vector trimmed to its top-``density`` entries by magnitude (or, with a
    ``generator``, dropped at random by DARE: dare-ties) and multiplied by its weight; the sign
    of their sum elects a sign per entry (zero counts as +); the entries agreeing with it are
    averaged weighted by w (``sum mask*w*d / sum mask*w``, a zero divisor counts as 1; no
    division without ``normalize``); the result is ``base + lambda * merged``."""
    weights, lambda_, density, normalize = params.weights, params.lambda_, params.density, params.normalize
    if generator is not None:
        sifts = Drop.each(generator, density, base.numel(), work, len(values))
    else:
        sifts = [Cut.of(base, x, density, work) for x in values]

    def formula(base: torch.Tensor, *tuned: torch.Tensor) -> torch.Tensor:
        base = base.to(work)
        weighted = [sift.apply(torch.sub(x.to(work), base)).mul_(w) for x, w, sift in zip(tuned, weights, sifts)]
        return _elected(weighted, weights, normalize, work).mul_(lambda_).add_(base)

    return assembled([base, *values], dtype, formula)


def _elected(weighted: list[torch.Tensor], weights: list[float], normalize: bool, work: torch.dtype) -> torch.Tensor:
    """The sign election and the weighted mean of the agreeing entries (elementwise, so a piece
    at a time gives the same values as the whole)."""
    positive = torch.zeros(weighted[0].shape, dtype=work)
    for delta in weighted:
        positive.add_(delta)
    positive = positive >= 0
    merged = torch.zeros(weighted[0].shape, dtype=work)
    divisor = torch.zeros(weighted[0].shape, dtype=work)
    for delta, w in zip(weighted, weights):
        agrees = torch.where(positive, delta > 0, delta < 0)
        merged.add_(delta * agrees)  # sum mask*w*d as written: a NaN entry stays NaN, as in mergekit
        divisor.add_(agrees.to(work), alpha=w)
    if normalize:
        merged.div_(divisor.masked_fill_(divisor == 0, 1.0))
    return merged


class Cut:
    """TIES' trim of one task vector ``x - base``, found without holding it whole: its top
    ``max(1, int(density * numel))`` entries by magnitude, ranked as torch.kthvalue and topk rank
    them (NaN above infinity above every number), and among equal magnitudes at the threshold the
    first in row-major order. Magnitudes are compared as their bits, which order non-negative
    floats, infinity and NaN alike. ``apply`` trims the task vector's pieces, in order."""

    def __init__(self, threshold: int | None, equal: int, bits: torch.dtype) -> None:
        self.threshold, self.equal, self.bits = threshold, equal, bits

    @classmethod
    def of(cls, base: torch.Tensor, x: torch.Tensor, density: float, work: torch.dtype) -> Cut:
        """The cut of ``x - base`` at ``density``, by a radix select over the magnitudes' bits
        (16 bits a pass over the pieces)."""
        numel = base.numel()
        keep = max(1, int(density * numel))
        width = 32 if work == torch.float32 else 64
        bits = torch.int32 if width == 32 else torch.int64
        if keep >= numel:
            return cls(None, 0, bits)
        rank, prefix, equal = numel - keep + 1, 0, 0  # the rank-th smallest magnitude, as kthvalue's k
        for shift in range(width - 16, -1, -16):
            counts = torch.zeros(1 << 16, dtype=torch.int64)
            for b, y in chunks(base, x):
                keys = torch.sub(y.to(work), b.to(work)).abs_().view(bits)
                if shift < width - 16:
                    keys = keys[(keys >> (shift + 16)) == prefix]
                counts += torch.bincount((keys >> shift) & 0xFFFF, minlength=1 << 16)
            below = torch.cumsum(counts, 0)
            digit = int(torch.searchsorted(below, rank))
            rank -= int(below[digit - 1]) if digit else 0
            prefix, equal = (prefix << 16) | digit, int(counts[digit])
        return cls(prefix, equal - rank + 1, bits)  # entries equal to it, up to the rank-th, are kept

    def apply(self, delta: torch.Tensor) -> torch.Tensor:
        """Trim the next piece of the task vector (in place)."""
        if self.threshold is None:
            return delta
        keys = delta.abs().view(self.bits)
        kept = keys > self.threshold
        if self.equal:
            ties = (keys == self.threshold).nonzero().reshape(-1)[:self.equal]
            kept[ties] = True
            self.equal -= ties.numel()
        return delta.mul_(kept)


class Drop:
    """DARE on one task vector, a piece at a time: each entry kept with probability ``density`` and
    rescaled by ``1/density``, else 0. The draws come from a generator that starts where the
    task vector's draws start in the shared stream (task vector i after i*numel draws), and
    draws in pieces continue one another: the drops are those of one draw per whole task vector."""

    def __init__(self, generator: torch.Generator, density: float, work: torch.dtype) -> None:
        self.generator, self.density, self.work = generator, density, work

    @classmethod
    def each(cls, generator: torch.Generator, density: float, numel: int, work: torch.dtype,
             count: int) -> list[Drop]:
        """One Drop per task vector, in order, sharing ``generator``'s stream."""
        drops = []
        for i in range(count):
            drops.append(cls(torch.Generator().set_state(generator.get_state()), density, work))
            if i < count - 1:
                for start in range(0, numel, CHUNK):  # the draws of this task vector, discarded
                    torch.rand(min(CHUNK, numel - start), generator=generator, dtype=work)
        return drops

    def apply(self, delta: torch.Tensor) -> torch.Tensor:
        """Drop entries of the next piece of the task vector (in place)."""
        kept = torch.rand(delta.shape, generator=self.generator, dtype=self.work) < self.density
        return delta.mul_(kept).div_(self.density)


def working_dtype(values: list[torch.Tensor]) -> torch.dtype:
    """float64 when an input is float64, else float32."""
    return torch.float64 if any(v.dtype == torch.float64 for v in values) else torch.float32
