"""Comparing two checkpoints: the named tensors, tensors and values in the rest of the file
(optimizer moments, EMA copies, the epoch), and which tensors share storage; in bounded memory.

Names, shapes and dtypes come from the headers alone. Values are compared as raw bytes
first (no torch needed when they are identical); only tensors whose bytes differ are read
through torch, in chunks, for the largest absolute and relative differences.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from ..checkpoint import Checkpoint, Tensor
from ..checkpoint.extras import summarize, tensors_in
from ..checkpoint.opaque import Opaque
from ..checkpoint.quantized import Quantized, refuse_valueless
from ..checkpoint.tensor import blocks
from ..parallel import Work, spread


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
    """What differs. ``whole`` says whether the rest of the file and the ties were compared; then
    ``extras`` are its non-tensor entries that differ (by summary; None: absent on that side),
    ``extra_diffs`` its tensors that differ (named by path), ``ties_a``/``ties_b`` the groups
    of shared storage on one side only."""

    source_a: str
    source_b: str
    only_a: list[str] = field(default_factory=list)
    only_b: list[str] = field(default_factory=list)
    diffs: list[TensorDiff] = field(default_factory=list)
    identical: int = 0
    atol: float = 0.0
    rtol: float = 0.0
    values: bool = True
    whole: bool = True
    extras: list[dict] = field(default_factory=list)
    extra_diffs: list[TensorDiff] = field(default_factory=list)
    extra_identical: int = 0
    ties_a: list[list[str]] = field(default_factory=list)
    ties_b: list[list[str]] = field(default_factory=list)

    def of(self, status: str) -> list[TensorDiff]:
        return [d for d in self.diffs if d.status == status]

    @property
    def equal(self) -> bool:
        """Nothing missing, reshaped, retyped, beyond the tolerances, changed or tied differently."""
        return not (self.only_a or self.only_b or self.extras or self.ties_a or self.ties_b
                    or any(d.status != "close" for d in self.diffs + self.extra_diffs))


def compare(a: Checkpoint, b: Checkpoint, names_a: list[str], names_b: list[str], *, atol: float = 0.0,
            rtol: float = 0.0, values: bool = True, whole: bool = True,
            progress: Callable[[int], None] | None = None, work: Work = Work()) -> Comparison:
    """Compare the tensors ``names_a`` of ``a`` with ``names_b`` of ``b`` (their values spread over
    ``work``'s workers); with ``whole``, also which of them share storage, and everything else in
    the two files, by path."""
    result = Comparison(a.source, b.source, atol=atol, rtol=rtol, values=values, whole=whole)
    tensors_a, tensors_b = a.tensors, b.tensors
    in_a, in_b = set(names_a), set(names_b)
    result.only_a = [n for n in names_a if n not in in_b]
    result.only_b = [n for n in names_b if n not in in_a]
    common = [n for n in names_a if n in in_b]

    def one(index: int) -> TensorDiff | None:
        name = common[index]
        return _compare_tensors(name, tensors_a[name], tensors_b[name], atol, rtol, values)

    sizes = {i: tensors_a[n].nbytes + tensors_b[n].nbytes if values and tensors_a[n].shape == tensors_b[n].shape
             else 0 for i, n in enumerate(common)}
    found = {}
    for index, diff in spread(one, sizes, work if values else Work(), "tensors"):
        found[index] = diff
        if progress is not None and sizes[index]:
            progress(sizes[index])
    for index in range(len(common)):
        if found[index] is None:
            result.identical += 1
        else:
            result.diffs.append(found[index])
    if whole:
        result.ties_a, result.ties_b = _tie_changes(a, b, common)
        _compare_entries(result, dict(a.extra_items()), dict(b.extra_items()), progress)
    return result


def bytes_to_compare(a: Checkpoint, names: list[str], whole: bool) -> int:
    """The bytes of ``a`` that a comparison of values may read (for a progress bar)."""
    tensors = a.tensors
    extra = sum(t.nbytes for _, value in a.extra_items() for t in tensors_in(value)) if whole else 0
    return sum(tensors[n].nbytes for n in names) + extra


def _compare_tensors(name: str, ta: Tensor, tb: Tensor, atol: float, rtol: float, values: bool,
                     progress: Callable[[int], None] | None = None) -> TensorDiff | None:
    """How ``ta`` and ``tb`` differ, or None when they hold the same values in the same dtype."""
    diff = TensorDiff(name, ta.shape, tb.shape, ta.dtype.name, tb.dtype.name, numel=ta.numel)
    if ta.shape != tb.shape or not values:
        return None if (ta.shape, ta.dtype) == (tb.shape, tb.dtype) else diff
    if progress is not None:
        progress(ta.nbytes + tb.nbytes)
    if ta.dtype == tb.dtype and _same_bytes(ta, tb):
        return None
    for side in (ta, tb):
        refuse_valueless({name: side}, [name], "diff")
    _measure(diff, ta, tb, atol, rtol)
    return None if diff.max_abs == 0 and ta.dtype == tb.dtype else diff  # equal values in another layout


def _tie_changes(a: Checkpoint, b: Checkpoint, names: list[str]) -> tuple[list[list[str]], list[list[str]]]:
    """Groups of ``names`` sharing storage in ``a`` only, and in ``b`` only."""
    ga, gb = _tie_groups(a, names), _tie_groups(b, names)
    return [g for g in ga if g not in gb], [g for g in gb if g not in ga]


def _tie_groups(ckpt: Checkpoint, names: list[str]) -> list[list[str]]:
    """``ckpt``'s groups of tied tensors restricted to ``names``, in their order."""
    position = {n: i for i, n in enumerate(names)}
    groups = [sorted((n for n in group if n in position), key=position.__getitem__) for group in ckpt.ties()]
    return sorted((g for g in groups if len(g) > 1), key=lambda g: position[g[0]])


def _compare_entries(result: Comparison, left: dict, right: dict, progress: Callable[[int], None] | None) -> None:
    """Compare the rest of two files path by path, depth first: tensors by value, containers of one
    kind entry by entry (each pair of shared objects once: a file of shared references stays
    linear), anything else as a whole. An entry on one side only is reported once, where it starts
    (a missing optimizer is one entry, not one per moment). Nested entries wait on a stack, not in
    recursion: a hostile file may nest deeper than Python recurses; below MAX_DEPTH levels their
    paths stop growing (they name the deepest key under the path MAX_DEPTH levels down)."""
    seen: set = set()
    stack = [_pairs("", left, right)]
    while stack:
        pair = next(stack[-1], None)
        if pair is None:
            stack.pop()
            continue
        prefix, key, va, vb = pair
        path = f"{prefix}{key}"
        if va is _MISSING or vb is _MISSING:
            result.extras.append({"path": path, "a": None if va is _MISSING else summarize(va),
                                  "b": None if vb is _MISSING else summarize(vb)})
        elif isinstance(va, Tensor) and isinstance(vb, Tensor):
            diff = _compare_tensors(path, va, vb, result.atol, result.rtol, result.values, progress)
            if diff is None:
                result.extra_identical += 1
            else:
                result.extra_diffs.append(diff)
        elif (parts_a := _parts(va)) is not None and (parts_b := _parts(vb)) is not None and _kind(va) == _kind(vb):
            if (id(va), id(vb)) not in seen:
                seen.add((id(va), id(vb)))
                stack.append(_pairs(f"{path}." if len(stack) < MAX_DEPTH else prefix, parts_a, parts_b))
        elif _same_value(va, vb):
            result.extra_identical += 1
        else:
            result.extras.append({"path": path, "a": summarize(va), "b": summarize(vb)})


_MISSING = object()  # an entry that one side does not have
MAX_DEPTH = 64  # levels of containers named in full in a path (optimizer moments are 3 deep)


def _pairs(prefix: str, left: dict, right: dict) -> Iterator[tuple[str, Any, Any, Any]]:
    """(prefix, key, left value, right value) for every key of either, left's order first."""
    for key in list(left) + [k for k in right if k not in left]:
        yield prefix, key, left.get(key, _MISSING), right.get(key, _MISSING)


def _parts(value: Any) -> dict | None:
    """The named parts of a container or of an object a pickle recorded; None for anything else."""
    if isinstance(value, dict):
        return value
    if isinstance(value, (list, tuple)):
        return dict(enumerate(value))
    if isinstance(value, Opaque):
        state = value.state if isinstance(value.state, dict) else {"state": value.state}
        parts = {**state, "args": list(value.args), "items": value.items, "dictitems": value.dictitems}
        return {k: v for k, v in parts.items() if v is not None and not (isinstance(v, list) and not v)}
    return None


def _kind(value: Any) -> str:
    return type(value).full_name if isinstance(value, Opaque) else "mapping" if isinstance(value, dict) else "sequence"


_PLAIN = (bool, int, float, complex, str, bytes, bytearray, type(None))


def _same_value(a: Any, b: Any) -> bool:
    """Equal plain values of one type (NaN equals NaN); other objects by their summaries."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return a == b if isinstance(a, _PLAIN) else summarize(a) == summarize(b)


def _same_bytes(a: Tensor, b: Tensor) -> bool:
    """Whether both tensors hold the same bytes (False when either is not contiguous: measure it);
    quantized ones: the same parts of one scheme and parameters, each of the same bytes."""
    if isinstance(a, Quantized) or isinstance(b, Quantized):
        return type(a) is type(b) and a.scheme is b.scheme and a.params == b.params and \
            a.parts.keys() == b.parts.keys() and all(_same_bytes(a.parts[r], b.parts[r]) for r in a.parts)
    va, vb = a.contiguous_bytes(), b.contiguous_bytes()
    if va is None or vb is None:
        return False
    return len(va) == len(vb) and all(x == y for x, y in zip(blocks(va), blocks(vb)))


def _measure(diff: TensorDiff, a: Tensor, b: Tensor, atol: float, rtol: float) -> None:
    """Largest |a-b| and |a-b|/|b|, and how many entries break |a-b| <= atol + rtol*|b| (as
    torch.isclose with equal_nan: NaN equals NaN, an infinity only itself; a value that is
    infinite or NaN on one side only differs by inf), in float64, a piece at a time."""
    import torch

    from ..checkpoint.values import pieces, to_torch

    max_abs = max_rel = 0.0
    mismatched = 0
    for ca, cb in pieces(to_torch(a), to_torch(b)):
        ca, cb = _comparable(ca), _comparable(cb)
        gap, scale, one_sided = _gap(ca, cb)
        max_abs = max(max_abs, float(gap.max()))
        tolerance = scale.mul(rtol).add_(atol)
        broken = gap > tolerance if one_sided is None else (gap > tolerance) | one_sided
        mismatched += int(broken.sum())
        rel = torch.where(gap == 0, 0.0, gap.div(scale)).nan_to_num_(nan=math.inf, posinf=math.inf)  # x/0, inf/inf
        max_rel = max(max_rel, float(rel.max()))
    diff.max_abs, diff.max_rel, diff.mismatched = max_abs, max_rel, mismatched


def _gap(ca, cb) -> tuple:
    """(|a-b|, |b|, where a value is infinite or NaN on one side only: None when all are finite).
    Equal infinities and NaN against NaN are a gap of 0; any other non-finite pair, inf."""
    import torch

    gap = torch.sub(ca, cb).abs_()
    if bool(torch.isfinite(gap).all()):
        return gap, cb.abs(), None
    same = (torch.isnan(ca) & torch.isnan(cb)) | (torch.isinf(ca) & (ca == cb))
    one_sided = ~(torch.isfinite(ca) & torch.isfinite(cb)) & ~same
    gap.masked_fill_(same, 0.0).masked_fill_(one_sided, math.inf)
    return gap, cb.abs(), one_sided


def _comparable(values):
    import torch

    if values.is_complex():
        return torch.view_as_real(values).double().reshape(-1)
    return values.double() if values.dtype != torch.float64 else values
