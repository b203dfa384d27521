"""Comparing two checkpoints tensor by tensor, in bounded memory.

Names, shapes and dtypes come from the headers alone. Values are compared as raw bytes
first (no torch needed when they are identical); only tensors whose bytes differ are read
through torch, in chunks, for the largest absolute and relative differences.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

from ..checkpoint import Checkpoint, Tensor
from ..checkpoint.extras import extras
from ..checkpoint.tensor import blocks

@dataclass
class TensorDiff:
    """One tensor present on both sides that is not bit-identical."""

    name: str
    shape_a: tuple[int, ...]
    shape_b: tuple[int, ...]
    dtype_a: str
    dtype_b: str
    max_abs: float | None = None
    max_rel: float | None = None
    mismatched: int = 0
    numel: int = 0

    @property
    def status(self) -> str:
        if self.shape_a != self.shape_b:
            return "shape"
        if self.dtype_a != self.dtype_b:
            return "dtype"
        return "different" if self.mismatched else "close"


@dataclass
class Comparison:
    source_a: str
    source_b: str
    only_a: list[str] = field(default_factory=list)
    only_b: list[str] = field(default_factory=list)
    diffs: list[TensorDiff] = field(default_factory=list)
    identical: int = 0
    extras: list[dict] = field(default_factory=list)
    atol: float = 0.0
    rtol: float = 0.0
    values: bool = True

    def of(self, status: str) -> list[TensorDiff]:
        return [d for d in self.diffs if d.status == status]

    @property
    def equal(self) -> bool:
        """No tensor missing, reshaped, retyped or beyond the tolerances."""
        return not (self.only_a or self.only_b or any(d.status != "close" for d in self.diffs))


def compare(a: Checkpoint, b: Checkpoint, names_a: list[str], names_b: list[str], *, atol: float = 0.0,
            rtol: float = 0.0, values: bool = True, progress: Callable[[int], None] | None = None) -> Comparison:
    """Compare the tensors ``names_a`` of ``a`` with ``names_b`` of ``b``."""
    result = Comparison(a.source, b.source, atol=atol, rtol=rtol, values=values)
    tensors_a, tensors_b = a.tensors, b.tensors
    in_b = set(names_b)
    result.only_a = [n for n in names_a if n not in in_b]
    in_a = set(names_a)
    result.only_b = [n for n in names_b if n not in in_a]
    for name in (n for n in names_a if n in in_b):
        ta, tb = tensors_a[name], tensors_b[name]
        diff = TensorDiff(name, ta.shape, tb.shape, ta.dtype.name, tb.dtype.name, numel=ta.numel)
        if ta.shape == tb.shape and values:
            if ta.dtype == tb.dtype and _same_bytes(ta, tb):
                result.identical += 1
            else:
                _measure(diff, ta, tb, atol, rtol)
                if diff.max_abs == 0 and ta.dtype == tb.dtype:
                    result.identical += 1  # equal values in another layout
                else:
                    result.diffs.append(diff)
            if progress is not None:
                progress(ta.nbytes + tb.nbytes)
        elif ta.shape != tb.shape or ta.dtype != tb.dtype:
            result.diffs.append(diff)
        else:
            result.identical += 1  # same name, shape and dtype; values not compared
    result.extras = _extras_diff(a, b)
    return result


def _same_bytes(a: Tensor, b: Tensor) -> bool:
    """Whether both tensors hold the same bytes (False when either is not contiguous: measure it)."""
    va, vb = a.contiguous_bytes(), b.contiguous_bytes()
    if va is None or vb is None:
        return False
    return len(va) == len(vb) and all(x == y for x, y in zip(blocks(va), blocks(vb)))


def _measure(diff: TensorDiff, a: Tensor, b: Tensor, atol: float, rtol: float) -> None:
    """Largest |a-b| and |a-b|/|b|, and how many entries break |a-b| <= atol + rtol*|b| (NaNs equal)."""
    import torch

    from ..checkpoint.values import chunks, to_torch

    max_abs = max_rel = 0.0
    mismatched = 0
    for ca, cb in chunks(to_torch(a), to_torch(b)):
        ca, cb = _comparable(ca), _comparable(cb)
        both_nan = torch.isnan(ca) & torch.isnan(cb)
        same_inf = torch.isinf(ca) & (ca == cb)
        gap = torch.where(both_nan | same_inf, torch.zeros((), dtype=ca.dtype), (ca - cb).abs())
        gap = torch.where(torch.isnan(gap), torch.full((), math.inf, dtype=ca.dtype), gap)
        scale = cb.abs()
        rel = torch.where(gap == 0, torch.zeros((), dtype=ca.dtype), gap / scale)
        max_abs = max(max_abs, float(gap.max()) if gap.numel() else 0.0)
        max_rel = max(max_rel, float(rel.max()) if rel.numel() else 0.0)
        mismatched += int((gap > atol + rtol * scale).sum())
    diff.max_abs, diff.max_rel, diff.mismatched = max_abs, max_rel, mismatched


def _comparable(values):
    import torch

    if values.is_complex():
        return torch.view_as_real(values).double().reshape(-1)
    return values.double() if values.dtype != torch.float64 else values


def _extras_diff(a: Checkpoint, b: Checkpoint) -> list[dict]:
    """Non-tensor entries that differ, by their one-line summaries."""
    left = {e["path"]: e["summary"] for e in extras(a)}
    right = {e["path"]: e["summary"] for e in extras(b)}
    return [{"path": p, "a": left.get(p), "b": right.get(p)}
            for p in list(left) + [p for p in right if p not in left] if left.get(p) != right.get(p)]
