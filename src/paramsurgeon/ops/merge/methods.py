"""The merge formulas, tensor by tensor (the binding rules of DESIGN.md, after mergekit).

Each function takes torch views of one tensor of every input (memory-mapped, not yet copied,
and never written to), converts one input at a time to the working dtype (float32, or float64 when an input is
float64), and returns the merged values in the working dtype; the caller casts them back.
The task methods hold one task vector per input at a time (ties and dare-ties hold all of
them, as the sign election needs every one).
"""

from __future__ import annotations

import math

import torch

DOT_THRESHOLD = 0.9995  # slerp: above this |cos| the two tensors are colinear and lerp is used
EPS = 1e-8  # slerp: a norm at most this leaves its tensor unnormalised
_PIECE = 1 << 20  # elements per piece of a float64 dot product


def linear(values: list[torch.Tensor], weights: list[float], normalize: bool, work: torch.dtype) -> torch.Tensor:
    """``sum w_i x_i``, divided by ``sum w_i`` when ``normalize``."""
    total = torch.zeros(values[0].shape, dtype=work)
    for x, w in zip(values, weights):
        total.add_(x.to(work), alpha=w)
    if normalize:
        total.div_(math.fsum(weights))
    return total


def slerp(t: float, a: torch.Tensor, b: torch.Tensor, work: torch.dtype) -> torch.Tensor:
    """Spherical interpolation from ``a`` (t=0) to ``b`` (t=1), as mergekit does it: the angle from
    the normalised, flattened tensors; nearly colinear tensors (|cos| > 0.9995) fall back to lerp;
    the result combines the tensors as they are (not normalised)."""
    a, b = a.to(work), b.to(work)
    norm_a, norm_b = math.sqrt(_dot(a, a)), math.sqrt(_dot(b, b))
    cos = _dot(a, b) / ((norm_a if norm_a > EPS else 1.0) * (norm_b if norm_b > EPS else 1.0))
    if abs(cos) > DOT_THRESHOLD:
        s0, s1 = 1.0 - t, t
    else:
        theta = math.acos(cos)
        s0, s1 = math.sin(theta - theta * t) / math.sin(theta), math.sin(theta * t) / math.sin(theta)
    return torch.mul(a, s0).add_(b, alpha=s1)


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    """The dot product of the flattened tensors, accumulated in float64 piece by piece."""
    flat_a, flat_b = a.reshape(-1), b.reshape(-1)
    return math.fsum(torch.dot(flat_a[i:i + _PIECE].double(), flat_b[i:i + _PIECE].double()).item()
                     for i in range(0, flat_a.numel(), _PIECE))


def task_arithmetic(base: torch.Tensor, values: list[torch.Tensor], weights: list[float], lambda_: float,
                    normalize: bool, work: torch.dtype, density: float | None = None,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """``base + lambda * sum w_i (x_i - base)`` (divided by ``sum w_i`` when ``normalize``); with
    ``density``, each task vector goes through DARE first (dare-linear)."""
    base = base.to(work)
    total = torch.zeros(base.shape, dtype=work)
    for x, w in zip(values, weights):
        delta = torch.sub(x.to(work), base)
        if density is not None:
            delta = dare(delta, density, generator)
        total.add_(delta, alpha=w)
    if normalize:
        divisor = math.fsum(weights)
        total.div_(divisor if abs(divisor) >= 1e-8 else 1.0)
    return total.mul_(lambda_).add_(base)


def ties(base: torch.Tensor, values: list[torch.Tensor], weights: list[float], lambda_: float, density: float,
         normalize: bool, work: torch.dtype, generator: torch.Generator | None = None) -> torch.Tensor:
    """TIES: each task vector trimmed to its top-``density`` entries by magnitude (or, with a
    ``generator``, dropped at random by DARE: dare-ties) and multiplied by its weight; the sign
    of their sum elects a sign per entry (zero counts as +); the entries agreeing with it are
    averaged weighted by w (``sum mask*w*d / sum mask*w``, a zero divisor counts as 1; no
    division without ``normalize``); the result is ``base + lambda * merged``."""
    base = base.to(work)
    weighted = []
    for x, w in zip(values, weights):
        delta = torch.sub(x.to(work), base)
        delta = dare(delta, density, generator) if generator is not None else trim(delta, density)
        weighted.append(delta.mul_(w))
    positive = torch.zeros(base.shape, dtype=work)
    for delta in weighted:
        positive.add_(delta)
    positive = positive >= 0
    merged = torch.zeros(base.shape, dtype=work)
    divisor = torch.zeros(base.shape, dtype=work)
    for delta, w in zip(weighted, weights):
        agrees = torch.where(positive, delta > 0, delta < 0)
        merged.add_(torch.where(agrees, delta, 0.0))
        divisor.add_(agrees.to(work), alpha=w)
    del weighted
    if normalize:
        merged.div_(divisor.masked_fill_(divisor == 0, 1.0))
    return merged.mul_(lambda_).add_(base)


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """``delta`` with all but its top ``max(1, int(density * numel))`` entries by magnitude set to 0;
    among equal magnitudes at the threshold, the first in row-major order are kept."""
    numel = delta.numel()
    keep = max(1, int(density * numel))
    if keep >= numel:
        return delta
    magnitude = delta.abs().reshape(-1)
    threshold = magnitude.kthvalue(numel - keep + 1).values
    kept = magnitude > threshold
    missing = keep - int(kept.sum())
    if missing > 0:
        kept[(magnitude == threshold).nonzero().reshape(-1)[:missing]] = True
    return delta.mul_(kept.reshape(delta.shape))


def dare(delta: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    """DARE: each entry kept with probability ``density`` and rescaled by ``1/density``, else 0."""
    kept = torch.rand(delta.shape, generator=generator, dtype=delta.dtype) < density
    return delta.mul_(kept).div_(density)


def working_dtype(values: list[torch.Tensor]) -> torch.dtype:
    """float64 when an input is float64, else float32."""
    return torch.float64 if any(v.dtype == torch.float64 for v in values) else torch.float32
