"""The library's calls: every command as a function on a checkpoint in memory (``ps.zero(ckpt, ...)``),
and those that open checkpoints by path (merge, merge_lora, extract_lora, apply). Whatever a call
reads besides its checkpoint (a --source, merge inputs, an adapter) is opened by one Loader
(formats/loader.py), as on the command line; nothing here is written but what extract_lora writes.
"""

from __future__ import annotations

from typing import Any, Callable

from .checkpoint import Checkpoint
from .formats.loader import Loader
from .ops import (Cast, Concat, Copy, Dequantize, Drop, Experts, Init, Layers, Operation, Plan, Quantize, Rename,
                  Resize, Scale, Split, Tie, Transpose, Untie, Zero)
from .ops.lora import ExtractLora, MergeLora
from .ops.merge import Merge
from .ops.surgery import Step, run


def _function(operation: type[Operation]) -> Callable[..., Plan]:
    """``name(ckpt, **options)``: check ``operation`` with these options, apply it to ``ckpt`` in
    memory, and return its Plan (its notes say what a command would print)."""
    def function(ckpt: Checkpoint, *, reset_optimizer: bool = False, **options) -> Plan:
        return run(ckpt, [Step(operation(**options))], sources=Loader(), reset_optimizer=reset_optimizer)[0]

    function.__name__ = function.__qualname__ = operation.name
    function.__doc__ = f"{operation.__doc__}\n\nOptions: the fields of {operation.__name__}; returns the Plan applied."
    return function


init, zero, scale, cast = _function(Init), _function(Zero), _function(Scale), _function(Cast)
copy, tie, untie, rename, drop = _function(Copy), _function(Tie), _function(Untie), _function(Rename), _function(Drop)
resize, split, concat, transpose = _function(Resize), _function(Split), _function(Concat), _function(Transpose)
layers, experts = _function(Layers), _function(Experts)
dequantize, quantize = _function(Dequantize), _function(Quantize)


def apply(ckpt: Checkpoint, recipe: str, *, seed: int | None = None, reset_optimizer: bool = False) -> list[Plan]:
    """Run the TOML recipe at path ``recipe`` on ``ckpt`` in memory; the plans applied, in order."""
    from .ops import recipes

    steps, recipe_seed = recipes.parse(recipes.read(recipe), recipe)
    return run(ckpt, steps, seed=recipe_seed if recipe_seed is not None else seed, sources=Loader(),
               reset_optimizer=reset_optimizer)


def merge(inputs: list[Any], *, base: Any = None, key: str | None = None, reset_optimizer: bool = False,
          **options) -> Checkpoint:
    """Merge checkpoints (paths, or Checkpoints already loaded) and return the result, a Checkpoint
    whose merged tensors are computed when they are read or saved (``ps.save``).

    Options: the fields of Merge (method, weights, t, lambda_, density, normalize, seed, ...); ``key``
    picks the tensors of the torch inputs. The plan's notes (kept tensors, optimizer state, the seed
    drawn) are added to the result's notes.
    """
    loader = Loader(key=key, shared_key=True)
    paths = []
    for item in list(inputs) + ([base] if base is not None else []):
        path = item if isinstance(item, str) else f"<checkpoint {len(loader.opened) + 1}>"
        if not isinstance(item, str):
            loader.opened[path, key] = item  # already loaded: the loader hands it out as it is
        paths.append(path)
    if base is not None:
        options["base"] = paths.pop()
    operation = Merge(inputs=paths, **options)
    ckpt = loader.checkpoint(operation.written, role="the checkpoint")
    plans = run(ckpt, [Step(operation)], seed=operation.seed, sources=loader, reset_optimizer=reset_optimizer)
    ckpt.notes += plans[-1].notes
    return ckpt


def merge_lora(ckpt: Any, adapter: str, *, key: str | None = None, **options) -> Checkpoint:
    """Fold the adapter directory ``adapter`` into ``ckpt`` (a path, or a Checkpoint already loaded)
    and return the result, whose updated tensors are computed when read or saved (``ps.save``).

    Options: the fields of MergeLora (scale, untie, dtype, allow_overflow).
    """
    loader = Loader()
    loaded = loader.checkpoint(ckpt, key, "the checkpoint") if isinstance(ckpt, str) else ckpt
    plans = run(loaded, [Step(MergeLora(adapter=adapter, **options))], sources=loader)
    loaded.notes += plans[-1].notes
    return loaded


def extract_lora(base: str, tuned: str, output: str, *, rank: int, key: str | None = None, **options) -> list[dict]:
    """Write to ``output`` a LoRA adapter whose merge into ``base`` approximates ``tuned``; returns one
    entry per module (module, rank, relative reconstruction error) and per tensor saved whole."""
    from .formats import peft
    from .ops.lora.extraction import adapter_tensors, plan_extraction

    operation = ExtractLora(base=base, tuned=tuned, output=output, rank=rank, **options)
    loader = Loader()
    extraction = plan_extraction(operation, loader.checkpoint(base, key, "base"),
                                 loader.checkpoint(tuned, key, "tuned"))
    peft.write_adapter(output, adapter_tensors(extraction), extraction.config, loader.inputs)  # not onto an input
    return extraction.rows


__all__ = ["apply", "cast", "concat", "copy", "drop", "experts", "extract_lora", "init", "layers", "merge", "merge_lora",
           "rename", "resize", "scale", "split", "tie", "transpose", "untie", "zero"]
