"""Operations on quantized weights: dequantize (each selected group written as a plain tensor,
its parts dropped) and quantize (selected float tensors stored as a scheme's parts, e.g.
DeepSeek's fp8-block layout). A group that does not make one (Checkpoint.partial) is refused."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from .. import quant
from ..checkpoint import Checkpoint, Tensor
from ..checkpoint.quantized import Quantized, refuse_partial
from ..declare import REQUIRED, option
from ..errors import PlanError, SelectionError, UnfitTensorError, UsageError
from ..selection import Selection
from ..sizes import plural
from .plan import Change, Plan, names_list
from .spec import Operation, Sources, Targets, TiePolicy, with_warnings
from .values import cast_target, torch_values, value_plan


def refuse_unread(ckpt: Checkpoint, command: str, what: str) -> None:
    """A PlanError when ``ckpt``'s config names a quant_method no scheme here reads (hqq, torchao, ...):
    its stored tensors may be codes, not values, so ``command`` cannot do ``what`` (it would write them
    unchanged, or change codes as if they were values)."""
    method = quant.unread_method(ckpt.config)
    if method is not None:
        raise PlanError(f"{command}: config.json's quantization_config has quant_method {json.dumps(method)}, which"
                        f" paramsurgeon does not read (it reads {', '.join(quant.METHODS)}): its stored tensors may be"
                        f" codes and scales, not values, so {what}; nothing written")


@dataclass(kw_only=True)
class Dequantize(Selection, TiePolicy, Operation):
    """Write the selected (default every) quantized weight as a plain tensor, its parts dropped."""

    name = "dequantize"
    example = "paramsurgeon dequantize deepseek-v3/ -o deepseek-v3-bf16/"

    dtype: str | None = option(None, "--dtype", metavar="D", help="float32, float16, bfloat16 or float64 (default:"
                               " the config's torch_dtype, else bfloat16).")

    def __post_init__(self) -> None:
        super().__post_init__()
        self._target = cast_target(self.dtype) if self.dtype is not None else None

    def plan(self, ckpt: Checkpoint, sources: Sources) -> Plan:
        refuse_unread(ckpt, "dequantize", "they cannot be dequantized here")
        names, warnings = self.choose(ckpt.tensors, ckpt.key)
        refuse_partial(ckpt, names, "dequantize")
        chosen = [n for n in names if type(ckpt[n]) is Quantized]
        if not chosen and names:
            warnings.append(_nothing_quantized(names, self.selector.narrows))
            if not self.allow_empty:
                raise SelectionError(f"dequantize: {warnings[-1]}; pass --allow-empty to go on anyway")
        target = self._target

        def change_for(unit: list[str], tensor: Tensor):
            dtype = target or tensor.dtype
            plain = Quantized(tensor.scheme, tensor.parts, tensor.shape, dtype, tensor.params)  # computed in ``dtype``
            return Change(unit, f"dequantize {tensor.scheme.name}", tensor.shape, dtype.name, plain.dequantized,
                          dequantizes=True, pieces=plain.storage.pieces)

        plan = value_plan("dequantize", f"dequantize{' to ' + self.dtype if self.dtype else ''}: {names_list(chosen)}",
                          ckpt, chosen, self, change_for)
        if chosen and len(chosen) < len(names) and self.selector.narrows:
            plan.notes.append(f"left {plural(len(names) - len(chosen), 'selected tensor')} that"
                              f" {'is' if len(names) - len(chosen) == 1 else 'are'} not quantized as they are")
        return with_warnings(plan, warnings)


@dataclass(kw_only=True)
class Quantize(Targets, TiePolicy, Operation):
    """Store the selected float matrices quantized (fp8-block: DeepSeek-V3's layout)."""

    name = "quantize"
    example = "paramsurgeon quantize llama/ -p 'model.layers.*' -k linear --scheme fp8-block -o llama-fp8/"

    scheme: str = option(REQUIRED, "--scheme", metavar="SCHEME", help="The quantization scheme: fp8-block (e4m3"
                         " codes, scale_inv = amax / 448 per tile).")
    block: str | None = option(None, "--block", metavar="MxN", help="fp8-block: the tile of one scale (default"
                               " 128x128).")

    def __post_init__(self) -> None:
        super().__post_init__()
        built = [s.name for s in quant.SCHEMES if s.quantizes]
        found = quant.find(self.scheme)
        if found is None or not found.quantizes:
            what = "quantize does not write this scheme yet" if found is not None else "no such scheme"
            raise UsageError(f"--scheme {self.scheme}: {what}; quantize writes {', '.join(built)}")
        self._scheme, self._params = found, {"bits": 8, "block": _block(self.block)}

    def plan(self, ckpt: Checkpoint, sources: Sources) -> Plan:
        refuse_unread(ckpt, "quantize", "they cannot be quantized anew")
        warnings: list[str] = []
        names = self.targets(ckpt, "quantize", warnings)
        scheme, params, already = self._scheme, self._params, []

        def change_for(unit: list[str], tensor: Tensor):
            if type(tensor) is Quantized and tensor.scheme is scheme and tensor.params == params:
                already.extend(unit)
                return None
            if not tensor.dtype.floating or len(tensor.shape) != 2:
                raise UnfitTensorError(f"is {list(tensor.shape)} {tensor.dtype}", f"{scheme.name} stores 2-D"
                                       " floating-point weights: choose them with -k linear")
            return Change(unit, f"quantize {scheme.name} {_shown(params)}", tensor.shape, tensor.dtype.name,
                          lambda: torch_values(tensor), stored_as=lambda plain: quant.quantized(scheme, plain, params))

        plan = value_plan("quantize", f"quantize {scheme.name} {_shown(params)}: {names_list(names)}", ckpt, names,
                          self, change_for)
        changed = {n for c in plan.changes for n in c.names}
        others = sorted({(t.scheme.name, _shown(t.params)) for n, t in ckpt.tensors.items()
                         if type(t) is Quantized and not t.scheme.native and n not in changed
                         and (t.scheme, t.params) != (scheme, params)})
        if others:
            alike = [shown for name, shown in others if name == scheme.name]
            raise PlanError(f"quantize: the checkpoint holds {', '.join(' '.join(o) for o in others)} weights, and a"
                            f" model config describes one quantization; dequantize them first"
                            + (f", or quantize with --block {alike[0]}" if alike else ""))
        if already:
            plan.notes.append(f"{plural(len(already), 'tensor')} {'is' if len(already) == 1 else 'are'} already"
                              f" {scheme.name} {_shown(params)}: {names_list(already)}")
        return with_warnings(plan, warnings)


def _nothing_quantized(names: list[str], narrowed: bool) -> str:
    """Why a dequantize would change nothing: none of the ``names`` chosen is a quantized weight."""
    which = f"'{names[0]}' is not" if len(names) == 1 and narrowed else \
        f"none of the {len(names):,} {'selected ' if narrowed else ''}tensors is"
    return f"{which} a quantized weight ('paramsurgeon inspect' shows each one's scheme); nothing to dequantize"


def _block(text: str | None) -> list[int]:
    """[rows, columns] of ``--block MxN`` (default 128x128)."""
    if text is None:
        return [128, 128]
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if match is None or 0 in (int(match.group(1)), int(match.group(2))):
        raise UsageError(f"--block {text}: expected ROWSxCOLUMNS of positive whole numbers, e.g. 128x128")
    return [int(match.group(1)), int(match.group(2))]


def _shown(params: dict) -> str:
    block = params.get("block")
    return "x".join(map(str, block)) if isinstance(block, list) else ""
