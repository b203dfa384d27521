"""resize: grow or shrink tensors along a dim; kept slices first (the first N, or --keep's in
order), then new slices filled with the mean, a number, a scheme or the layer's default."""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable

from ...checkpoint import Checkpoint, Tensor
from ...checkpoint.kinds import infer_kinds
from ...checkpoint.layouts import stored_in_out
from ...declare import option
from ...errors import UnfitTensorError, UsageError
from .. import schemes
from ..plan import Change, Plan, fail, names_list
from ..spec import Operation, Overflow, Sources, Targets, TiePolicy, with_warnings
from ..values import value_plan
from .common import dim_of, no_dim, numbers, own, torch_of

LARGEST = 1 << 40  # bytes of one resized tensor: beyond, a typo in --size rather than a model


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
            self._keep = numbers(self.keep, "--keep") if self.keep is not None else None
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
            tensor, dim = tensors[name], dim_of(tensors[name], self.dim)
            if dim is None:
                problems.append(f"'{name}' {no_dim(tensor, self.dim)}")
                continue
            old = tensor.shape[dim]
            outside = [i for i in self._keep or [] if i >= old]
            if outside:
                shown = names_list(list(map(str, outside)))
                problems.append(f"'{name}' has {old} slices along dim {dim}, so --keep {shown} is out of range")
            shapes[name] = tensor.shape[:dim] + (self.new_size(old),) + tensor.shape[dim + 1:]
            if math.prod(shapes[name]) * tensor.dtype.itemsize > LARGEST:
                problems.append(f"'{name}' would become {list(shapes[name])}, more than {LARGEST >> 40} TiB")
        fail("resize", problems)
        resized = {**{n: t for n, t in tensors.items()}, **{n: SimpleNamespace(shape=s) for n, s in shapes.items()}}
        kinds = infer_kinds(tensors) if self._fill == schemes.Scheme("default") else {}
        fans = isinstance(self._fill, schemes.Scheme) and (self._fill.name == "default"
                                                           or self._fill.name.startswith("kaiming"))
        in_out = stored_in_out(tensors) if fans else set()  # GPT-2's Conv1D: fan-in is dim 0
        seed = self.seed or 0

        def change_for(unit: list[str], tensor: Tensor):
            if len({tensors[n].shape for n in unit}) > 1:
                raise UnfitTensorError(f"shares its storage with {', '.join(unit[1:])} through views of other"
                                       " shapes; pass --untie")
            name, dim = unit[0], dim_of(tensor, self.dim)
            shape, old = shapes[name], tensor.shape[dim]
            kept = len(self._keep) if self._keep is not None else min(old, shape[dim])
            fill = self._fill
            if shape[dim] > kept:
                if fill == schemes.Scheme("default"):
                    try:
                        fill = schemes.default_for(name, resized, kinds[name].layer, in_out)
                    except UnfitTensorError as e:
                        raise UnfitTensorError(f"{e}, so --fill default does not apply; choose another --fill") from e
                problem = _fill_problem(fill, shape, tensor, self.allow_overflow)
                if fill == "mean" and not old:
                    problem = f"has no slices along dim {dim} to take the mean of; pass --fill zeros, a number or" \
                              " a scheme"
                if problem:
                    raise UnfitTensorError(problem)
            action = f"resize {old} -> {shape[dim]} along dim {dim}"
            details = ([f"keep {self.keep}"] if self._keep is not None else []) + \
                ([f"{shape[dim] - kept} new: {_shown(fill)}"] if shape[dim] > kept else [])
            guarded = isinstance(fill, schemes.Scheme) and fill.reach() > tensor.dtype.largest \
                and not self.allow_overflow
            flipped = name in in_out and isinstance(fill, schemes.Scheme) and fill.name.startswith("kaiming")
            compute = _resized(tensor, dim, shape, self._keep, fill, seed, name, flipped)
            drawn = _drawn(tensor, dim, shape, kept, fill, seed, name, flipped) if guarded else None
            return Change(unit, action + (f" ({'; '.join(details)})" if details else ""), shape, tensor.dtype.name,
                          compute, lazy=not guarded, guarded=guarded, unrounded=drawn)

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
    if isinstance(fill, str):
        return fill
    return f"constant {fill.kwargs['val']}" if fill.name == "constant" else str(fill)


def _fill_problem(fill, shape: tuple[int, ...], tensor: Tensor, allow_overflow: bool) -> str | None:
    """Why ``fill`` cannot give the new slices of ``tensor`` (None when it can)."""
    if fill == "mean":
        if not (tensor.dtype.floating or tensor.dtype.complex):
            return f"is {tensor.dtype}, which has no mean to fill with; pass --fill zeros or a number"
        return None
    if fill.name == "constant":
        return schemes.constant_problem(fill.kwargs["val"], tensor.dtype, allow_overflow, "--fill")
    return fill.problem(shape, tensor.dtype.floating)


def _resized(tensor: Tensor, dim: int, shape: tuple[int, ...], keep: list[int] | None, fill, seed: int,
             name: str, in_out: bool = False) -> Callable:
    """What computes the resized values: the kept slices, then the new ones (``in_out``: drawn as
    for a weight stored (in, out), see schemes.fill)."""
    def compute():
        import torch

        values = torch_of(tensor)
        if keep is not None:
            kept = values.index_select(dim, torch.tensor(keep, dtype=torch.long))
        else:
            kept = values.narrow(dim, 0, min(values.shape[dim], shape[dim]))
        extra = shape[dim] - kept.shape[dim]
        if not extra:
            return own(kept)
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
            new = schemes.fill(fill, shape, values.dtype, seed, name, in_out).narrow(dim, kept.shape[dim], extra)
        return torch.cat([kept, new], dim=dim)

    return compute


def _drawn(tensor: Tensor, dim: int, shape: tuple[int, ...], kept: int, fill: schemes.Scheme, seed: int, name: str,
           in_out: bool) -> Callable:
    """What draws the new slices of a scheme ``fill``, as ``_resized`` does, before their rounding to
    the tensor's dtype (what the overflow check looks at: a float8_e4m3fn cast clamps)."""
    def drawn():
        from ... import dtypes

        return schemes.draw(fill, shape, dtypes.torch_dtype(tensor.dtype), seed, name, in_out).narrow(
            dim, kept, shape[dim] - kept)

    return drawn


def _left_behind(ckpt: Checkpoint, names: list[str], shapes: dict, dim: int) -> list[str]:
    """A note for tensors of a resized layer left at the old size (a bias not selected)."""
    chosen, notes = set(names), []
    for name in names:
        prefix = name.rpartition(".")[0]
        tensor = ckpt[name]
        d = dim_of(tensor, dim)
        for other, t in ckpt.tensors.items():
            if other in chosen or other.rpartition(".")[0] != prefix or dim_of(t, dim) != d or d is None:
                continue
            if t.shape[d] == tensor.shape[d] != shapes[name][d]:
                notes.append(f"'{other}' keeps {t.shape[d]} along dim {d} though '{name}' beside it becomes"
                             f" {shapes[name][d]}; select it too to resize the layer whole")
                chosen.add(other)
    return notes


