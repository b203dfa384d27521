"""compressed-tensors' naive formats: ``float-quantized`` (float8 codes stored as ``x.weight``)
and ``int-quantized`` (int8 codes), each with ``x.weight_scale`` per tensor, channel, group or
block and, when asymmetric, ``x.weight_zero_point`` of the scale's shape; a value is
(code - zero point) * scale, in the scale's dtype, as its NaiveQuantizationCompressor
decompresses it. NVIDIA ModelOpt's FP8 export (``quant_method: modelopt``, ``quant_algo: FP8``) stores
the same layout: float8 ``x.weight`` with a float32 ``x.weight_scale``, value = code * scale."""

from __future__ import annotations

from . import compressed
from .base import Group, Partial, Scheme

SCALE, ZERO = "_scale", "_zero_point"


class Naive(Scheme):
    roles = ("codes", "scale", "zero_point", *compressed.ACTIVATIONS)
    markers = ("weight" + SCALE,)
    def __init__(self, name: str, codes: tuple[str, ...], methods: tuple[str, ...] = (compressed.METHOD,)):
        self.name, self.codes, self.methods = name, codes, methods  # codes: the dtypes its codes are stored in

    def part_name(self, name, role):
        if role in compressed.ACTIVATIONS:
            return compressed.activation_name(name, role)
        return name + {"codes": "", "scale": SCALE, "zero_point": ZERO}[role]

    def find(self, tensors, config):
        if config.get("quant_method", compressed.METHOD) not in self.methods:
            return
        for name, weight in tensors.items():
            if weight.dtype.name not in self.codes or not name.endswith(".weight"):
                continue
            module = name[:-len(".weight")]
            args = compressed.weight_args(config, module)
            scale, zero = tensors.get(name + SCALE), tensors.get(name + ZERO)
            present = [n for n in (name, name + SCALE, name + ZERO) if n in tensors]
            if scale is None:
                if args is not None:  # the config quantizes this module: its codes need a scale
                    yield Partial(present, f"{name} has no {name + SCALE}")
                continue
            found = self._group(name, weight, scale, zero, args, present, compressed.weight_format(config, module))
            yield compressed.with_activations(found, tensors)

    def _group(self, name, weight, scale, zero, args, present, fmt):
        if len(weight.shape) != 2 or not scale.dtype.floating:
            told = f"compressed-tensors format {fmt} is not read: " if fmt not in (None, self.name) else ""
            return Partial(present, f"{told}{name} is {list(weight.shape)} {weight.dtype} with a {scale.dtype} scale,"
                           " not the 2-D codes and float scale this format stores")
        tile, expected = compressed.layout(args, scale.shape, weight.shape)
        if tile is None:
            return Partial(present, f"the scale {list(scale.shape)} does not fit {list(weight.shape)}"
                           f" (expected {expected})")
        if zero is not None and tuple(zero.shape) != tuple(scale.shape):
            return Partial(present, f"the zero point {list(zero.shape)} does not match the scale {list(scale.shape)}")
        if zero is None and args is not None and args.get("symmetric") is False:
            return Partial(present, f"asymmetric codes without their zero point {name + ZERO}")
        parts = {"codes": name, "scale": name + SCALE} | ({"zero_point": name + ZERO} if zero is not None else {})
        return Group(name, parts, weight.shape, {"bits": 8, "block": list(tile)})

    def dequantize(self, tensor):
        from ..checkpoint.values import to_torch

        codes = to_torch(tensor.parts["codes"])
        zero = tensor.parts.get("zero_point")
        return compressed.dequantize(tensor, lambda start, stop: codes[start:stop], to_torch(tensor.parts["scale"]),
                                     None if zero is None else to_torch(zero), tuple(tensor.params["block"]))
