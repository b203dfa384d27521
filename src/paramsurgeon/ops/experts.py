"""experts: prune the experts of mixture-of-experts blocks. Per-expert tensors
(``...experts.N.{w1,w2,w3,gate_proj,up_proj,down_proj}``) are renamed (bytes copied, not loaded),
fused ones (a leading expert dimension; gpt-oss's mxfp4 experts part by part) and the router's rows
(its bias, ``e_score_correction_bias``) sliced the same way; the config's expert count follows."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

from ..checkpoint import Checkpoint, Storage, Tensor
from ..checkpoint.quantized import Quantized
from ..checkpoint.blocks import find_blocks, parse_ranges
from ..checkpoint.moves import Moves
from ..declare import option
from ..errors import PlanError, SelectionError, UsageError
from .layers import Blockwise, described, within
from .plan import Change, Plan
from .spec import Operation, Sources

COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")  # the expert count, as configs name it
TOP_K_KEYS = ("num_experts_per_tok", "moe_topk", "top_k")  # how many experts the router picks
_PER_EXPERT = re.compile(r"^(.+)\.experts\.(\d+)\.(.+)$")
_FUSED = re.compile(r"^(.+)\.experts\.([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)$")
_ROUTER = re.compile(r"^(.+)\.(?:gate|router)\.(?:weight|bias|e_score_correction_bias)$")


@dataclass
class MoE:
    """One mixture-of-experts block: its per-expert names (expert -> names), fused tensors and router
    tensors (each with a leading expert dimension)."""

    prefix: str
    per_expert: dict[int, list[str]] = field(default_factory=dict)
    fused: list[str] = field(default_factory=list)
    router: list[str] = field(default_factory=list)

    def count(self, tensors: dict[str, Tensor]) -> int:
        """The number of experts; every fused and router tensor must agree."""
        counts = {f"{len(self.per_expert)} numbered experts": len(self.per_expert)} if self.per_expert else {}
        counts.update({f"'{n}' {list(tensors[n].shape)}": tensors[n].shape[0] if tensors[n].shape else 0
                       for n in self.fused + self.router})
        if len(set(counts.values())) > 1:
            raise PlanError(f"experts: {self.prefix}: the expert counts disagree ({', '.join(counts)})")
        return next(iter(counts.values()))


@dataclass(kw_only=True)
class Experts(Blockwise, Operation):
    """Prune the experts of mixture-of-experts blocks; the kept ones are renumbered in order.

    Per-expert tensors are renamed, fused ones (a leading expert dimension) and the router's rows
    (its bias and e_score_correction_bias) sliced; config.json's expert count follows. Keeping
    fewer experts than the router's top-k is an error.
    """

    name = "experts"
    example = "paramsurgeon experts mixtral/ --keep 0..5 -o mixtral-6e/"

    keep: str | None = option(None, "--keep", metavar="LIST", help="Keep these experts (0..5,7), renumbered in"
                              " order.")
    drop: str | None = option(None, "--drop", metavar="LIST", help="Drop these experts.")
    layer: str | None = option(None, "--layer", metavar="RANGES", help="Only in these blocks (default: every"
                               " mixture-of-experts block).")

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.keep is None) == (self.drop is None):
            raise UsageError("experts: pass one of --keep LIST or --drop LIST")

    def plan(self, ckpt: Checkpoint, sources: Sources) -> Plan:
        tensors = ckpt.tensors
        blocks = moe_blocks(tensors)
        if not blocks:
            raise SelectionError("experts: no mixture-of-experts block (no '...experts.N.' tensor, nor fused"
                                 " '...experts.<name>' tensors with a leading expert dimension)")
        section = described(ckpt.config, blocks[0].prefix)  # a multimodal model's text_config
        chosen = self.chosen(ckpt, blocks, section)
        plan = Plan("experts", f"experts: {'keep ' + self.keep if self.keep is not None else 'drop ' + self.drop}")
        renames: dict[str, str] = {}
        gone: set[str] = set()
        counts = set()
        moves = Moves()  # where each expert went, for the names config files give them
        for moe in chosen:
            count = moe.count(tensors)
            flag, text = ("--keep", self.keep) if self.keep is not None else ("--drop", self.drop)
            picked = sorted(i for r in parse_ranges(text, count, f"experts: {flag}", f"{moe.prefix} has {{}} experts") for i in r)
            kept = picked if self.keep is not None else [i for i in range(count) if i not in picked]
            self.check_top_k(section, len(kept), moe.prefix)
            counts.add((count, len(kept)))
            moves.renamed.update({f"{moe.prefix}.experts.{i}": [] for i in range(count)})
            for new, old in enumerate(kept):
                moves.renamed[f"{moe.prefix}.experts.{old}"].append(f"{moe.prefix}.experts.{new}")
                renames.update({n: moves.follow(n)[0] for n in moe.per_expert.get(old, [])})
            gone.update(n for i, names in moe.per_expert.items() if i not in kept for n in names)
            plan.changes += [_rows(n, tensors[n], kept) for n in moe.fused + moe.router]
        plan.rebuilt = [(renames.get(n, n), n, t) for n, t in tensors.items() if n not in gone]
        plan.drops = [n for n in tensors if n in gone]
        plan.config = within(ckpt.config, section, expert_config(section, counts))
        plan.moves = moves
        return plan

    def chosen(self, ckpt: Checkpoint, blocks: list[MoE], section: dict) -> list[MoE]:
        """The blocks --layer selects (all without it); ``section`` is the config that counts their experts."""
        if self.layer is None:
            return blocks
        layers = find_blocks(list(ckpt.tensors), self.prefix, "experts: ")
        wanted = {i for r in parse_ranges(self.layer, layers.count, "experts: --layer") for i in r}
        of = {moe.prefix: layers.index(moe.prefix + ".") for moe in blocks}
        chosen = [moe for moe in blocks if of[moe.prefix] in wanted]
        if not chosen:
            raise SelectionError(f"experts: --layer {self.layer} selects no block with experts (those with experts:"
                                 f" {', '.join(str(of[m.prefix]) for m in blocks)})")
        uniform = any(isinstance(section.get(k), int) for k in COUNT_KEYS)
        if uniform and len(chosen) < len(blocks):
            raise UsageError(f"experts: --layer {self.layer} leaves other blocks with their experts, but config.json"
                             " gives one expert count for every block; select every block with experts (or leave"
                             " out --layer)")
        return chosen

    @staticmethod
    def check_top_k(config: dict | None, kept: int, where: str) -> None:
        key = next((k for k in TOP_K_KEYS if isinstance((config or {}).get(k), int)), None)
        if key is not None and kept < config[key]:
            raise PlanError(f"experts: {where} would keep {kept} expert{'s' * (kept != 1)}, fewer than the router"
                            f" picks ({key} {config[key]} in config.json); keep at least {config[key]}")
        groups = (config or {}).get("n_group")
        if isinstance(groups, int) and groups > 1 and kept % groups:
            raise PlanError(f"experts: {where} would keep {kept} experts, which the router's n_group {groups}"
                            f" groups cannot share evenly; keep a multiple of {groups}")


def moe_blocks(tensors: dict[str, Tensor]) -> list[MoE]:
    """The mixture-of-experts blocks among ``tensors``, in file order."""
    found: dict[str, MoE] = {}
    for name in tensors:
        per = _PER_EXPERT.match(name)
        if per:
            found.setdefault(per.group(1), MoE(per.group(1))).per_expert.setdefault(int(per.group(2)), []).append(name)
            continue
        fused = _FUSED.match(name)
        if fused and tensors[name].shape:
            found.setdefault(fused.group(1), MoE(fused.group(1))).fused.append(name)
    for name in tensors:
        router = _ROUTER.match(name)
        if router and router.group(1) in found:
            found[router.group(1)].router.append(name)
    for moe in found.values():
        missing = [i for i in range(len(moe.per_expert)) if i not in moe.per_expert]
        if missing:
            raise SelectionError(f"experts: {moe.prefix}.experts has no expert {missing[0]}; experts must be"
                                 " numbered 0..E-1")
    return list(found.values())


def _rows(name: str, tensor: Tensor, kept: list[int]) -> Change:
    """``tensor`` with the rows (experts) ``kept`` of its first dimension, copied from its bytes; a quantized
    one whose every part leads with the experts (gpt-oss's mxfp4) keeps its scheme, each part sliced."""
    shape = (len(kept), *tensor.shape[1:])
    change = Change([name], f"keep experts {_short(kept)}", shape, tensor.dtype.name, _kept(tensor, kept))
    if type(tensor) is Quantized and tensor.scheme.expert_major:
        parts = {role: Tensor(Storage(part.nbytes // part.shape[0] * len(kept), loader=_kept(part, kept)), part.dtype,
                              (len(kept), *part.shape[1:])) for role, part in tensor.parts.items()}
        sliced = Quantized(tensor.scheme, parts, shape, tensor.dtype, tensor.params)
        change.compute, change.stored_as = sliced.dequantized, lambda plain: sliced
    return change


def _kept(tensor: Tensor, kept: list[int]) -> Callable:
    """What computes the rows ``kept`` of ``tensor``'s first dimension: its bytes copied (torch's indexing
    when they are not contiguous)."""
    per = tensor.nbytes // tensor.shape[0]

    def compute():
        data = tensor.contiguous_bytes()
        if data is None:
            from ..checkpoint.values import to_torch

            return to_torch(tensor)[kept].contiguous()
        out = bytearray(per * len(kept))
        for j, i in enumerate(kept):
            out[j * per:(j + 1) * per] = data[i * per:(i + 1) * per]
        return out

    return compute


def _short(indices: list[int]) -> str:
    """'0..3,6'."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return ",".join(f"{r[0]}..{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


def expert_config(config: dict | None, counts: set[tuple[int, int]]) -> dict:
    """The config's expert count, when every pruned block went from the count it gives to one new count."""
    if not config or len(counts) != 1:
        return {}
    before, after = next(iter(counts))
    return {k: after for k in COUNT_KEYS if config.get(k) == before and not isinstance(config.get(k), bool)}
