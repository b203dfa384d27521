"""Operations on the repeated block of a model (its layers): drop, keep, duplicate and move
blocks (``layers``), and stack block ranges of several checkpoints (``stack``). The result is
renumbered 0..L-1; a renumbered tensor is renamed (its bytes copied, not loaded), a duplicated
one copied; the config's layer count and per-layer lists follow."""

from __future__ import annotations

from dataclasses import dataclass

from ..checkpoint import Checkpoint
from ..checkpoint.blocks import Blocks, find_blocks, parse_ranges
from ..checkpoint.moves import Moves
from ..declare import REQUIRED, argument, option
from ..errors import PlanError, UsageError
from ..sizes import plural
from .plan import Change, Plan, names_list
from .spec import Operation, Sources

COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "depth")  # the layer count, as configs name it
DECODER_KEYS = ("num_decoder_layers", "decoder_layers")  # an encoder-decoder's decoder count: T5, BART, ProphetNet
ENCODER_KEYS = ("encoder_layers", "num_encoder_layers")  # its encoder count, beside num_layers/num_hidden_layers
OTHER_TOWERS = {"vision_config": ("vision", "visual"), "audio_config": ("audio",)}  # by words of a block prefix
INDEX_LISTS = ("mlp_only_layers", "moe_layers")  # lists of layer indices (not one entry per layer): Qwen-MoE, Llama 4
# output projections of a block's branches: Llama, GPT-2, OPT, Mixtral, T5 (o, wo), Falcon and GPT-NeoX
# (dense_4h_to_h), GPT-J (fc_out); and a 'dense' right under the attention (Falcon, GPT-NeoX, Phi)
OUTPUTS = ("o_proj", "out_proj", "c_proj", "down_proj", "fc2", "w2", "o", "wo", "dense_4h_to_h", "fc_out")
ATTENTIONS = ("attention", "self_attention", "self_attn", "attn")
# blocks that normalise after the residual sum (x + 0 is then normalised again): config flags, model types
POST_NORM = {"do_layer_norm_before": False, "normalize_before": False, "apply_residual_connection_post_layernorm": True}
POST_NORM_TYPES = ("bart", "marian", "blenderbot-small", "plbart", "fsmt", "bert", "roberta", "electra")


@dataclass(kw_only=True)
class Blockwise:
    """Where the blocks are."""

    prefix: str | None = option(None, "--prefix", metavar="P", help="The numbered block list (e.g. net.stages),"
                                " when it is not found from the names (a list named layers, layer or blocks,"
                                " transformer.h, T5's encoder.block) or when there are several (encoder and"
                                " decoder, language model and vision tower).")


@dataclass(kw_only=True)
class Layers(Blockwise, Operation):
    """Drop, keep, duplicate or move blocks (layers); the result is renumbered 0..L-1.

    Ranges are 20..23 (inclusive), 5, comma-separated. --duplicate puts the copies right after
    their range (or after block --after); with --identity their output projections are zeroed, so
    the network computes what it did (LLaMA-Pro). A directory's config.json gets the new layer
    count and its per-layer lists reordered.
    """

    name = "layers"
    example = "paramsurgeon layers llama/ --drop 28..31 -o llama-28/"

    drop: str | None = option(None, "--drop", metavar="RANGES", help="Remove these blocks.")
    keep: str | None = option(None, "--keep", metavar="RANGES", help="Keep these blocks only.")
    duplicate: str | None = option(None, "--duplicate", metavar="RANGES", help="Insert copies of these blocks.")
    after: int | None = option(None, "--after", metavar="I", minimum=0, help="With --duplicate: insert every copy"
                               " after block I (default: each range's copies right after it).")
    identity: bool = option(False, "--identity", help="With --duplicate: zero the output projections of the copies"
                            " (attention o_proj/c_proj/out_proj, MLP down_proj/c_proj/fc2), so the output does not"
                            " change.")
    move: str | None = option(None, "--move", metavar="RANGE", help="Move this range of blocks ...")
    to: int | None = option(None, "--to", metavar="I", minimum=0, help="... so that its first block gets index I.")

    def __post_init__(self) -> None:
        super().__post_init__()
        given = [f for f in ("drop", "keep", "duplicate", "move") if getattr(self, f) is not None]
        if len(given) != 1:
            raise UsageError("layers: pass one of --drop, --keep, --duplicate or --move" +
                             (f" (not {' and '.join('--' + g for g in given)})" if given else ""))
        if (self.after is not None or self.identity) and self.duplicate is None:
            raise UsageError(f"layers: {'--after' if self.after is not None else '--identity'} goes with --duplicate")
        if (self.move is None) != (self.to is None):
            raise UsageError("layers: pass --move RANGE and --to I together")

    def plan(self, ckpt: Checkpoint, sources: Sources) -> Plan:
        blocks = find_blocks(list(ckpt.tensors), self.prefix, "layers: ")
        _agrees_with_config(ckpt.config, blocks)
        order, copies = self.order(blocks.count)
        plan = renumbered("layers", ckpt, blocks, [(ckpt, blocks, i) for i in order], f"layers: {self.described()}")
        if self.identity:
            _normalised_before(described(ckpt.config, blocks.prefix))
            plan.changes = identity_changes(blocks, plan, copies)
        plan.config = layer_config(ckpt.config, blocks.prefix, blocks.count, order)
        return plan

    def order(self, count: int) -> tuple[list[int], set[int]]:
        """The source block of each block of the result, and the positions that are inserted copies."""
        flag, text = next((f"--{f}", getattr(self, f)) for f in ("drop", "keep", "duplicate", "move")
                          if getattr(self, f) is not None)
        ranges = parse_ranges(text, count, f"layers: {flag}")
        chosen = [i for r in ranges for i in r]
        if self.drop is not None or self.keep is not None:
            kept = [i for i in range(count) if (i in chosen) == (self.keep is not None)]
            if not kept:
                raise UsageError(f"layers: {flag} {text} leaves no block; the model has {count}")
            return kept, set()
        if self.move is not None:
            if len(ranges) > 1:
                raise UsageError(f"layers: --move {text}: move one range at a time")
            rest = [i for i in range(count) if i not in chosen]
            if self.to > len(rest):
                raise UsageError(f"layers: --to {self.to} is out of range; {len(chosen)} moved blocks start at 0 to"
                                 f" {len(rest)}")
            return rest[:self.to] + chosen + rest[self.to:], set()
        if self.after is not None and self.after >= count:
            raise UsageError(f"layers: --after {self.after} is out of range; the model has {count} blocks"
                             f" (0..{count - 1})")
        after = {self.after: chosen} if self.after is not None else {r[-1]: r for r in ranges}
        order, copies = [], set()
        for i in range(count):
            order.append(i)
            for copy in after.get(i, []):
                copies.add(len(order))
                order.append(copy)
        return order, copies

    def described(self) -> str:
        if self.move is not None:
            return f"move {self.move} to {self.to}"
        what = next(f"{f} {getattr(self, f)}" for f in ("drop", "keep", "duplicate") if getattr(self, f) is not None)
        return what + (f" after {self.after}" if self.after is not None else "") + (" (identity)" * self.identity)


@dataclass
class Stacked(Plan):
    """A stack's plan: its summary names the blocks taken from each source."""

    taken: str = ""

    def summary(self) -> str:
        return self.taken


def renumbered(command: str, ckpt: Checkpoint, blocks: Blocks, order: list[tuple[Checkpoint, Blocks, int]],
               description: str) -> Plan:
    """A plan whose tensors are ``ckpt``'s with its blocks replaced by ``order`` (each a block of a
    checkpoint), renumbered 0..L-1 where the first block stood."""
    tensors = ckpt.tensors
    first = blocks.members[0][0]
    rebuilt = []
    for name, tensor in tensors.items():
        if name == first:
            for index, (source, its, i) in enumerate(order):
                held = source.tensors
                where = "" if source.source == ckpt.source else f"{source.source}:"
                rebuilt += [(blocks.name(index, its.local(n)), where + n, held[n]) for n in its.members[i]]
        if blocks.index(name) is None:
            rebuilt.append((name, name, tensor))
    used = {id(tensor) for _, _, tensor in rebuilt}
    return Plan(command, description, rebuilt=rebuilt, drops=[n for n, t in tensors.items() if id(t) not in used],
                moves=_moves(ckpt, blocks, order))


def _moves(ckpt: Checkpoint, blocks: Blocks, order: list[tuple[Checkpoint, Blocks, int]]) -> Moves:
    """Where each block of ``ckpt`` went (its new indices, none when dropped), and which blocks of the
    result came from other checkpoints."""
    moves = Moves({f"{blocks.prefix}.{i}": [] for i in range(blocks.count)})
    for index, (source, its, i) in enumerate(order):
        new = f"{blocks.prefix}.{index}"
        if source.source == ckpt.source:
            moves.renamed[f"{blocks.prefix}.{i}"].append(new)
        else:
            moves.taken[new] = (source.path, f"{its.prefix}.{i}")
    return moves


def identity_changes(blocks: Blocks, plan: Plan, copies: set[int]) -> list[Change]:
    """Zeros for the output projections of the blocks at ``copies`` (positions in the result)."""
    changes = []
    for position in sorted(copies):
        head = f"{blocks.prefix}.{position}."
        names = [(name, tensor) for name, _, tensor in plan.rebuilt if name.startswith(head)]
        zeroed = [(n, t) for n, t in names if _output(blocks.local(n))]
        if not zeroed:
            raise PlanError(f"layers: --identity: block {position} has no output projection to zero (none of"
                            f" {', '.join(OUTPUTS)} in {names_list([blocks.local(n) for n, _ in names], 4)})")
        changes += [Change([n], "zero (identity copy)", t.shape, t.dtype.name, _zeros(t.nbytes)) for n, t in zeroed]
    return changes


def _output(local: str) -> bool:
    *parents, leaf = local.split(".")
    if leaf not in ("weight", "bias"):
        return leaf.removesuffix("_bias") in OUTPUTS  # fused experts: experts.down_proj, gpt-oss's down_proj_bias
    return bool(parents) and (parents[-1] in OUTPUTS or parents[-2:-1] in ([a] for a in ATTENTIONS)
                              and parents[-1] == "dense")


def _normalised_before(config: dict) -> None:
    """Refuse --identity for blocks that normalise after the residual sum (BERT, BART, OPT-350m): zeroed
    output projections leave x, which the block's norm still changes."""
    said = next((f"{k} {str(v).lower()}" for k, v in POST_NORM.items() if config.get(k) is v), None)
    said = said or (f"model_type {config['model_type']}" if config.get("model_type") in POST_NORM_TYPES else None)
    if said:
        raise PlanError(f"layers: --identity: config.json says the blocks normalise after the residual sum ({said}),"
                        " so a copy with zeroed output projections still changes the output; duplicate without"
                        " --identity")


def _zeros(nbytes: int):
    return lambda: bytearray(nbytes)


def _agrees_with_config(config: dict | None, blocks) -> None:
    """Refuse a model whose config counts fewer layers than it has numbered blocks (DeepSeek-V3 numbers
    its multi-token-prediction layer after the model's layers): renumbering would make it one of them."""
    section = described(config, blocks.prefix)
    keys = _counted(section, blocks.prefix)
    counted = {key: value for key, value in section.items() if key in keys and isinstance(value, int)}
    for key, value in counted.items():
        if value != blocks.count:
            raise UsageError(f"layers: the checkpoint has {blocks.count} blocks ({blocks.prefix}.0 to"
                             f" {blocks.prefix}.{blocks.count - 1}) but config.json says {key} {value} (a"
                             " multi-token-prediction layer numbered after the model's, as DeepSeek-V3's?);"
                             " renumbering would make the extra blocks model layers: drop them first"
                             f" (paramsurgeon drop -p '{blocks.prefix}.{value}.*')")


def layer_config(config: dict | None, prefix: str, count: int, order: list[int]) -> dict:
    """The keys of ``config`` that change when its ``count`` blocks under ``prefix`` become ``order`` (a
    source index each), in the part of the config that describes them (a multimodal model's text_config
    or vision_config, an encoder-decoder's encoder or decoder counts): the layer count, lists with an
    entry per layer, lists of layer indices, and which layers are dense in a mixture-of-experts model."""
    section = described(config, prefix)
    if not section:
        return {}
    keys = _counted(section, prefix)
    changes: dict = {}
    for key, value in section.items():
        if key in keys and value == count:
            changes[key] = len(order)
        elif isinstance(value, list) and key in INDEX_LISTS:
            changes[key] = [new for new, old in enumerate(order) if old in value]
        elif isinstance(value, list) and len(value) == count and count > 1 and key != "architectures":
            changes[key] = [value[i] for i in order]
    if keys == DECODER_KEYS[:1] and "num_decoder_layers" not in section:  # T5's defaults to num_layers
        changes["num_decoder_layers"] = len(order)
    elif "num_layers" in changes and keys != COUNT_KEYS and "num_decoder_layers" not in section:
        changes["num_decoder_layers"] = count  # the decoder keeps its count, which num_layers gave
    changes.update(_dense_layers(section, order))
    return within(config, section, changes)


def described(config: dict | None, prefix: str) -> dict:
    """The part of ``config`` that describes the blocks under ``prefix``: a multimodal model's
    vision_config (or audio_config) for a prefix naming that tower, its text_config for any other,
    else the config itself."""
    config = config or {}
    words = prefix.lower().split(".")
    for key, named in OTHER_TOWERS.items():
        if isinstance(config.get(key), dict) and any(w in word for w in named for word in words):
            return config[key]
    return config["text_config"] if isinstance(config.get("text_config"), dict) else config


def within(config: dict | None, section: dict, changes: dict) -> dict:
    """``changes`` to ``section`` (a part of ``config`` that described() gave) as changes to ``config``,
    without those that change nothing."""
    changes = {k: v for k, v in changes.items() if v != section.get(k)}
    tower = next((key for key, value in (config or {}).items() if value is section), None)
    return {tower: {**section, **changes}} if tower and changes else changes


def _counted(section: dict, prefix: str) -> tuple[str, ...]:
    """The keys of ``section`` that count the blocks under ``prefix``: an encoder-decoder model's decoder
    count for its decoder (T5's num_decoder_layers, BART's decoder_layers), its encoder count (with
    num_hidden_layers, which mirrors it) for its encoder, else the layer count."""
    if not (section.get("is_encoder_decoder") or any(k in section for k in DECODER_KEYS + ENCODER_KEYS)):
        return COUNT_KEYS
    if "decoder" in prefix.split("."):
        return tuple(k for k in DECODER_KEYS if k in section) or DECODER_KEYS[:1]  # T5's may be left out
    return COUNT_KEYS + ENCODER_KEYS


def _dense_layers(config: dict, order: list[int]) -> dict:
    """DeepSeek's ``first_k_dense_replace`` (the first k layers are dense) and Qwen-MoE's
    ``decoder_sparse_step`` (every step-th layer has experts, ``mlp_only_layers`` aside) for the
    layers of ``order``; an error when the new order cannot be said so."""
    first = config.get("first_k_dense_replace")
    if isinstance(first, int) and not isinstance(first, bool) and first > 0:
        dense = [old < first for old in order]
        now = dense.index(False) if False in dense else len(dense)
        if any(dense[now:]):
            raise PlanError(f"layers: config.json's first_k_dense_replace {first} says the dense layers come first,"
                            f" and the new order puts dense layer {order[now + dense[now:].index(True)]} after one with"
                            " experts")
        return {"first_k_dense_replace": now}
    step = config.get("decoder_sparse_step")
    if isinstance(step, int) and not isinstance(step, bool) and step > 1:
        only = config.get("mlp_only_layers") or []
        return {"decoder_sparse_step": 1,
                "mlp_only_layers": [new for new, old in enumerate(order) if old in only or (old + 1) % step]}
    return {}


@dataclass(kw_only=True)
class Stack(Blockwise, Operation):
    """Build one model from block ranges of several checkpoints, in order (mergekit's passthrough).

    Tensors outside the blocks (embeddings, final norm, head) and config.json come from the first
    source, or from --rest; the blocks must agree in names, shapes and dtypes.
    """

    name = "stack"
    example = "paramsurgeon stack a/:0..23 b/:8..31 -o stacked/"

    slices: list[str] = argument(REQUIRED, metavar="SRC:RANGES...", path=True,
                                 help="Checkpoints and their block ranges, in order.")
    rest: str | None = option(None, "--rest", metavar="SRC", path=True, help="The checkpoint the tensors outside"
                              " the blocks and the config come from (default: the first source).")

    def __post_init__(self) -> None:
        super().__post_init__()
        for text in self.slices:
            path, colon, ranges = text.rpartition(":")
            if not colon or not path or not ranges:
                raise UsageError(f"stack: '{text}' is not SRC:RANGES (e.g. model/:0..23)")

    @property
    def written(self) -> str:
        """The checkpoint written: --rest, else the first source."""
        return self.rest if self.rest is not None else self.slices[0].rpartition(":")[0]

    def plan(self, ckpt: Checkpoint, sources: Sources) -> Plan:
        blocks = find_blocks(list(ckpt.tensors), self.prefix, f"stack: {ckpt.source}: ")
        order: list[tuple[Checkpoint, Blocks, int]] = []
        for text in self.slices:
            path, _, ranges = text.rpartition(":")
            source = sources.checkpoint(path)
            its = find_blocks(list(source.tensors), self.prefix, f"stack: {source.source}: ")
            order += [(source, its, i) for r in parse_ranges(ranges, its.count, f"stack: {path}:") for i in r]
        _agree([(ckpt, blocks, 0)] + order)  # the blocks taken, and those of the model they go into
        plan = Stacked(**vars(renumbered("stack", ckpt, blocks, order, f"stack: {', '.join(self.slices)}")))
        plan.taken = f"{plural(len(order), 'block')} ({', '.join(self.slices)})"
        plan.config = layer_config(ckpt.config, blocks.prefix, blocks.count, [i for _, _, i in order])
        return plan


def _agree(order: list[tuple[Checkpoint, Blocks, int]]) -> None:
    """Every block has the names, shapes and dtypes of the first; else an error naming the first difference."""
    source, blocks, i = order[0]
    model = {blocks.local(n): source.tensors[n] for n in blocks.members[i]}
    for other, its, j in order[1:]:
        block = {its.local(n): other.tensors[n] for n in its.members[j]}
        where = f"block {j} of {other.source} and block {i} of {source.source}"
        extra = [n for n in block if n not in model] + [n for n in model if n not in block]
        if extra:
            raise PlanError(f"stack: {where} differ: only one has '{extra[0]}'")
        for local, tensor in block.items():
            if (tensor.shape, tensor.dtype) != (model[local].shape, model[local].dtype):
                raise PlanError(f"stack: {where} differ: '{local}' is {list(tensor.shape)} {tensor.dtype} in one,"
                                f" {list(model[local].shape)} {model[local].dtype} in the other")
