"""split and concat: one fused tensor into parts along a dim, and parts back into one. Names map
as rename maps them; every destination, shape, dtype and tie is checked before anything is computed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ...checkpoint import Checkpoint, Tensor
from ...declare import REQUIRED, option
from ...errors import SelectionError, UsageError
from ...selection import expand, unmatched, wildcard_map
from ...sizes import plural
from ..plan import Change, Plan, fail
from ..spec import Operation, Sources, TiePolicy
from .common import dim_of, no_dim, numbers, own, torch_of


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
        self._sizes = numbers(self.sizes, "--sizes") if self.sizes is not None else None
        if self._sizes is not None and len(self._sizes) != len(self._to):
            raise UsageError(f"split: --sizes has {plural(len(self._sizes), 'value')} for {plural(len(self._to), 'part')}; pass one"
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
            tensor, dim = tensors[source], dim_of(tensors[source], self.dim)
            if dim is None:
                problems.append(f"'{source}' {no_dim(tensor, self.dim)}")
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
                action = f"split from {unit[0]}: part {index + 1}, {start}:{start + size} of dim {dim}"
                plan.changes.append(Change(new, action, shape, tensor.dtype.name, _part(tensor, dim, start, size),
                                           lazy=True))
                start += size
        return plan


def _part(tensor: Tensor, dim: int, start: int, size: int) -> Callable:
    return lambda: own(torch_of(tensor).narrow(dim, start, size))


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
            dim = dim_of(parts[0], self.dim)
            shape = list(parts[0].shape)
            shape[dim] = sum(p.shape[dim] for p in parts)
            plan.adds.update({d: complete[d][0] for d in dests})
            plan.changes.append(Change(dests, f"concat from {', '.join(slots)} along dim {dim}", tuple(shape),
                                       parts[0].dtype.name, _joined(parts, dim), lazy=True))
        return plan


def _joined(parts: list[Tensor], dim: int) -> Callable:
    def compute():
        import torch

        return torch.cat([torch_of(p) for p in parts], dim=dim)

    return compute


def _join_problems(dest: str, parts: list[Tensor], names: list[str], dim: int) -> list[str]:
    """How the parts of ``dest`` disagree (dims, dtype, the sizes off the joined dim)."""
    first = parts[0]
    d = dim_of(first, dim)
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
            them = "it" if len(outside) == 1 else "them"
            problems.append(f"'{name}' shares its storage with {', '.join(repr(m) for m in outside)}, which is not"
                            f" a source of this {command}; pass --untie to leave {them} as it is, or --keep-source")
        members = [m for m in group if m in chosen]
        units.append(members)
        seen.update(members)
    return units
