"""extract-lora: the delta of each selected weight, its truncated SVD as a LoRA pair, and the tensors and
config of the adapter PEFT's ``PeftModel.from_pretrained`` loads (formats/peft.py writes its directory).

A weight's delta ``TUNED - BASE`` (float32) becomes ``B = U_r sqrt(S_r)``, ``A = sqrt(S_r) Vh_r``
(B divided by the scaling ``alpha / r`` when ``--alpha`` is not the rank), laid out as PEFT lays out
the module: nn.Linear (out, in); GPT-2 Conv1D (the delta is transposed), each 2-D weight's layout
told by the checkpoint (checkpoint/layouts.py; ``--fan-in-fan-out`` decides one it does not tell);
Embedding (``lora_embedding_A`` (r, num), ``lora_embedding_B`` (dim, r): the delta transposed); a
convolution's kernel goes to A, B is (out, r, 1, ...). A tensor whose delta is zero is skipped. A
changed 1-D tensor is saved whole: a targeted module's bias as ``<module>.base_layer.bias``, any
other module's tensors (a norm) as ``modules_to_save``, every tensor of the module and its submodules
(BERT's ``cls.predictions``, whose ``bias`` sits beside ``transform`` and ``decoder``), as PEFT loads them.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass, field

from ...checkpoint import Checkpoint, Storage, Tensor
from ...checkpoint.hfties import written
from ...checkpoint.kinds import infer_kinds, split_name
from ...checkpoint.contents import same_values
from ...checkpoint.layouts import weight_layouts
from ...checkpoint.tensor import view_key
from ...dtypes import DType
from ...errors import PlanError
from ..plan import fail, names_list
from ..values import cast_target, copy_of
from .adapter import PREFIX


@dataclass
class Module:
    """One module to extract: its weight's name, layout, rank, and once computed, A, B and the error."""

    name: str
    weight: str
    layout: str
    rank: int
    shape: tuple
    dtype: DType  # of A and B as written
    a: object = None
    b: object = None
    error: float | None = None


@dataclass
class Extraction:
    """What extract-lora writes: the modules, the whole tensors (adapter key -> tensor), the config."""

    modules: list[Module]
    whole: dict[str, Tensor]
    saved: list[str]  # modules_to_save
    config: dict
    skipped: list[str] = field(default_factory=list)  # selected tensors that did not change
    notes: list[str] = field(default_factory=list)

    @property
    def rows(self) -> list[dict]:
        """One row per module (module, weight, shape, layout, rank, error) and per whole tensor."""
        rows = [{"module": m.name, "tensor": m.weight, "shape": list(m.shape), "layout": m.layout, "rank": m.rank,
                 "error": m.error} for m in self.modules]
        rows += [{"module": None, "tensor": key.removeprefix(PREFIX), "shape": list(t.shape), "layout": "whole",
                  "rank": None, "error": 0.0} for key, t in self.whole.items()]
        return rows


def plan_extraction(op, base: Checkpoint, tuned: Checkpoint, compute: bool = True) -> Extraction:
    """Check the inputs, find what changed and, with ``compute``, take each delta's SVD."""
    theirs = tuned.tensors
    universe = {**base.tensors, **{n: t for n, t in theirs.items() if n not in base.tensors}}
    names, warnings = op.choose(universe, base.key)
    problems = []
    for ours, source, others, where in ((base.tensors, base.source, theirs, tuned.source),
                                        (theirs, tuned.source, base.tensors, base.source)):
        missing = [n for n in names if n in ours and n not in others]
        if missing:
            problems.append(f"{len(missing)} tensor{'s' if len(missing) > 1 else ''} of {source} missing from"
                            f" {where}: {names_list(missing)}")
    names = [n for n in names if n in base.tensors and n in theirs]
    shapes = [f"'{n}' is {list(base[n].shape)} in {base.source} but {list(theirs[n].shape)} in {tuned.source}"
              for n in names if n in theirs and tuple(theirs[n].shape) != tuple(base[n].shape)]
    problems += shapes
    fail("extract-lora", problems)
    kinds = infer_kinds(base.tensors)
    told = weight_layouts(base.tensors)
    target = cast_target(op.dtype) if op.dtype is not None else None
    changed = [n for n in names if base[n].dtype.floating and not same_values(base[n], theirs[n])]
    adapted, tied = _once_per_tie(changed, base, tuned)
    modules, ones, others, untold = [], [], [], []
    for name in adapted:
        tensor = base[name]
        module, leaf = split_name(name)
        if leaf == "weight" and 2 <= len(tensor.shape) <= 5:
            layout = _layout(tensor, kinds[name].layer, told.get(name), op.fan_in_fan_out)
            if layout in ("linear", "transposed") and told.get(name) is None:
                untold.append(name)
            dims = (tensor.shape[0], tensor.numel // tensor.shape[0])
            modules.append(Module(module, name, layout, min(op.rank, *dims), tuple(tensor.shape),
                                  target or tensor.dtype))
        elif len(tensor.shape) <= 1:
            ones.append(name)
        else:
            others.append(name)
    if not changed:
        raise PlanError(f"extract-lora: {base.source} and {tuned.source} hold the same values in all {len(names)}"
                        " selected tensors; there is no fine-tune to extract (is TUNED the fine-tuned checkpoint?)")
    if others:
        one = len(others) == 1
        raise PlanError(f"extract-lora: {names_list(others)} changed but {'is' if one else 'are'} not a module's"
                        f" .weight, which LoRA adapts; leave {'it' if one else 'them'} out with -x")
    saved = _saved_modules(ones, {m.name for m in modules})
    modules = [m for m in modules if not _within(m.weight, saved)]
    targets = {m.name for m in modules}
    whole: dict[str, Tensor] = OrderedDict()
    for name in ones:
        module, leaf = split_name(name)
        if module in targets:
            whole[f"{PREFIX}{module}.base_layer.{leaf}"] = _cast(theirs[name], target or base[name].dtype)
    for name, tensor in theirs.items():
        if _within(name, saved):
            whole[f"{PREFIX}{name}"] = _cast(tensor, target or base[name].dtype)
    extraction = Extraction(modules, whole, saved, _config(op, modules, saved, ones, targets),
                            [n for n in names if n not in set(changed)], [f"warning: {w}" for w in warnings])
    extraction.notes += tied + _layout_notes(untold, op.fan_in_fan_out)
    if compute:
        for module in modules:
            _extract(module, base[module.weight], theirs[module.weight], extraction.config["lora_alpha"])
    return extraction


def _saved_modules(ones: list[str], targets: set[str]) -> list[str]:
    """The modules_to_save: the module of each changed 1-D tensor that is no target's bias, outermost
    only. PEFT copies such a module whole, submodules too, and loads every tensor of the copy's
    state_dict from the adapter: one inside another is saved with it, and a weight inside one is
    saved whole there, so it is not adapted too."""
    found = list(OrderedDict.fromkeys(m for m in (split_name(n)[0] for n in ones) if m not in targets))
    return [m for m in found if not any(m.startswith(f"{other}.") for other in found)]


def _within(name: str, modules: list[str]) -> bool:
    """Whether tensor ``name`` is one of ``modules``' (directly or in a submodule)."""
    return any(split_name(name)[0] == m or name.startswith(f"{m}.") for m in modules)


def _once_per_tie(changed: list[str], base: Checkpoint, tuned: Checkpoint) -> tuple[list[str], list[str]]:
    """One name per weight that names share in ``base`` (tied, as GPT-2's lm_head and wte):
    merge_and_unload adds every module's update to the shared weight, so one per name would add it
    twice. The name save_pretrained writes (the input embedding, where PEFT puts a tied pair's
    adapter) is kept; notes name the others. Names that ``tuned`` no longer holds alike are an
    error: a tied base cannot take two values."""
    by_weight: dict[tuple, list[str]] = {}
    for name in changed:
        by_weight.setdefault(view_key(base[name]), []).append(name)
    left, notes, problems = set(), [], []
    for names in (g for g in by_weight.values() if len(g) > 1):
        kept = written(names)
        if not all(same_values(tuned[kept], tuned[n]) for n in names):
            problems.append(f"{' and '.join(repr(n) for n in names)} are tied in {base.source} but differ in"
                            f" {tuned.source}")
            continue
        gone = [n for n in names if n != kept]
        left.update(gone)
        notes.append(f"note: {names_list(gone)} {'is' if len(gone) == 1 else 'are'} tied to {kept} in {base.source}:"
                     f" the adapter holds the change of {kept} alone, as one weight that merge_and_unload would"
                     f" change once per name (unmerged, PEFT applies it to {kept} only)")
    if problems:
        raise PlanError(f"extract-lora: {'; '.join(problems)}: a LoRA merged into the tied weight changes every name"
                        " alike; untie them in BASE first (paramsurgeon untie) or leave one out with -x")
    return [n for n in changed if n not in left], notes


def _layout(tensor: Tensor, kind: str, told: str | None, fan_in_fan_out: bool) -> str:
    """The layout PEFT gives ``tensor``'s module; ``fan_in_fan_out`` decides a 2-D weight the
    checkpoint does not tell (see checkpoint/layouts.py)."""
    if len(tensor.shape) > 2:
        return "conv"
    if kind == "embedding":
        return "embedding"
    return told or ("transposed" if fan_in_fan_out else "linear")


def _layout_notes(untold: list[str], fan_in_fan_out: bool) -> list[str]:
    """What was assumed for the weights whose layout the checkpoint does not tell, or that the
    --fan-in-fan-out given was not needed."""
    if untold:
        assumed = "GPT-2 Conv1D's (in, out) (--fan-in-fan-out)" if fan_in_fan_out else \
            "nn.Linear's (out, in); pass --fan-in-fan-out if they are GPT-2 Conv1D's (in, out)"
        return [f"note: the checkpoint does not tell the layout of {names_list(untold, 3)} (square, and no weight"
                f" near {'it' if len(untold) == 1 else 'them'} tells by its bias): took {assumed}"]
    if fan_in_fan_out:
        return ["note: --fan-in-fan-out changed nothing: the checkpoint tells the layout of every weight (GPT-2"
                " Conv1D (in, out) or nn.Linear (out, in))"]
    return []


def _config(op, modules: list[Module], saved: list[str], ones: list[str], targets: set[str]) -> dict:
    """The adapter_config.json PEFT reads (LoraConfig's fields; the rest keep their defaults)."""
    alpha = op.alpha if op.alpha is not None else op.rank
    biases = any(split_name(n)[0] in targets for n in ones)
    return {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": None, "inference_mode": True,
            "r": op.rank, "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
            "target_modules": [m.name for m in modules], "lora_dropout": 0.0, "fan_in_fan_out": any(m.layout == "transposed" for m in modules),
            "bias": "lora_only" if biases else "none", "use_rslora": False, "use_dora": False,
            "modules_to_save": saved or None, "init_lora_weights": True,
            "rank_pattern": {f"^{re.escape(m.name)}": m.rank for m in modules if m.rank != op.rank},
            "alpha_pattern": {}}


def _cast(tensor: Tensor, dtype: DType) -> Tensor:
    """``tensor`` as ``dtype`` (converted when the writer reads it); other than floating point, as it is."""
    if tensor.dtype == dtype or not tensor.dtype.floating:
        return tensor
    return Tensor(Storage(tensor.numel * dtype.itemsize, loader=copy_of(tensor, dtype)), dtype, tuple(tensor.shape))


def _extract(module: Module, base: Tensor, tuned: Tensor, alpha: float) -> None:
    """``module``'s A, B (PEFT's layout, in ``module.dtype``) and the relative error of the update they
    make (computed in float32, then rounded once)."""
    import torch

    from ...checkpoint.values import to_torch
    from ... import dtypes
    from .arithmetic import svd_pair

    delta = to_torch(tuned).float() - to_torch(base).float()
    out = delta.shape[0]
    if module.layout in ("transposed", "embedding"):
        delta = delta.T
    flat = delta.reshape(delta.shape[0], -1)
    scaling = alpha / module.rank
    b, a, module.error = svd_pair(flat, module.rank)
    dtype = dtypes.torch_dtype(module.dtype)
    b, a = (b / scaling).to(dtype), a.to(dtype)
    if dtype != torch.float32:  # the rounded pair's own error
        total = float(torch.linalg.norm(flat))
        rest = float(torch.linalg.norm(flat - (b.float() * scaling) @ a.float()))
        module.error = rest / total if total else 0.0
    if module.layout == "conv":
        kernel = tuple(module.shape[2:])
        a, b = a.reshape(module.rank, module.shape[1], *kernel), b.reshape(out, module.rank, *(1,) * len(kernel))
    module.a, module.b = a.contiguous(), b.contiguous()


def adapter_tensors(extraction: Extraction) -> dict[str, Tensor]:
    """The adapter's tensors by PEFT's keys: each module's pair (computed), then the whole tensors."""
    from ...checkpoint.values import from_torch

    tensors: dict[str, Tensor] = OrderedDict()
    for m in extraction.modules:
        a, b = ("lora_embedding_A", "lora_embedding_B") if m.layout == "embedding" else ("lora_A.weight",
                                                                                          "lora_B.weight")
        tensors[f"{PREFIX}{m.name}.{a}"] = from_torch(m.a, owned=True)
        tensors[f"{PREFIX}{m.name}.{b}"] = from_torch(m.b, owned=True)
    tensors.update(extraction.whole)
    return tensors
