"""A plan: every change an operation will make, checked before anything is computed or
written, printable for --dry-run, then applied to the checkpoint in memory.

Applying gives each change a new storage whose values are computed when they are read;
loaded tensors are never modified. Tensors tied together receive one new storage, so the
tie survives.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Callable

from .. import dtypes
from ..checkpoint import Checkpoint, Storage, Tensor
from ..checkpoint.moves import Moves
from ..checkpoint.quantized import Quantized, Streamed
from ..errors import PlanError
from ..parallel import Work, spread
from ..parsing import parse_document
from ..redaction import redacted
from ..sizes import plural

HISTORY_KEY = "paramsurgeon.operations"


@dataclass
class Change:
    """New values for ``names`` (one tensor, or a tie group that keeps sharing them)."""

    names: list[str]
    action: str
    shape: tuple[int, ...]
    dtype: str
    compute: Callable | None = None  # () -> new values: a torch.Tensor of its own (not a view of the
    # input, unless non-contiguous), or a bytearray of the raw bytes
    same_values: bool = False  # a new storage for the same values (untie)
    lazy: bool = False  # its values are checked only when computed (by the writer), not when the plan is
    # applied (every change is computed when read, so memory holds one result at a time)
    guarded: bool = False  # the values may leave the dtype's range: new Inf/NaN are an error
    origin: Tensor | None = None  # what guarded values derive from, element by element (its Inf/NaN stay)
    stored_as: Callable | None = None  # (the new plain tensor) -> the tensor written for it: quantize's parts
    dequantizes: bool = False  # meant to write a quantized weight as a plain tensor (no note says so)
    pieces: Callable | None = None  # () -> the same values a few MiB at a time, or None (checkpoint.Streamed)


@dataclass
class Plan:
    """What one operation does to a checkpoint."""

    command: str
    description: str
    changes: list[Change] = field(default_factory=list)
    aliases: list[tuple[str, str]] = field(default_factory=list)  # (target, source): target shares source
    drops: list[str] = field(default_factory=list)
    renames: dict[str, str] = field(default_factory=dict)
    module_renames: dict[str, str] = field(default_factory=dict)  # prefixes in a state dict's _metadata
    adds: dict[str, str] = field(default_factory=dict)  # new name -> the name it is placed before (and
    # takes its Parameter flags from); a Change then gives it values (split, concat)
    notes: list[str] = field(default_factory=list)
    kept: list[dict] = field(default_factory=list)  # {"name", "reason"}: left as they are, and why
    heading: str = ""  # a line a dry run shows above the table (e.g. a merge's method and inputs)
    rebuilt: list[tuple[str, str, Tensor]] | None = None  # the tensors afterwards, in order: (name, where it
    # comes from, the tensor); a tensor given twice is copied (its bytes, not a tie); the others go (drops
    # lists them)
    config: dict = field(default_factory=dict)  # keys of the model config (config.json) and their new values
    moves: Moves | None = None  # where the numbered modules go (layers, stack, experts)

    def document(self) -> dict:
        """Entries of its own for the --json plan (none for most operations)."""
        return {}

    def rows(self, ckpt: Checkpoint) -> list[dict]:
        """One row per affected tensor: name, shape and dtype before, what happens."""
        tensors = ckpt.tensors
        rows = self._rebuilt_rows(ckpt)
        for change in self.changes:
            for name in change.names:
                rows.append(_row(name, tensors.get(name), change.action, change.shape, change.dtype))
        for target, source in self.aliases:
            rows.append(_row(target, tensors[target], f"tie to {source}", tensors[source].shape,
                             tensors[source].dtype.name))
        rows += [_row(n, tensors[n], "drop", None, None) for n in self.drops]
        rows += [_row(old, tensors[old], f"rename to {new}", tensors[old].shape, tensors[old].dtype.name)
                 for old, new in self.renames.items()]
        return rows

    def _rebuilt_rows(self, ckpt: Checkpoint) -> list[dict]:
        """A row per tensor that ``rebuilt`` renames or copies (or takes from another checkpoint)."""
        rows, used = [], set()
        for name, origin, tensor in self.rebuilt or []:
            if name != origin:
                mine = origin in ckpt.tensors
                action = f"{'copy' if origin in used else 'rename'} to {name}" if mine else f"from {origin}"
                rows.append(_row(origin if mine else name, tensor, action, tensor.shape, tensor.dtype.name))
            used.add(origin)
        return rows

    def summary(self) -> str:
        """'3 x zero, 1 tied' for the line after a write."""
        actions: dict[str, int] = {}
        for change in self.changes:
            action = change.action.split(" from ")[0]
            actions[action] = actions.get(action, 0) + len(change.names)
        parts = [f"{n} x {action}" for action, n in actions.items()] + self._rebuilt_summary()
        parts += [f"{len(self.aliases)} tied"] if self.aliases else []
        parts += [f"{len(self.drops)} dropped"] if self.drops else []
        parts += [f"{len(self.renames)} renamed"] if self.renames else []
        return ", ".join(parts) if parts else "nothing changed"

    def _rebuilt_summary(self) -> list[str]:
        if self.rebuilt is None:
            return []
        seen: set[int] = set()
        renamed = copied = 0
        for name, origin, tensor in self.rebuilt:
            copied += id(tensor) in seen
            renamed += id(tensor) not in seen and name != origin
            seen.add(id(tensor))
        return [f"{n} {what}" for n, what in ((renamed, "renamed"), (copied, "copied")) if n]

    @property
    def changes_values(self) -> bool:
        """Whether any tensor gets new values (renames and drops keep every value)."""
        return bool(self.aliases) or any(not c.same_values for c in self.changes)


def fail(command: str, problems: list[str], advice: list[str] = ()) -> None:
    """Raise one PlanError listing ``problems`` (the first eight, and how many more), then the
    ``advice`` they share."""
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise PlanError(f"{command}: {'; '.join([shown, *advice])}")


def names_list(names: list[str], limit: int = 6) -> str:
    """'a, b, c and 4 more'."""
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _row(name: str, tensor: Tensor | None, action: str, shape, dtype) -> dict:
    if tensor is None:  # a new tensor
        return {"name": name, "shape": list(shape), "dtype": dtype, "action": action, "new_shape": list(shape),
                "new_dtype": dtype}
    return {"name": name, "shape": list(tensor.shape), "dtype": tensor.dtype.name, "action": action,
            "new_shape": list(shape) if shape is not None else None, "new_dtype": dtype}


def tie_units(ckpt: Checkpoint, names: list[str], *, follow: bool, untie: bool, command: str) -> list[list[str]]:
    """Group the selected names into units that receive the same new values.

    A tensor tied to tensors that were not selected is an error, unless ``follow``
    (change the whole group) or ``untie`` (the selected ones get storage of their own).
    """
    group_of = {n: g for g in ckpt.ties() for n in g}
    selected = set(names)
    units, seen, problems = [], set(), []
    for name in names:
        if name in seen:
            continue
        group = group_of.get(name)
        if group is None or untie:
            units.append([name])
            seen.add(name)
            continue
        outside = [m for m in group if m not in selected]
        if outside and not follow:
            problems.append(f"'{name}' shares its storage with {', '.join(repr(m) for m in outside)}")
        members = group if follow else [m for m in group if m in selected]
        units.append(members)
        seen.update(members)
    if problems:
        raise PlanError(f"{command}: {'; '.join(problems)}, which would change too; pass --follow-ties to change"
                        " the whole group or --untie to give the selected tensors storage of their own")
    return units


def apply(ckpt: Checkpoint, plan: Plan, progress: Callable[[int], None] | None = None,
          simulate: bool = False, work: Work = Work()) -> None:
    """Carry out ``plan`` on ``ckpt`` (new storages; the input file is untouched).

    New values are computed when they are read (by the writer: one tensor at a time, then let
    go), so memory does not grow with the number of changes; values that may overflow are
    computed once more here, to refuse them before anything is written. With ``simulate``,
    changed tensors get empty storages of the right size, enough to plan later steps against
    names, shapes, dtypes and ties. The overflow checks are spread over ``work``'s workers.
    """
    if plan.rebuilt is not None:
        _rebuild(ckpt, plan.rebuilt)
    if plan.config:
        ckpt.config = {**(ckpt.config or {}), **plan.config}
    if plan.moves is not None:
        ckpt.moves = [*ckpt.moves, plan.moves]  # a new list: a copy of the checkpoint shares the old one
    if plan.adds:
        _insert(ckpt, plan.adds)
    if not simulate:
        _refuse_overflows(plan, work)  # before anything is written
    for change in plan.changes:
        first = ckpt[change.names[0]]
        dtype = dtypes.BY_NAME[change.dtype]
        nbytes = math.prod(change.shape) * dtype.itemsize
        if simulate:
            fresh = Tensor(Storage(nbytes), dtype, change.shape)
        elif change.pieces is not None:
            fresh = Tensor(Streamed(nbytes, change.compute, change.pieces), dtype, change.shape)
        else:
            fresh = Tensor(Storage(nbytes, loader=change.compute, location=first.storage.location), dtype,
                           change.shape)
        stored = change.stored_as(fresh) if change.stored_as is not None else None  # one for a tie group
        for name in change.names:
            ckpt[name] = stored if stored is not None else _like(ckpt[name], fresh.storage, fresh)
        if change.dequantizes:
            ckpt.plain.update(change.names)
        if progress is not None:
            progress(fresh.nbytes)
    for target, source in plan.aliases:
        src = ckpt[source]
        ckpt[target] = src if type(src) is Quantized else _like(ckpt[target], src.storage, src)  # every part shared
    for name in plan.drops if plan.rebuilt is None else ():
        del ckpt[name]
    if plan.renames:
        rename(ckpt, plan.renames, plan.module_renames)
    entry = redacted(plan.description)  # a remote input named without its query (a signature)
    ckpt.metadata[HISTORY_KEY] = json.dumps(_history(ckpt.metadata) + [entry], separators=(",", ":"))


def _history(metadata: dict[str, str]) -> list:
    """The operations recorded so far; a value another tool wrote that is no JSON list is kept as
    the history's first entry (the file's metadata is never lost)."""
    text = metadata.get(HISTORY_KEY)
    if text is None:
        return []
    try:
        history = parse_document(json.loads, text)
    except ValueError:
        history = None
    return history if isinstance(history, list) else [text]


def _overflow(change: Change, values, dtype) -> list[str]:
    """'name' and how many of its values became Inf or NaN ([] when none did)."""
    from ..checkpoint.values import new_nonfinite, to_torch

    origins = [] if change.origin is None else [to_torch(change.origin)]
    count = new_nonfinite(values, *origins)
    if not count:
        return []
    return [f"{count:,} of {plural(math.prod(change.shape), 'value')} of '{change.names[0]}' would become Inf or NaN"
            f" ({dtype} holds |x| <= {dtype.largest:g})"]


def _refuse_overflows(plan: Plan, work: Work) -> None:
    """Compute the values of every change that may overflow (spread over the workers) and refuse
    the plan, naming every tensor whose values would become Inf or NaN."""
    guarded = [change for change in plan.changes if change.guarded and not change.lazy]
    sizes = {i: math.prod(c.shape) * dtypes.BY_NAME[c.dtype].itemsize for i, c in enumerate(guarded)}
    found = dict(spread(lambda i: _overflow(guarded[i], guarded[i].compute(), dtypes.BY_NAME[guarded[i].dtype]),
                        sizes, work, "checks"))
    overflows = [problem for i in sorted(found) for problem in found[i]]
    if overflows:
        raise PlanError(f"{plan.command}: {'; '.join(overflows)}; nothing was written; pass --allow-overflow to"
                        " write them anyway")


def _like(old: Tensor, storage, shape_from: Tensor) -> Tensor:
    """A tensor viewing ``storage`` as ``shape_from`` does, pickled like ``old`` (a Parameter stays one)."""
    tensor = Tensor(storage, shape_from.dtype, shape_from.shape, shape_from.stride, shape_from.offset)
    tensor.parameter, tensor.requires_grad = old.parameter, old.requires_grad
    return tensor


def _insert(ckpt: Checkpoint, adds: dict[str, str]) -> None:
    """Place each new name before its anchor, standing in for it until a Change gives it values."""
    container = ckpt.container
    before: dict[str, list[str]] = {}
    for new, anchor in adds.items():
        before.setdefault(anchor, []).append(new)
    items = [(new, value) for k, value in container.items() for new in before.get(k, []) + [k]]
    container.clear()
    container.update(items)


def _rebuild(ckpt: Checkpoint, rebuilt: list[tuple[str, str, Tensor]]) -> None:
    """Make the checkpoint's tensors those of ``rebuilt`` in its order (the rest of the mapping kept
    after them); a tensor met again becomes a copy over storage of its own, the copies of tensors that
    shared storage sharing one again. A state dict's per-module _metadata follows the names."""
    container = ckpt.container
    before = list(ckpt.tensors)
    seen: dict[int, int] = {}
    twins: dict[tuple[int, int], Storage] = {}
    items = []
    for name, _, tensor in rebuilt:
        copy = seen[id(tensor)] = seen.get(id(tensor), -1) + 1
        items.append((name, tensor if not copy else twin(tensor, lambda s: twins.setdefault((id(s), copy), _twin(s)))))
    others = [(k, v) for k, v in container.items() if not isinstance(v, Tensor)]
    container.clear()
    container.update(items + others)
    ckpt.forget()
    metadata = getattr(container, "_metadata", None)
    if isinstance(metadata, dict):
        _rebuild_metadata(metadata, [(origin, name) for name, origin, _ in rebuilt], before)


def twin(tensor: Tensor, storage_of: Callable[[Storage], Storage]) -> Tensor:
    """``tensor`` over ``storage_of(its storage)`` (a quantized tensor: each part so)."""
    from ..checkpoint.quantized import Quantized

    if isinstance(tensor, Quantized):
        made = Quantized(tensor.scheme, {role: twin(part, storage_of) for role, part in tensor.parts.items()},
                         tensor.shape, tensor.dtype, tensor.params)
    else:
        made = Tensor(storage_of(tensor.storage), tensor.dtype, tensor.shape, tensor.stride, tensor.offset)
    made.parameter, made.requires_grad, made.metadata = tensor.parameter, tensor.requires_grad, tensor.metadata
    return made


def _twin(storage: Storage) -> Storage:
    """A storage of the same bytes (the same span of the input, or the same values), not shared."""
    return Storage(storage.nbytes, file=storage.file, offset=storage.offset, crc32=storage.crc32,
                   values=storage.values, loader=storage.loader, location=storage.location)


def _rebuild_metadata(metadata: dict, moves: list[tuple[str, str]], before: list[str]) -> None:
    """Each module prefix of _metadata under the names each of its tensors now has (once per copy); a
    module without tensors (an activation) follows the nearest one above it that has some; a module
    whose tensors all went goes too."""
    mapped: dict[str, dict[str, None]] = {}
    for old, new in moves:
        olds, news = old.split("."), new.split(".")
        same = next((k for k in range(min(len(olds), len(news))) if olds[-1 - k] != news[-1 - k]),
                    min(len(olds), len(news)))
        moved = len(olds) - same  # the prefixes this long and longer are renamed with the tensor
        for depth in range(len(olds)):
            prefix = ".".join(olds[:depth])
            shown = ".".join(news[:depth + len(news) - len(olds)]) if depth >= moved else prefix
            mapped.setdefault(prefix, {})[shown] = None
    held = {".".join(name.split(".")[:depth]) for name in before for depth in range(name.count(".") + 1)}
    entries = []
    for prefix, value in metadata.items():
        above = prefix
        while above not in held and above:
            above = above.rpartition(".")[0]
        if above not in held:
            entries.append((prefix, value))
        else:
            entries += [(target + prefix[len(above):], value) for target in mapped.get(above, {})]
    metadata.clear()
    metadata.update(entries)


def rename(ckpt: Checkpoint, renames: dict[str, str], module_renames: dict[str, str]) -> None:
    """Rename entries in place, keeping their order, and the state dict's per-module _metadata."""
    container = ckpt.container
    items = [(renames.get(k, k), v) for k, v in container.items()]
    container.clear()
    container.update(items)
    ckpt.forget()
    metadata = getattr(container, "_metadata", None)
    if isinstance(metadata, dict) and module_renames:
        moved = [(module_renames.get(prefix, prefix), value) for prefix, value in metadata.items()]
        metadata.clear()
        metadata.update(moved)
