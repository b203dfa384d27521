"""compressed-tensors' ``pack-quantized``: ``x.weight_packed`` int32 holding 1- to 8-bit integer
codes (32 codes in ``bits`` words, element i at bit i*bits of its row, stored plus 2**(bits-1)),
``x.weight_scale`` per tensor, channel or group, ``x.weight_shape`` (the logical shape) and, when
asymmetric, ``x.weight_zero_point`` (packed the same way down the rows for channel and group
scales); a value is (code - zero point) * scale in the scale's dtype, as its
PackedQuantizationCompressor decompresses it."""

from __future__ import annotations

import math

from . import compressed
from . import tiles
from .base import Group, Partial, Scheme

SUFFIXES = {"codes": "_packed", "scale": "_scale", "shape": "_shape", "zero_point": "_zero_point"}


class Packed(Scheme):
    name = "pack-quantized"
    roles = ("codes", "scale", "shape", "zero_point", *compressed.ACTIVATIONS)
    methods = (compressed.METHOD,)
    markers = ("weight_packed", "weight_shape", "weight_scale")  # the last: to name a scale without its weight

    def part_name(self, name, role):
        return compressed.activation_name(name, role) if role in compressed.ACTIVATIONS else name + SUFFIXES[role]

    def find(self, tensors, config):
        if not compressed.reads(config):
            return
        for stored, tensor in tensors.items():
            if stored.endswith("weight_packed") and tensor.dtype.name == "int32" \
                    and compressed.weight_format(config, _module(stored)) in (None, self.name):
                yield compressed.with_activations(self._group(stored[:-len("_packed")], tensors, config), tensors)
            elif stored.endswith("weight_packed"):
                yield from self._unread(stored, tensors, config)
            elif stored.endswith(("weight_shape", "weight_scale")):
                name = stored.rpartition("_")[0]
                if name + "_packed" not in tensors and name not in tensors:
                    yield Partial(_present(name, tensors), f"{stored} without its weight {name} (or {name}_packed)")

    def _unread(self, stored, tensors, config):
        """A packed weight not in int32 nor in an FP4 format read here (compressed_fp4.py): named."""
        name, module = stored[:-len("_packed")], _module(stored)
        fmt = compressed.fp4_format(config, module, tensors.get(name + "_scale")) if tensors[stored].dtype.name == "uint8" \
            else compressed.weight_format(config, module)
        if fmt not in compressed.FP4.values():
            yield Partial(_present(name, tensors), f"{stored} {list(tensors[stored].shape)} {tensors[stored].dtype}:"
                          f" compressed-tensors format {fmt or 'unknown'} is not read (only pack-quantized in int32,"
                          f" {' and '.join(compressed.FP4.values())})")

    def _group(self, name, tensors, config):
        from ..checkpoint.values import to_torch

        present, parts = _present(name, tensors), {role: name + s for role, s in SUFFIXES.items()}
        missing = [parts[role] for role in ("scale", "shape") if parts[role] not in tensors]
        if missing:
            return Partial(present, f"packed codes without their {' and '.join(missing)}")
        if name + "_g_idx" in tensors:
            return Partial(present, f"{name}_g_idx reorders the groups (activation order), which compressed-tensors"
                           " no longer reads; not read here either")
        packed, scale, zero = tensors[parts["codes"]], tensors[parts["scale"]], tensors.get(parts["zero_point"])
        shape_part = tensors[parts["shape"]]
        shape = to_torch(shape_part).tolist() if len(shape_part.shape) == 1 and not shape_part.dtype.floating else None
        if shape is None or len(shape) != 2:
            return Partial(present, f"{parts['shape']} is {shape or [list(shape_part.shape), str(shape_part.dtype)]}:"
                           " only the shape of a 2-D weight is read")
        args = compressed.weight_args(config, name[:-len(".weight")] if name.endswith(".weight") else name)
        bits = _bits(args, shape, packed.shape)
        if bits is None:
            return Partial(present, f"{parts['shape']} {shape} disagrees with {parts['codes']} {list(packed.shape)}: no"
                           " bit width packs that shape into those int32 words" + (
                               f" ({args.get('num_bits')} bits in the config)" if args else ""))
        tile, expected = compressed.layout(args, scale.shape, tuple(shape))
        if tile is None or not scale.dtype.floating:
            return Partial(present, f"the scale {list(scale.shape)} {scale.dtype} does not fit {shape} (expected"
                           f" {expected}, floating point)")
        packed_zero = _packed_zero(zero, scale.shape, shape, bits, tile)
        if zero is not None and not packed_zero and tuple(zero.shape) != tuple(scale.shape):
            return Partial(present, f"the zero point {list(zero.shape)} {zero.dtype} fits neither the scale"
                           f" {list(scale.shape)} nor its int32 packing")
        if zero is None and args is not None and args.get("symmetric") is False:
            return Partial(present, f"asymmetric codes without their zero point {parts['zero_point']}")
        if zero is None:
            del parts["zero_point"]
        return Group(name, parts, tuple(shape), {"bits": bits, "block": list(tile), "packed_zero": bool(packed_zero)})

    def dequantize(self, tensor):
        from ..checkpoint.values import to_torch

        bits, (rows, columns) = tensor.params["bits"], tensor.shape
        packed, scale = to_torch(tensor.parts["codes"]), to_torch(tensor.parts["scale"])
        zero = tensor.parts.get("zero_point")
        if zero is not None:
            zero = to_torch(zero)
            if tensor.params["packed_zero"]:  # packed down the rows: one column of words per scale column
                zero = unpack(zero.t(), bits, rows).t()
        return compressed.dequantize(tensor, lambda start, stop: unpack(packed[start:stop], bits, columns), scale,
                                     zero, tuple(tensor.params["block"]))


def unpack(words, bits: int, columns: int):
    """The signed codes of each row of ``words`` (int32): element i is the ``bits`` bits from bit
    i*bits of the row's words, minus 2**(bits-1), as compressed-tensors' ``unpack_from_int32``."""
    import torch

    out = torch.empty(words.shape[0], columns, dtype=torch.int16)
    position = torch.arange(columns, dtype=torch.int64) * bits
    word, shift = position // 32, position % 32
    step = max(1, tiles.ELEMENTS // 4 // max(columns, 1))  # rows at a time: three int64 temporaries each
    for start in range(0, words.shape[0], step):
        band = torch.nn.functional.pad(words[start:start + step].to(torch.int64) & 0xFFFFFFFF, (0, 1))
        value = (band[:, word] >> shift) | (band[:, word + 1] << (32 - shift))
        out[start:start + band.shape[0]] = (value & ((1 << bits) - 1)) - (1 << (bits - 1))
    return out


def _bits(args: dict | None, shape: list | None, packed_shape: tuple[int, ...]) -> int | None:
    """The bit width that packs a weight of ``shape`` into int32 words of ``packed_shape``: the
    config's, else the only one that fits; None when the shapes disagree."""
    if not (isinstance(shape, list) and len(packed_shape) == 2 and shape[0] == packed_shape[0]
            and all(isinstance(n, int) and n > 0 for n in shape)):
        return None
    fits = [b for b in range(1, 9) if math.ceil(shape[1] * b / 32) == packed_shape[1]]
    wanted = args.get("num_bits") if args else None
    if wanted is not None:
        return wanted if wanted in fits else None
    return fits[0] if len(fits) == 1 else None


def _packed_zero(zero, scale_shape, shape, bits, tile) -> bool:
    """Whether ``zero`` is the int32 packing of per-channel or per-group zero points down the rows."""
    return (zero is not None and tile[0] == 1 and zero.dtype.name == "int32"
            and tuple(zero.shape) == (math.ceil(shape[0] * bits / 32), scale_shape[-1]))


def _present(name: str, tensors: dict) -> list[str]:
    return [name + s for s in ("_packed", "_scale", "_shape", "_zero_point") if name + s in tensors]


def _module(packed: str) -> str:
    """The module whose packed weight is stored as ``packed`` (``x`` of ``x.weight_packed``)."""
    name = packed[:-len("_packed")]
    return name[:-len(".weight")] if name.endswith(".weight") else name
