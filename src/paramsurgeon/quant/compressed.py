"""What compressed-tensors' schemes share: the ``quantization_config`` (``config_groups``, each
with ``targets`` and ``weights`` arguments, and ``ignore``), matched to a module by name as its
model-free dequantizer matches it, and the tile each scale applies to."""

from __future__ import annotations

import dataclasses
import re

from .base import Group, Partial
from .tiles import bands, grid, spread
from .widen import widen

METHOD = "compressed-tensors"
FP4 = {"float8_e4m3fn": "nvfp4-pack-quantized", "uint8": "mxfp4-pack-quantized"}  # scale dtype -> format
ACTIVATIONS = ("input_scale", "input_zero_point", "input_global_scale")  # a module's static activation parameters
BLOCK = (128, 128)  # FP8_BLOCK's block, the one block read without a config naming it


def activation_name(name: str, role: str) -> str:
    """The stored name of the activation parameter ``role`` of the module whose weight is ``name``."""
    return f"{name.rpartition('.')[0]}.{role}" if "." in name else role


def with_activations(found: Group | Partial, tensors: dict) -> Group | Partial:
    """A group found, with the activation parameters its module stores (static input scales) among its
    parts: they go with the weight, so that a module written plain keeps none that no plain layer reads."""
    if not isinstance(found, Group):
        return found
    names = {role: activation_name(found.name, role) for role in ACTIVATIONS}
    return dataclasses.replace(found, parts=found.parts | {r: n for r, n in names.items() if n in tensors})


def reads(config: dict) -> bool:
    """Whether a checkpoint with this quantization_config can hold compressed-tensors weights
    (it is compressed-tensors', or there is none and the names tell)."""
    return config.get("quant_method", METHOD) == METHOD


def weight_args(config: dict, module: str) -> dict | None:
    """The ``weights`` arguments of the first config group whose targets match ``module`` ('Linear'
    targets every module, 're:X' a regex matched at the start of the name, anything else the exact
    name); None when none does, the module is ignored, or there is no config."""
    group = _group(config, module)
    return group["weights"] if group else None


def weight_format(config: dict, module: str) -> str | None:
    """The compression format of ``module``'s weights: its config group's ``format``, else the
    config's (None without a config)."""
    group = _group(config, module)
    found = group.get("format") if group else None
    found = found if isinstance(found, str) else config.get("format")
    return found if isinstance(found, str) else None


def fp4_format(config: dict, module: str, scale) -> str | None:
    """The format of ``module``'s uint8 packed weight: the config's, else the one its scale's dtype tells."""
    return weight_format(config, module) or (FP4.get(scale.dtype.name) if scale is not None else None)


def _group(config: dict, module: str) -> dict | None:
    """The first config group (with ``weights`` arguments) that quantizes ``module``."""
    groups = config.get("config_groups")
    if not isinstance(groups, dict) or any(_matches(module, t) for t in _listed(config.get("ignore"))):
        return None
    for scheme in groups.values():
        if not isinstance(scheme, dict) or not isinstance(scheme.get("weights"), dict):
            continue
        targets = _listed(scheme.get("targets"))
        if "Linear" in targets or any(_matches(module, t) for t in targets):
            return scheme
    return None


def layout(args: dict | None, scale_shape: tuple[int, ...], shape: tuple[int, ...]) -> tuple[tuple | None, str]:
    """The tile [bm, bn] each scale value covers in a weight of ``shape`` (from the config group's
    ``weights`` arguments, else from the scale's shape) and what the scale should be; the tile is
    None when the scale does not fit."""
    strategy = args.get("strategy") if args else _strategy(scale_shape, shape)
    tile = _tile(strategy, args, scale_shape, shape)
    if tile is None:
        return None, f"a per-tensor, per-channel, per-group or block scale (strategy {strategy})"
    expected = grid(shape, tile)
    fits = all(n == 1 for n in scale_shape) if strategy == "tensor" else tuple(scale_shape) == expected
    return (tile if fits else None), f"{strategy} scales {list(expected)}"


def _tile(strategy: object, args: dict | None, scale_shape: tuple[int, ...], shape: tuple[int, ...]):
    rows, columns = shape
    if strategy == "tensor":
        return rows, columns
    if strategy == "channel":
        return 1, columns
    if strategy == "group":
        size = args.get("group_size") if args else columns // scale_shape[1]
        return (1, size) if isinstance(size, int) and size > 0 else None
    block = (args.get("block_structure") if args else list(BLOCK)) if strategy == "block" else None
    if isinstance(block, list) and len(block) == 2 and all(isinstance(n, int) and n > 0 for n in block):
        return block[0], block[1]
    return None


def _strategy(scale_shape: tuple[int, ...], shape: tuple[int, ...]) -> str:
    """The strategy a scale's shape tells when there is no config: one value, one per row (and per
    group of columns), else blocks."""
    rows = shape[0]
    if all(n == 1 for n in scale_shape):
        return "tensor"
    if len(scale_shape) == 2 and scale_shape[0] == rows:
        return "channel" if scale_shape[1] == 1 else "group"
    return "block"


def _listed(value: object) -> list:
    """A config's list (of targets, of ignored modules): one name alone is a list of one; anything
    else but a list, an empty one."""
    return [value] if isinstance(value, str) else value if isinstance(value, list) else []


def _matches(module: str, target: object) -> bool:
    if not isinstance(target, str):
        return False
    if not target.startswith("re:"):
        return target == module
    try:
        return re.match(target[3:], module) is not None
    except re.error:
        return False


def dequantize(tensor, codes, scale, zero, tile: tuple[int, int]):
    """The values of ``tensor``: (code - zero point) * scale of its tile, computed in the scale's
    dtype as compressed-tensors' ``dequantize`` computes them; ``codes(start, stop)`` gives the
    integer or float codes of a band of rows, ``scale`` and ``zero`` (or None) are per tile."""
    import torch

    from ..dtypes import torch_dtype

    out = torch.empty(tensor.shape, dtype=torch_dtype(tensor.dtype))
    rows, columns = tensor.shape
    tile = min(tile[0], rows), min(tile[1], columns)  # the same grid (a tile larger than the weight is all of it)
    scale = scale.reshape(grid(tensor.shape, tile))
    zero = None if zero is None else zero.reshape(scale.shape)
    for start, stop in bands(tensor.shape, tile[0] if scale.shape[0] > 1 else 1):
        values = widen(codes(start, stop), scale.dtype)
        if zero is not None:
            values = values - spread(zero, tile, start, stop, columns).to(scale.dtype)
        out[start:stop] = values * spread(scale, tile, start, stop, columns)
    return out
