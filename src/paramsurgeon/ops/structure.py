"""Operations that change which tensors exist, what they are called, and which share
storage: copy (values from other tensors or another checkpoint), tie, untie, rename, drop."""

from __future__ import annotations

from dataclasses import dataclass

from ..checkpoint import Checkpoint, Storage, Tensor
from ..checkpoint.contents import same_values
from ..checkpoint.moves import renamed_modules
from ..checkpoint.quantized import Quantized
from ..checkpoint.tensor import view_key
from ..declare import REQUIRED, option
from ..errors import SelectionError, UnfitTensorError, UsageError
from ..selection import Selection, Selector, select, suggest, unmatched, wildcard_map
from ..sizes import plural
from .plan import Change, Plan, fail, names_list
from .spec import Operation, Overflow, Sources, Targets, TiePolicy, with_warnings
from .values import copy_of, may_misfit, misfits, narrows, value_plan


@dataclass(kw_only=True)
class Copy(Selection, TiePolicy, Overflow, Operation):
    """Copy values into existing tensors: from other tensors, or from another checkpoint."""

    name = "copy"
    example = "paramsurgeon copy model.pt --source pretrained.pt --skip-mismatched -o init.pt"

    from_: str | None = option(None, "--from", metavar="SRC", help="Source names (a glob).")
    to: str | None = option(None, "--to", metavar="DST", help="Target names, with the same wildcards as --from.")
    source: str | None = option(None, "--source", metavar="OTHER", path=True, help="Read the sources from another"
                                " checkpoint (e.g. pretrained weights); without --from/--to, copy every tensor whose"
                                " name is in both.")
    source_key: str | None = option(None, "--source-key", metavar="KEY", help="--key for the --source checkpoint.")
    skip_mismatched: bool = option(False, "--skip-mismatched",
                                   help="Skip (and report) pairs whose shapes differ instead of failing.")

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.from_ is None) != (self.to is None):
            raise UsageError("copy: pass --from and --to together")
        if self.from_ is None and self.source is None:
            raise UsageError("copy: pass --from SRC --to DST, or --source OTHER")

    def plan(self, ckpt: Checkpoint, sources: Sources) -> Plan:
        other = ckpt if self.source is None else sources.checkpoint(self.source, self.source_key)
        warnings: list[str] = []
        narrowed = None
        if self.selector.narrows:
            narrowed, problems = self.choose(ckpt.tensors, ckpt.key)
            warnings += problems
        pairs, report = copy_pairs(ckpt, other, self.from_, self.to, narrowed)
        return with_warnings(_plan_copy(ckpt, other, pairs, skip_mismatched=self.skip_mismatched, ties=self,
                                        report=report, guard=not self.allow_overflow), warnings)


@dataclass(kw_only=True)
class Tie(TiePolicy, Operation):
    """Make tensors share one storage (e.g. tie an LM head to the token embedding)."""

    name = "tie"
    example = "paramsurgeon tie gpt.pt --source wte.weight --target lm_head.weight -o tied.pt"

    source: str = option(REQUIRED, "--source", metavar="NAME", help="The tensor whose storage is shared.")
    target: list[str] = option(REQUIRED, "--target", metavar="GLOB",
                               help="Tensors that take the source's values and share its storage; repeatable.")

    def plan(self, ckpt: Checkpoint, sources: Sources) -> Plan:
        problems = unmatched(list(ckpt.tensors), self.target, "--target", ckpt.key)
        if problems:
            raise SelectionError("tie: " + "; ".join(problems))
        names, _ = select(ckpt.tensors, Selector(patterns=list(self.target)))
        return _plan_tie(ckpt, self.source, names, follow=self.follow_ties, untie=self.untie)


@dataclass(kw_only=True)
class Untie(Targets, Operation):
    """Give each selected tensor storage of its own; values do not change."""

    name = "untie"
    example = "paramsurgeon untie gpt.pt -p lm_head.weight -o untied.pt"

    def plan(self, ckpt: Checkpoint, sources: Sources) -> Plan:
        warnings: list[str] = []
        return with_warnings(_plan_untie(ckpt, self.targets(ckpt, "untie", warnings)), warnings)


@dataclass(kw_only=True)
class Rename(Operation):
    """Rename tensors by wildcard mapping, e.g. strip DataParallel's 'module.' prefix."""

    name = "rename"
    example = "paramsurgeon rename model.pt --from 'module.*' --to '*' -o clean.pt"

    from_: str = option(REQUIRED, "--from", metavar="GLOB", help="Names to rename.")
    to: str = option(REQUIRED, "--to", metavar="GLOB", help="New names, with the same wildcards.")

    def plan(self, ckpt: Checkpoint, sources: Sources) -> Plan:
        return _plan_rename(ckpt, self.from_, self.to)


@dataclass(kw_only=True)
class Drop(Targets, Operation):
    """Remove the selected tensors."""

    name = "drop"
    example = "paramsurgeon drop model.pt -p 'fc.*' -o backbone.pt"

    def plan(self, ckpt: Checkpoint, sources: Sources) -> Plan:
        warnings: list[str] = []
        return with_warnings(_plan_drop(ckpt, self.targets(ckpt, "drop", warnings)), warnings)


def copy_pairs(ckpt: Checkpoint, source: Checkpoint, from_glob: str | None, to_glob: str | None,
               targets: list[str] | None) -> tuple[dict[str, str], list[str]]:
    """Target name -> source name, and report lines (for --source without --from/--to).

    With globs: every source name matching ``from_glob`` maps to ``to_glob``; each target
    must exist. Without: every name present on both sides (restricted to ``targets``).
    """
    mine, theirs = ckpt.tensors, source.tensors
    if from_glob is None:
        allowed = set(targets) if targets is not None else set(mine)
        pairs = {n: n for n in mine if n in theirs and n in allowed}
        only_source = [n for n in theirs if n not in mine]
        only_target = [n for n in mine if n not in theirs and n in allowed]
        report = []
        if only_source:
            report.append(f"only in the source ({len(only_source)}): {names_list(only_source)}")
        if only_target:
            report.append(f"only in the target, kept ({len(only_target)}): {names_list(only_target)}")
        if not pairs:
            hint = prefix_mapping(list(theirs), list(mine))
            hint = f"; they differ by a prefix: pass {hint}" if hint else \
                f"{suggest(next(iter(theirs), ''), list(mine))}; map names with --from/--to"
            raise SelectionError(f"copy: no tensor name is in both {source.source} and {ckpt.source}{hint}")
        return pairs, report
    mapping = wildcard_map(from_glob, to_glob, list(theirs))
    if not mapping:
        raise SelectionError(f"copy: --from '{from_glob}' matches no tensor in {source.source}"
                             f"{suggest(from_glob, list(theirs))}")
    fail("copy", unmatched(list(theirs), [from_glob], "--from"))  # a brace expansion that matches nothing
    missing = [t for t in mapping.values() if t not in mine]
    if missing:
        raise SelectionError(f"copy: no target tensor named {names_list([repr(m) for m in missing])} in"
                             f" {ckpt.source}{suggest(missing[0], list(mine))}; copy writes into existing tensors")
    pairs = {t: s for s, t in mapping.items() if targets is None or t in targets}
    return pairs, []


def prefix_mapping(sources: list[str], targets: list[str]) -> str | None:
    """"--from 'module.*' --to '*'" when stripping (or adding) one prefix makes source names target names."""
    wanted = set(targets)
    for prefix in _prefixes(sources):
        if any(n[len(prefix):] in wanted for n in sources if n.startswith(prefix)):
            return f"--from '{prefix}*' --to '*'"
    for prefix in _prefixes(targets):
        if any(prefix + n in wanted for n in sources):
            return f"--from '*' --to '{prefix}*'"
    return None


def _prefixes(names: list[str]) -> list[str]:
    """The dotted prefixes of the first name: 'a.', 'a.b.', ..."""
    first = names[0] if names else ""
    return [first[:i + 1] for i, c in enumerate(first) if c == "."]


def _plan_copy(ckpt: Checkpoint, source: Checkpoint, pairs: dict[str, str], *, skip_mismatched: bool,
               ties: TiePolicy, report: list[str], guard: bool) -> Plan:
    """Copy values from ``source`` (maybe ``ckpt`` itself) by ``pairs`` (target -> source name),
    cast to each target's dtype. Shapes must match unless ``skip_mismatched``."""
    theirs = source.tensors
    mismatched = {t: s for t, s in pairs.items() if ckpt[t].shape != theirs[s].shape}
    if mismatched and not skip_mismatched:
        shown = [f"'{s}' {list(theirs[s].shape)} -> '{t}' {list(ckpt[t].shape)}" for t, s in mismatched.items()]
        fail("copy", [f"shape mismatch for {line}" for line in shown[:-1]]
              + [f"shape mismatch for {shown[-1]}; pass --skip-mismatched to skip"])
    pairs = {t: s for t, s in pairs.items() if t not in mismatched}
    notes = list(report or [])
    if mismatched:
        notes.insert(0, f"skipped {len(mismatched)} with a shape mismatch: "
                        + names_list([f"{t} {list(ckpt[t].shape)} vs {list(theirs[s].shape)}"
                                       for t, s in mismatched.items()], 4))

    def change_for(unit: list[str], tensor: Tensor):
        # names of one view of one source storage (a tie there) give one value
        sources = sorted({view_key(theirs[pairs[n]]): pairs[n] for n in unit if n in pairs}.values())
        if len(sources) > 1:
            raise UnfitTensorError(f"is tied to {', '.join(unit[1:])}, and they would get different values",
                                   "pass --untie")
        origin = theirs[sources[0]]
        where = "" if source is ckpt else f" of {source.source}"
        if guard and may_misfit(origin.dtype, tensor.dtype):
            out = misfits(origin, tensor.dtype)
            if out:
                raise UnfitTensorError(
                    f"is {tensor.dtype} ({tensor.dtype.lowest} to {tensor.dtype.largest}), and {out:,} of the"
                    f" {origin.numel:,} {origin.dtype} value{'s' * (origin.numel != 1)} of '{sources[0]}'{where} do not"
                    " fit it (out of range or not whole)", "pass --allow-overflow to write torch's cast of them")
        if _same_quantization(origin, tensor):
            return Change(unit, f"copy from {sources[0]}{where} (its {origin.scheme.name} parts)", tensor.shape,
                          tensor.dtype.name, origin.dequantized, stored_as=lambda _: _parts_copied(origin))
        return Change(unit, f"copy from {sources[0]}{where}", tensor.shape, tensor.dtype.name,
                      copy_of(origin, tensor.dtype), guarded=guard and narrows(origin.dtype, tensor.dtype),
                      origin=origin)

    origin = "" if source is ckpt else f" from {source.source}"
    plan = value_plan("copy", f"copy{origin}: {names_list([f'{s}->{t}' for t, s in pairs.items()])}", ckpt,
                      list(pairs), ties, change_for)
    plan.notes = notes
    return plan


def _same_quantization(source: Tensor, target: Tensor) -> bool:
    """Whether ``source`` and ``target`` are quantized alike (scheme, shape, block): a copy takes the parts."""
    return type(source) is Quantized and type(target) is Quantized and source.scheme is target.scheme \
        and (source.shape, source.dtype) == (target.shape, target.dtype) \
        and source.scheme.layout_of(source.params) == target.scheme.layout_of(target.params)


def _parts_copied(tensor: Quantized) -> Quantized:
    """``tensor`` with a copy of each stored part (storage of its own, bytes as they are)."""
    parts = {role: Tensor(Storage(part.nbytes, loader=copy_of(part, part.dtype)), part.dtype, part.shape)
             for role, part in tensor.parts.items()}
    return Quantized(tensor.scheme, parts, tensor.shape, tensor.dtype, tensor.params)


def _plan_tie(ckpt: Checkpoint, source: str, targets: list[str], *, follow: bool, untie: bool) -> Plan:
    """Make ``targets`` share ``source``'s storage (and so its values)."""
    tensors = ckpt.tensors
    if source not in tensors:
        raise SelectionError(f"tie: no tensor named '{source}'{suggest(source, list(tensors))}")
    src = tensors[source]
    group_of = {n: g for g in ckpt.ties() for n in g}
    problems, plan = [], Plan("tie", f"tie to {source}: {names_list(targets)}")
    for target in targets:
        t = tensors[target]
        if target == source or target in group_of.get(source, []):
            continue
        if (t.shape, t.dtype) != (src.shape, src.dtype):
            problems.append(f"'{target}' {list(t.shape)} {t.dtype} cannot share the storage of '{source}'"
                            f" {list(src.shape)} {src.dtype}")
            continue
        others = [m for m in group_of.get(target, []) if m != target and m not in targets]
        if others and not (follow or untie):
            problems.append(f"'{target}' already shares its storage with {', '.join(others)}; pass --follow-ties"
                            " to tie them all, or --untie to move only it")
            continue
        plan.aliases.append((target, source))
        if follow:
            plan.aliases += [(m, source) for m in others if (m, source) not in plan.aliases]
    fail("tie", problems)
    differ = [t for t, _ in plan.aliases if src.storage.readable and tensors[t].storage.readable
              and not same_values(tensors[t], src)]
    if differ:
        plan.notes.append(f"'{source}' replaces the different values of {len(differ)} target"
                          f"{'s' if len(differ) > 1 else ''}: {names_list(differ)}")
    return plan


def _plan_untie(ckpt: Checkpoint, names: list[str]) -> Plan:
    """Give each selected tensor storage of its own (values unchanged)."""
    plan = Plan("untie", f"untie: {names_list(names)}")
    selected = set(names)
    for group in ckpt.ties():
        chosen = [n for n in group if n in selected]
        keep_first = len(chosen) == len(group)  # one of them may keep the shared storage
        for name in chosen[1:] if keep_first else chosen:
            tensor = ckpt[name]
            plan.changes.append(Change([name], "untie (own copy)", tensor.shape, tensor.dtype.name,
                                       copy_of(tensor, tensor.dtype), same_values=True))
    untied = set(n for c in plan.changes for n in c.names)
    if not plan.changes:
        plan.notes.append("none of the selected tensors shares its storage; nothing to untie")
    elif len(untied) < len(names):
        plan.notes.append(f"{len(names) - len(untied)} selected tensors were not tied (or keep the storage)")
    return plan


def _plan_rename(ckpt: Checkpoint, from_glob: str, to_glob: str) -> Plan:
    """Rename by wildcard mapping (``--from 'module.*' --to '*'``); collisions are errors."""
    names = list(ckpt.tensors)
    matched = wildcard_map(from_glob, to_glob, names)
    if not matched:
        raise SelectionError(f"rename: --from '{from_glob}' matches no tensor{suggest(from_glob, names)}")
    fail("rename", unmatched(names, [from_glob], "--from"))  # a brace expansion that matches nothing
    mapping = {old: new for old, new in matched.items() if old != new}
    final: dict[str, list[str]] = {}
    for name in ckpt.container:
        final.setdefault(mapping.get(name, name), []).append(name)
    clashes = [f"{' and '.join(repr(o) for o in olds)} would {'both' if len(olds) == 2 else 'all'} be named '{new}'"
               for new, olds in final.items() if len(olds) > 1]
    fail("rename", clashes)
    moves = renamed_modules(names, mapping)  # for the names config files give the modules (skip lists)
    plan = Plan("rename", f"rename {from_glob} -> {to_glob}: {plural(len(mapping), 'tensor')}", renames=mapping,
                moves=moves if moves.renamed else None)
    metadata = getattr(ckpt.container, "_metadata", None)
    if isinstance(metadata, dict):
        probe = "\0"
        for prefix in metadata:
            mapped = wildcard_map(from_glob, to_glob, [f"{prefix}.{probe}" if prefix else probe]).get(
                f"{prefix}.{probe}" if prefix else probe)
            if mapped is not None and mapped.endswith(probe):
                plan.module_renames[prefix] = mapped[:-1].rstrip(".")
    return plan


def _plan_drop(ckpt: Checkpoint, names: list[str]) -> Plan:
    """Remove ``names`` from the checkpoint."""
    plan = Plan("drop", f"drop: {names_list(names)}", drops=list(names))
    if len(names) == len(ckpt.tensors):
        plan.notes.append("every tensor is dropped")
    return plan
