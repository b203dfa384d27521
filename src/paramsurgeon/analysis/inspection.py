"""What ``inspect`` reports, as plain data: one row per tensor, ties, totals, the rest of
the file, and a per-module tree. Rendering lives in report.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from operator import attrgetter
from typing import Callable, Iterable

from ..bulk import paused_gc
from ..checkpoint import Checkpoint
from ..checkpoint.blocks import candidates
from ..checkpoint.extras import extras
from ..checkpoint.kinds import kinds_in_order
from ..checkpoint.locations import off_cpu
from ..checkpoint.quantized import Quantized
from ..parallel import Work, spread
from .stats import Stats, sha256, tensor_stats


@dataclass(slots=True)
class Row:
    name: str
    shape: tuple[int, ...]
    dtype: str
    numel: int
    nbytes: int
    kind: str
    role: str
    device: str = "cpu"  # the storage's location tag, as torch.load restores it
    tied: list[str] = field(default_factory=list)
    stats: Stats | None = None
    sha256: str | None = None
    gguf_type: str | None = None  # the GGML type of a GGUF file's tensor ('Q4_K'); dtype is what it reads as
    quant: dict | None = None  # a quantized tensor's {"scheme", "bits", "block", "parts"}; dtype: what it reads as

    @property
    def shown_dtype(self) -> str:
        """The dtype column: the scheme of a quantized tensor, else the dtype."""
        return self.quant["scheme"] if self.quant else self.dtype


@dataclass
class Inspection:
    """What inspect found. ``read_notes`` are the checkpoint's own (what reading it noted: a
    quant_method not read, a partial group, an alias), which a command shows as it opens the
    checkpoint; ``notes`` are inspect's (a device, a type without values)."""

    source: str
    format: str
    key: str | None
    rows: list[Row]
    ties: list[list[str]]
    totals: dict
    extras: list[dict]
    metadata: dict[str, str]
    notes: list[str]
    stats: bool
    read_notes: list[str] = field(default_factory=list)
    tree: dict | None = None
    blocks: list[dict] | None = None  # with the tree: the repeated blocks, {"prefix", "count"}


@paused_gc()
def inspect(ckpt: Checkpoint, names: Iterable[str], *, stats: bool = True, hashes: bool = False,
            tree: bool = False, progress: Callable[[int], None] | None = None, bins: int | None = None,
            work: Work = Work()) -> Inspection:
    """Inspect the tensors ``names`` of ``ckpt`` (stats and hashes read every value once, tensors
    spread over ``work``'s workers; ``bins``: a histogram of that many bins from the same pass)."""
    tensors = ckpt.tensors
    kinds = kinds_in_order(tensors)
    ties = ckpt.ties()
    tied_with = {n: [m for m in g if m != n] for g in ties for n in g}
    names = list(names)
    chosen = list(map(tensors.__getitem__, names))
    found = kinds if names == list(tensors) else list(map(dict(zip(tensors, kinds)).__getitem__, names))
    # column by column, each a pass in C: 100,000 tensors are 100,000 rows
    rows = list(map(Row, names, map(_SHAPE, chosen), map(_DTYPE, chosen), map(_NUMEL, chosen), map(_NBYTES, chosen),
                    map(_LAYER, found), map(_ROLE, found), map(_LOCATION, chosen),
                    [tied_with.get(n, []) for n in names] if tied_with else [[] for _ in names]))
    notes = _device_notes(ckpt) + _gguf_types(ckpt, rows, chosen, stats or hashes)
    if Quantized in set(map(type, chosen)):  # a pass in C when there is none
        for row, tensor in zip(rows, chosen):
            if type(tensor) is Quantized:
                _quantized(row, tensor)
    if stats or hashes:
        def measure(index: int) -> tuple[Stats | None, str | None]:
            tensor = chosen[index]
            return (tensor_stats(tensor, bins=bins) if stats else None), (sha256(tensor) if hashes else None)

        readable = {i: t.nbytes for i, t in enumerate(chosen) if not getattr(t, "no_values", None)}
        for index, (rows[index].stats, rows[index].sha256) in spread(measure, readable, work, "tensors"):
            if progress is not None:
                progress(chosen[index].nbytes)
    shown = set(names) if ties else set()
    relevant_ties = [g for g in ties if any(n in shown for n in g)]
    return Inspection(
        source=ckpt.source, format=ckpt.format, key=".".join(map(str, ckpt.key)) or None, rows=rows,
        ties=relevant_ties, totals=totals(rows, relevant_ties), extras=extras(ckpt), metadata=dict(ckpt.metadata),
        notes=notes, read_notes=list(ckpt.notes), stats=stats, tree=module_tree(rows, relevant_ties) if tree else None,
        blocks=[{"prefix": p, "count": max(found) + 1} for p, found in candidates(names).items()] if tree else None)


_SHAPE, _DTYPE, _NUMEL, _NBYTES = attrgetter("shape"), attrgetter("dtype.name"), attrgetter("numel"), attrgetter("nbytes")
_LAYER, _ROLE, _LOCATION = attrgetter("layer"), attrgetter("role"), attrgetter("storage.location")


def _gguf_types(ckpt: Checkpoint, rows: list[Row], tensors: list, values: bool) -> list[str]:
    """Fill in each row's GGUF type (from what the reader recorded); when ``values`` are read, a note
    per tensor whose type has none."""
    types = getattr(ckpt.layout, "types", None)
    if types is None:
        return []
    notes = []
    for row, tensor in zip(rows, tensors):
        row.gguf_type = types.get(row.name)
        if values and getattr(tensor, "no_values", None):
            notes.append(f"{row.name}: no values: {tensor.no_values}; listed without statistics")
    return notes


def _quantized(row: Row, tensor: Quantized) -> None:
    """A quantized tensor's row: its scheme and stored parts (a format's own type has its column
    instead), and the bytes they take in the file (a listing of the file counts what it holds, not
    what it dequantizes to)."""
    row.nbytes = tensor.stored_nbytes
    if not tensor.scheme.native:
        row.quant = {"scheme": tensor.scheme.name, "bits": tensor.params.get("bits"),
                     "block": tensor.params.get("block"), "parts": list(tensor.part_names(row.name).values())}


def _device_notes(ckpt: Checkpoint) -> list[str]:
    """A note when storages record a device other than the cpu (torch.load needs that device)."""
    elsewhere = off_cpu(ckpt)
    if not elsewhere:
        return []
    where = ", ".join(f"{count} on {location}" for location, count in elsewhere.items())
    return [f"storages saved on a GPU ({where}): torch.load needs that device or map_location='cpu'; pass"
            " --device cpu to any writing command (e.g. convert) to record them as on the cpu"]


def _aliases(ties: list[list[str]], numel: dict[str, int]) -> set[str]:
    """Every tied name but the largest of its group (the first of equals): the group counts once,
    as the model counts it, and a view into a larger tensor counts as part of that tensor."""
    kept = {max(g, key=numel.__getitem__) for g in ties if g}
    return {n for g in ties for n in g} - kept


def totals(rows: list[Row], ties: list[list[str]]) -> dict:
    """Counts over the rows; a tie group counts once (it is one parameter)."""
    numel = {r.name: r.numel for r in rows} if ties else {}
    aliases = _aliases([[n for n in g if n in numel] for g in ties], numel)
    unique = [r for r in rows if r.name not in aliases] if aliases else rows
    by_dtype: dict[str, dict] = {}
    buffers = 0
    for r in unique:
        dtype = r.shown_dtype
        entry = by_dtype.get(dtype) or by_dtype.setdefault(dtype, {"tensors": 0, "numel": 0, "bytes": 0})
        entry["tensors"] += 1
        entry["numel"] += r.numel
        entry["bytes"] += r.nbytes
        if r.role == "buffer":
            buffers += r.numel
    numel = sum(entry["numel"] for entry in by_dtype.values())
    return {
        "tensors": len(rows),
        "unique_tensors": len(unique),
        "numel": numel,
        "parameters": numel - buffers,
        "buffers": buffers,
        "bytes": sum(entry["bytes"] for entry in by_dtype.values()),
        "by_dtype": by_dtype,
    }


def module_tree(rows: list[Row], ties: list[list[str]]) -> dict:
    """Parameter and buffer counts per module prefix, as nested nodes.

    A tied tensor counts in every module that holds it, but once in any module holding
    several of its names (the whole model counts it once), as ``module.parameters()`` does;
    there, a group of views counts as the largest of them that the module holds.
    """
    first = {name: group[0] for group in ties for name in group}
    root = _node("")
    for r in rows:
        parts = r.name.split(".")
        node = root
        key = first.get(r.name, r.name)
        for depth in range(len(parts)):
            held = node["_members"].get(key)
            if held is None or r.numel > held.numel:
                node["_members"][key] = r
            if depth == len(parts) - 1:
                break
            node = node["children"].setdefault(parts[depth], _node(".".join(parts[:depth + 1])))
    return _finished(root)


def _node(name: str) -> dict:
    return {"name": name, "_members": {}, "children": {}}


def _finished(node: dict) -> dict:
    members = node["_members"].values()
    return {"name": node["name"],
            "parameters": sum(r.numel for r in members if r.role != "buffer"),
            "buffers": sum(r.numel for r in members if r.role == "buffer"),
            "bytes": sum(r.nbytes for r in members),
            "children": [_finished(c) for c in node["children"].values()]}
