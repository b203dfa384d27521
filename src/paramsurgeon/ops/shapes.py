"""Operations that change shapes: resize (grow or shrink along a dim), split (one fused tensor
into parts), concat (parts into one), transpose (swap two dims).

Every check (names, dims, sizes, dtypes, ties, destinations) runs in ``plan`` and every
problem is reported at once; values are computed lazily, when the writer reaches a tensor,
so memory holds one result at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable

from .. import dtypes
from ..checkpoint import Checkpoint, Tensor
from ..checkpoint.kinds import infer_kinds
from ..declare import REQUIRED, option
from ..errors import SelectionError, UsageError
from ..selection import expand, unmatched, wildcard_map
from . import schemes
from .plan import Change, Plan, fail, names_list, tie_units
from .spec import Operation, Overflow, Sources, Targets, TiePolicy, with_warnings
from .values import _constant_problem, value_plan


def _numbers(text: str, flag: str) -> list[int]:
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
    return found


def _pair(text: str, flag: str) -> tuple[int, int]:
    """'0,1' -> (0, 1)."""
    parts = str(text).split(",")
    try:
        a, b = (int(p) for p in parts)
    except ValueError:
        raise UsageError(f"{flag} {text}: expected two dimensions A,B, e.g. 0,1") from None
    return a, b


def _dim(tensor: Tensor, dim: int) -> int | None:
    """``dim`` counted from the front (a negative one from the back), or None when out of range."""
    ndim = len(tensor.shape)
    return dim + ndim if -ndim <= dim < 0 else (dim if 0 <= dim < ndim else None)


def _no_dim(tensor: Tensor, dim: int, flag: str = "--dim") -> str:
    ndim = len(tensor.shape)
    return f"has {ndim} dimension{'s' if ndim != 1 else ''} {list(tensor.shape)}, so {flag} {dim} does not exist"


def _torch(tensor: Tensor):
    from ..checkpoint.values import to_torch

    return to_torch(tensor)


def _own(values):
    """``values`` as a contiguous tensor of its own (never a view of an input file)."""
    import torch

    return values.clone(memory_format=torch.contiguous_format)


@dataclass(kw_only=True)
class Resize(Targets, TiePolicy, Overflow, Operation):
    """Grow or shrink the selected tensors along a dim (vocab rows, classifier outputs and their bias).

    Shrinking keeps the first N slices, or with --keep the listed ones in that order; new slices get
    --fill. Tensors selected together (a layer's weight and bias) get the same slices.
    """

    name = "resize"
    example = "paramsurgeon resize resnet.pt -p 'fc.*' --keep 3,7,0:8 -o head10.pt"

    size: int | None = option(None, "--size", metavar="N", minimum=0, help="The new size along --dim.")
    dim: int = option(0, "--dim", metavar="D", help="The dim to resize (default 0: rows; negative counts from the"
                                                    " last).")
    keep: str | None = option(None, "--keep", metavar="I,J,A:B", help="Keep these slices, in this order (A:B is A"
                              " to B-1); the size is their count unless --size asks for more.")
    fill: str = option("mean", "--fill", metavar="F", help="New slices: mean (default: the mean of the input's slices),"
                       " zeros, default (what the layer of the new size gets from reset_parameters), a number, or an"
                       " init scheme such as 'normal(std=0.02)'.")
    pad_to_multiple: int | None = option(None, "--pad-to-multiple", metavar="M", minimum=1,
                                         help="Round the new size up to a multiple of M.")
    seed: int | None = option(None, "--seed", help="Make random fills reproducible (each tensor's generator comes"
                                                   " from the seed and its name).")

    def __post_init__(self) -> None:
        super().__post_init__()
        problems = []
        if self.size is None and self.keep is None and self.pad_to_multiple is None:
            problems.append("pass --size N, --keep I,J,... or --pad-to-multiple M")
        self._keep = self._fill = None
        try:
            self._keep = _numbers(self.keep, "--keep") if self.keep is not None else None
        except UsageError as e:
            problems.append(str(e))
        if self._keep is not None and self.size is not None and self.size < len(self._keep):
            problems.append(f"--keep lists {len(self._keep)} slices but --size is {self.size}; pass a --size of at"
                            " least as many, or keep fewer")
        try:
            self._fill = _parse_fill(self.fill)
        except UsageError as e:
            problems.append(str(e))
        if problems:
            raise UsageError(f"resize: {'; '.join(problems)}")

    @property
    def random(self) -> bool:
        return isinstance(self._fill, schemes.Scheme) and self._fill.random

    def new_size(self, old: int) -> int:
        """The size along the dim of a tensor that has ``old`` there now."""
        size = self.size if self.size is not None else (len(self._keep) if self._keep is not None else old)
        multiple = self.pad_to_multiple or 1
        return -(-size // multiple) * multiple

    def plan(self, ckpt: Checkpoint, sources: Sources) -> Plan:
        warnings: list[str] = []
        names = self.targets(ckpt, "resize", warnings)
        tensors = ckpt.tensors
        problems, shapes = [], {}
        partners = [m for g in ckpt.ties() if set(g) & set(names) for m in g] if self.follow_ties else []
        for name in dict.fromkeys(names + partners):
            tensor, dim = tensors[name], _dim(tensors[name], self.dim)
            if dim is None:
                problems.append(f"'{name}' {_no_dim(tensor, self.dim)}")
                continue
            old = tensor.shape[dim]
            outside = [i for i in self._keep or [] if i >= old]
            if outside:
                problems.append(f"'{name}' has {old} slices along dim {dim}, so --keep {names_list(list(map(str, outside)))}"
                                " is out of range")
            shapes[name] = tensor.shape[:dim] + (self.new_size(old),) + tensor.shape[dim + 1:]
        fail("resize", problems)
        resized = {**{n: t for n, t in tensors.items()}, **{n: SimpleNamespace(shape=s) for n, s in shapes.items()}}
        kinds = infer_kinds(tensors) if self._fill == schemes.Scheme("default") else {}
        seed = self.seed or 0

        def change_for(unit: list[str], tensor: Tensor):
            if len({tensors[n].shape for n in unit}) > 1:
                return f"shares its storage with {', '.join(unit[1:])} through views of other shapes; pass --untie"
            name, dim = unit[0], _dim(tensor, self.dim)
            shape, old = shapes[name], tensor.shape[dim]
            kept = len(self._keep) if self._keep is not None else min(old, shape[dim])
            fill = self._fill
            if shape[dim] > kept:
                if fill == schemes.Scheme("default"):
                    fill = schemes.default_for(name, resized, kinds[name].layer)
                    if isinstance(fill, str):
                        return f"{fill}, so --fill default does not apply; choose another --fill"
                problem = _fill_problem(fill, shape, tensor, self.allow_overflow)
                if problem:
                    return problem
            action = f"resize {old} -> {shape[dim]} along dim {dim}"
            details = ([f"keep {self.keep}"] if self._keep is not None else []) + \
                ([f"{shape[dim] - kept} new: {_shown(fill)}"] if shape[dim] > kept else [])
            guarded = isinstance(fill, schemes.Scheme) and fill.reach() > tensor.dtype.largest \
                and not self.allow_overflow
            compute = _resized(tensor, dim, shape, self._keep, fill, seed, name)
            return Change(unit, action + (f" ({'; '.join(details)})" if details else ""), shape, tensor.dtype.name,
                          compute, lazy=not guarded, guarded=guarded)

        plan = value_plan("resize", f"resize dim {self.dim} to {self.size if self.size is not None else 'fit'}"
                          f"{' keeping ' + self.keep if self.keep else ''}: {names_list(names)}", ckpt, names, self,
                          change_for)
        plan.notes += _left_behind(ckpt, list(shapes), shapes, self.dim)
        return with_warnings(self.buffer_note(ckpt, plan), warnings)


def _parse_fill(text: str):
    """'mean', a number, or a Scheme."""
    if text == "mean":
        return "mean"
    try:
        number = float(text)
    except ValueError:
        try:
            return schemes.parse(text)
        except UsageError as e:
            raise UsageError(str(e).replace("--scheme", "--fill", 1) + "; or pass mean, zeros, default or a"
                             " number") from e
    if not math.isfinite(number):
        raise UsageError(f"--fill {text}: must be a finite number")
    return schemes.Scheme("constant", {"val": int(number) if number.is_integer() and abs(number) < 2**63
                                       else number})


def _shown(fill) -> str:
    return fill if isinstance(fill, str) else (f"constant {fill.kwargs['val']}" if fill.name == "constant" else str(fill))


def _fill_problem(fill, shape: tuple[int, ...], tensor: Tensor, allow_overflow: bool) -> str | None:
    """Why ``fill`` cannot give the new slices of ``tensor`` (None when it can)."""
    if fill == "mean":
        if not (tensor.dtype.floating or tensor.dtype.complex):
            return f"is {tensor.dtype}, which has no mean to fill with; pass --fill zeros or a number"
        return None
    if fill.name == "constant":
        problem = _constant_problem(fill.kwargs["val"], tensor.dtype, allow_overflow)
        return problem.replace("--const", "--fill") if problem else None
    return fill.problem(shape, tensor.dtype.floating)


def _resized(tensor: Tensor, dim: int, shape: tuple[int, ...], keep: list[int] | None, fill, seed: int,
             name: str) -> Callable:
    """What computes the resized values: the kept slices, then the new ones."""
    def compute():
        import torch

        values = _torch(tensor)
        if keep is not None:
            kept = values.index_select(dim, torch.tensor(keep, dtype=torch.long))
        else:
            kept = values.narrow(dim, 0, min(values.shape[dim], shape[dim]))
        extra = shape[dim] - kept.shape[dim]
        if not extra:
            return _own(kept)
        part = list(shape)
        part[dim] = extra
        if fill == "mean":
            work = values.dtype if values.dtype in (torch.float64, torch.complex128) else \
                (torch.complex64 if values.is_complex() else torch.float32)
            new = values.to(work).mean(dim=dim, keepdim=True).expand(part).to(values.dtype)
        elif fill.name == "constant":
            wide = torch.float64 if values.is_floating_point() else values.dtype  # beyond float16: inf, as asked
            new = torch.full(part, fill.kwargs["val"], dtype=wide).to(values.dtype)
        else:  # drawn for the whole tensor of the new size (fans are the layer's), then its new slices
            new = schemes.fill(fill, shape, values.dtype, seed, name).narrow(dim, kept.shape[dim], extra)
        return torch.cat([kept, new], dim=dim)

    return compute


def _left_behind(ckpt: Checkpoint, names: list[str], shapes: dict, dim: int) -> list[str]:
    """A note for tensors of a resized layer left at the old size (a bias not selected)."""
    chosen, notes = set(names), []
    for name in names:
        prefix = name.rpartition(".")[0]
        tensor = ckpt[name]
        d = _dim(tensor, dim)
        for other, t in ckpt.tensors.items():
            if other in chosen or other.rpartition(".")[0] != prefix or _dim(t, dim) != d or d is None:
                continue
            if t.shape[d] == tensor.shape[d] != shapes[name][d]:
                notes.append(f"'{other}' keeps {t.shape[d]} along dim {d} though '{name}' beside it becomes"
                             f" {shapes[name][d]}; select it too to resize the layer whole")
                chosen.add(other)
    return notes


@dataclass(kw_only=True)
class Transpose(Targets, TiePolicy, Operation):
    """Swap two dims of the selected tensors, e.g. GPT-2 Conv1D (in, out) weights to nn.Linear (out, in)."""

    name = "transpose"
    example = "paramsurgeon transpose gpt2.pt -p 'h.*.mlp.c_fc.weight' -o linear.pt"

    dims: str = option("0,1", "--dims", metavar="A,B", help="The two dims to swap (default 0,1).")

    def __post_init__(self) -> None:
        super().__post_init__()
        self._dims = _pair(self.dims, "--dims")

    def plan(self, ckpt: Checkpoint, sources: Sources) -> Plan:
        warnings: list[str] = []
        names = self.targets(ckpt, "transpose", warnings)
        a, b = self._dims

        def change_for(unit: list[str], tensor: Tensor):
            da, db = _dim(tensor, a), _dim(tensor, b)
            if da is None or db is None:
                return _no_dim(tensor, a if da is None else b, "--dims")
            if da == db:
                return f"has {len(tensor.shape)} dimensions, and --dims {a},{b} names one of them twice"
            shape = list(tensor.shape)
            shape[da], shape[db] = shape[db], shape[da]
            return Change(unit, f"transpose dims {da},{db}", tuple(shape), tensor.dtype.name,
                          lambda: _own(_torch(tensor).transpose(da, db)), lazy=True)

        plan = value_plan("transpose", f"transpose dims {a},{b}: {names_list(names)}", ckpt, names, self, change_for)
        return with_warnings(plan, warnings)


@dataclass(kw_only=True)
class Split(TiePolicy, Operation):
    """Cut fused tensors into parts along a dim: GPT-2 c_attn into q, k, v (dim 1), qkv_proj (dim 0).

    --from and each --to are names or globs with the same wildcards, mapped as rename maps them.
    """

    name = "split"
    example = ("paramsurgeon split gpt2.pt --from 'h.*.attn.c_attn.weight' --to 'h.*.attn.q.weight'"
               " 'h.*.attn.k.weight' 'h.*.attn.v.weight' --dim 1 -o qkv.pt")

    from_: str = option(REQUIRED, "--from", metavar="NAME", help="The fused tensors (a name or a glob).")
    to: list[str] = option(REQUIRED, "--to", metavar="NAME...", greedy=True,
                           help="One name (or glob with the same wildcards) per part, in order.")
    dim: int = option(0, "--dim", metavar="D", help="The dim to cut along (default 0).")
    sizes: str | None = option(None, "--sizes", metavar="A,B,...", help="The size of each part (they must add up to"
                               " the dim); default equal parts.")
    keep_source: bool = option(False, "--keep-source", help="Keep the fused tensor beside its parts.")

    def __post_init__(self) -> None:
        super().__post_init__()
        self._to = _parts(self.to, self.from_)
        if len(self._to) < 2:
            raise UsageError(f"split: --to names {len(self._to)} part; name two or more (--to A B ...)")
        self._sizes = _numbers(self.sizes, "--sizes") if self.sizes is not None else None
        if self._sizes is not None and len(self._sizes) != len(self._to):
            raise UsageError(f"split: --sizes has {len(self._sizes)} values for {len(self._to)} parts; pass one"
                             " per part")

    def plan(self, ckpt: Checkpoint, sources: Sources) -> Plan:
        tensors = ckpt.tensors
        names = list(tensors)
        _must_match(names, [self.from_], "split", ckpt.key)
        maps = [wildcard_map(self.from_, to, names) for to in self._to]
        parts = {source: [m[source] for m in maps] for source in maps[0]}
        problems = _destination_problems(ckpt, {d: s for s, ds in parts.items() for d in ds},
                                         [d for ds in parts.values() for d in ds])
        cuts = {}
        for source in parts:
            tensor, dim = tensors[source], _dim(tensors[source], self.dim)
            if dim is None:
                problems.append(f"'{source}' {_no_dim(tensor, self.dim)}")
                continue
            length, count = tensor.shape[dim], len(self._to)
            sizes = self._sizes or ([length // count] * count if length % count == 0 else None)
            if sizes is None:
                problems.append(f"'{source}' has {length} along dim {dim}, which does not cut into {count} equal"
                                " parts; pass --sizes")
            elif sum(sizes) != length:
                problems.append(f"'{source}' has {length} along dim {dim}, but --sizes {self.sizes} add up to"
                                f" {sum(sizes)}")
            else:
                cuts[source] = (dim, sizes)
        units = _units(ckpt, list(parts), self, "split", problems)
        problems += [f"'{u[0]}' shares its storage with {', '.join(u[1:])} through views of other shapes; pass"
                     " --untie" for u in units if len({tensors[n].shape for n in u}) > 1]
        fail("split", problems)
        plan = Plan("split", f"split {self.from_} along dim {self.dim} into {', '.join(self._to)}",
                    drops=[] if self.keep_source else list(parts))
        for unit in units:
            tensor, (dim, sizes) = tensors[unit[0]], cuts[unit[0]]
            start = 0
            for index, size in enumerate(sizes):
                shape = tensor.shape[:dim] + (size,) + tensor.shape[dim + 1:]
                new = [parts[s][index] for s in unit]
                plan.adds.update({n: s for n, s in zip(new, unit)})
                plan.changes.append(Change(new, f"split from {unit[0]}: part {index + 1}, {start}:{start + size} of dim {dim}",
                                           shape, tensor.dtype.name, _part(tensor, dim, start, size), lazy=True))
                start += size
        return plan


def _part(tensor: Tensor, dim: int, start: int, size: int) -> Callable:
    return lambda: _own(_torch(tensor).narrow(dim, start, size))


@dataclass(kw_only=True)
class Concat(TiePolicy, Operation):
    """Join parts into one tensor along a dim (the inverse of split): q, k, v into a fused qkv.

    Each --from is a name or glob with the same wildcards as --to; parts are joined in --from order.
    """

    name = "concat"
    example = ("paramsurgeon concat model.pt --from 'layers.*.q_proj.weight' 'layers.*.k_proj.weight'"
               " 'layers.*.v_proj.weight' --to 'layers.*.qkv_proj.weight' -o fused.pt")

    from_: list[str] = option(REQUIRED, "--from", metavar="NAME...", greedy=True,
                              help="The parts, in order (names or globs with the same wildcards as --to).")
    to: str = option(REQUIRED, "--to", metavar="NAME", help="The joined tensor (a name or a glob).")
    dim: int = option(0, "--dim", metavar="D", help="The dim to join along (default 0).")
    keep_source: bool = option(False, "--keep-source", help="Keep the parts beside the joined tensor.")

    def __post_init__(self) -> None:
        super().__post_init__()
        self._from = _parts(self.from_, self.to)
        if len(self._from) < 2:
            raise UsageError(f"concat: --from names {len(self._from)} part; name two or more (--from A B ...)")

    def plan(self, ckpt: Checkpoint, sources: Sources) -> Plan:
        tensors = ckpt.tensors
        names = list(tensors)
        _must_match(names, self._from, "concat", ckpt.key)
        joined: dict[str, list] = {}
        problems = []
        for index, glob in enumerate(self._from):
            for source, dest in wildcard_map(glob, self.to, names).items():
                slots = joined.setdefault(dest, [None] * len(self._from))
                if slots[index] is not None:
                    problems.append(f"'{dest}' gets two parts from --from '{glob}': {slots[index]} and {source}")
                slots[index] = source
        for dest, slots in joined.items():
            missing = [self._from[i] for i, s in enumerate(slots) if s is None]
            if missing:
                problems.append(f"'{dest}' gets no part from --from {', '.join(repr(m) for m in missing)}")
        complete = {d: s for d, s in joined.items() if None not in s}
        used = [s for slots in complete.values() for s in slots]
        twice = sorted({s for s in used if used.count(s) > 1})
        problems += [f"'{s}' is a part of more than one joined tensor (or twice of one)" for s in twice]
        problems += _destination_problems(ckpt, {d: s[0] for d, s in complete.items()}, list(complete))
        for dest, slots in complete.items():
            problems += _join_problems(dest, [tensors[s] for s in slots], slots, self.dim)
        _units(ckpt, used, self, "concat", problems)
        fail("concat", problems)
        plan = Plan("concat", f"concat {', '.join(self._from)} along dim {self.dim} into {self.to}",
                    drops=[] if self.keep_source else used)
        group_of = {n: frozenset(g) for g in ckpt.ties() for n in g}
        together: dict[tuple, list[str]] = {}
        for dest, slots in complete.items():
            key = tuple(group_of.get(s, s) for s in slots) if not self.untie else (dest,)
            together.setdefault(key, []).append(dest)
        for dests in together.values():
            slots = complete[dests[0]]
            parts = [tensors[s] for s in slots]
            dim = _dim(parts[0], self.dim)
            shape = list(parts[0].shape)
            shape[dim] = sum(p.shape[dim] for p in parts)
            plan.adds.update({d: complete[d][0] for d in dests})
            plan.changes.append(Change(dests, f"concat from {', '.join(slots)} along dim {dim}", tuple(shape),
                                       parts[0].dtype.name, _joined(parts, dim), lazy=True))
        return plan


def _joined(parts: list[Tensor], dim: int) -> Callable:
    def compute():
        import torch

        return torch.cat([_torch(p) for p in parts], dim=dim)

    return compute


def _join_problems(dest: str, parts: list[Tensor], names: list[str], dim: int) -> list[str]:
    """How the parts of ``dest`` disagree (dims, dtype, the sizes off the joined dim)."""
    first = parts[0]
    d = _dim(first, dim)
    if d is None or any(len(p.shape) != len(first.shape) for p in parts):
        shown = ", ".join(f"'{n}' {list(p.shape)}" for n, p in zip(names, parts))
        return [f"'{dest}': the parts cannot be joined along dim {dim}: {shown}"]
    problems = []
    dtypes_seen = {p.dtype.name for p in parts}
    if len(dtypes_seen) > 1:
        problems.append(f"'{dest}': the parts differ in dtype: "
                        + ", ".join(f"'{n}' {p.dtype}" for n, p in zip(names, parts)))
    off = [i for i in range(len(first.shape)) if i != d and len({p.shape[i] for p in parts}) > 1]
    if off:
        problems.append(f"'{dest}': the parts differ off dim {d} (in dim {', '.join(map(str, off))}): "
                        + ", ".join(f"'{n}' {list(p.shape)}" for n, p in zip(names, parts)))
    return problems


def _parts(globs: list[str], other: str) -> list[str]:
    """The parts ``globs`` name: with braces on this side only, one part per expansion
    ('h.*.{q,k,v}.weight' is three); with braces on both sides, they pair up as in rename."""
    if len(expand(other)) > 1:
        return list(globs)
    return [e for glob in globs for e in expand(glob)]


def _must_match(names: list[str], globs: list[str], command: str, key: tuple) -> None:
    """A SelectionError naming every --from glob (or its brace expansion) that matches no tensor."""
    problems = unmatched(names, globs, "--from", key)
    if problems:
        raise SelectionError(f"{command}: {'; '.join(problems)}")


def _destination_problems(ckpt: Checkpoint, origin: dict[str, str], destinations: list[str]) -> list[str]:
    """Destinations that exist already, or that two sources would both write."""
    tensors = ckpt.tensors
    problems = [f"'{d}' is named twice as a destination" for d in sorted({d for d in destinations
                                                                         if destinations.count(d) > 1})]
    existing = [d for d in dict.fromkeys(destinations) if d in ckpt.container]
    problems += [f"'{d}' exists already (from '{origin[d]}'){'' if d in tensors else ' as a non-tensor entry'};"
                 " drop or rename it first, or choose another --to" for d in existing]
    return problems


def _units(ckpt: Checkpoint, sources: list[str], ties: TiePolicy, command: str, problems: list[str]) -> list[list[str]]:
    """``sources`` grouped by storage (their parts are tied as they are): a source tied to a tensor
    that is not a source is a problem unless --untie, or --keep-source (the source then stays)."""
    group_of = {n: g for g in ckpt.ties() for n in g}
    chosen, units, seen = set(sources), [], set()
    keep = getattr(ties, "keep_source", False)
    for name in sources:
        if name in seen:
            continue
        group = group_of.get(name, [name])
        outside = [m for m in group if m not in chosen]
        if ties.untie or len(group) == 1:
            units.append([name])
            seen.add(name)
            continue
        if outside and not keep:
            problems.append(f"'{name}' shares its storage with {', '.join(repr(m) for m in outside)}, which is not"
                            f" a source of this {command}; pass --untie to leave {'it' if len(outside) == 1 else 'them'}"
                            " as it is, or --keep-source")
        members = [m for m in group if m in chosen]
        units.append(members)
        seen.update(members)
    return units


__all__ = ["Resize", "Transpose", "Split", "Concat"]
