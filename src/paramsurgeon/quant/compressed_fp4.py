"""compressed-tensors' FP4 formats. ``x.weight_packed`` uint8 [out, in/2] holds two e2m1 codes a byte
(low nibble first) and ``x.weight_scale`` a scale per group of inputs:
- ``nvfp4-pack-quantized``: float8_e4m3fn scales per 16 values and ``x.weight_global_scale`` (float32);
  a value is e2m1 * (bfloat16(scale) / global scale);
- ``mxfp4-pack-quantized``: uint8 E8M0 exponents per 32 values; a value is e2m1 * 2 ** (scale - 127)
  with the power in bfloat16;
computed in the dtypes its NVFP4PackedCompressor and MXFP4PackedCompressor decompress them in (torch's
promotion), then rounded to the dtype. The format is the config group's (or the config's), else told by
the scale's dtype. (pack-quantized names a ``weight_packed`` of another format, mxfp6 or others.)
"""

from __future__ import annotations

from . import compressed, tiles
from .base import Group, Partial, Scheme
from .mxfp4 import e2m1

SUFFIXES = {"codes": "_packed", "scale": "_scale", "global_scale": "_global_scale"}


class Fp4Packed(Scheme):
    roles = ("codes", "scale", "global_scale", *compressed.ACTIVATIONS)
    markers = ("weight_packed", "weight_global_scale")
    methods = (compressed.METHOD,)

    def __init__(self, name: str, scale_dtype: str, group: int):
        self.name, self.scale_dtype, self.group = name, scale_dtype, group
        self.global_scale = scale_dtype != "uint8"  # nvfp4's second-level scale; mxfp4's exponents have none
        self.scales = ("scale", "global_scale") if self.global_scale else ()  # E8M0 exponents: any byte is a scale

    def part_name(self, name, role):
        return compressed.activation_name(name, role) if role in compressed.ACTIVATIONS else name + SUFFIXES[role]

    def find(self, tensors, config):
        if not compressed.reads(config):
            return
        for stored, tensor in tensors.items():
            if stored.endswith("weight_packed") and tensor.dtype.name == "uint8":
                name = stored[:-len("_packed")]
                module = name[:-len(".weight")] if name.endswith(".weight") else name
                if compressed.fp4_format(config, module, tensors.get(name + "_scale")) == self.name:
                    yield compressed.with_activations(self._group(name, tensors, compressed.weight_args(config, module)),
                                                      tensors)
            elif self.global_scale and stored.endswith("weight_global_scale"):
                name = stored[:-len("_global_scale")]
                if name + "_packed" not in tensors and name not in tensors:
                    yield Partial([stored], f"{stored} without its weight {name}_packed")

    def _group(self, name, tensors, args):
        present = _present(name, tensors)
        parts = {role: name + suffix for role, suffix in SUFFIXES.items()}
        if not self.global_scale:
            del parts["global_scale"]
        missing = [n for n in parts.values() if n not in tensors]
        if missing:
            return Partial(present, f"{self.name} codes without their {' and '.join(missing)}")
        if name + "_zero_point" in tensors or args is not None and args.get("symmetric") is False:
            return Partial(present, f"asymmetric {self.name} codes (with a zero point) are not read")
        codes, scale = tensors[parts["codes"]], tensors[parts["scale"]]
        rows, columns = codes.shape[0] if codes.shape else 0, 2 * codes.shape[-1] if codes.shape else 0
        group = args.get("group_size") if args else self.group
        fits = len(codes.shape) == 2 and group == self.group and columns % group == 0 \
            and scale.shape == (rows, columns // group) and scale.dtype.name == self.scale_dtype
        if self.global_scale:
            fits = fits and tensors[parts["global_scale"]].numel == 1 and tensors[parts["global_scale"]].dtype.floating
        if not fits:
            return Partial(present, ", ".join(f"{parts[r]} {list(tensors[parts[r]].shape)} {tensors[parts[r]].dtype}"
                                              for r in parts) + f": not 2-D uint8 codes with a {self.scale_dtype}"
                           f" scale per {self.group} values" + (" and one global scale" if self.global_scale else ""))
        return Group(name, parts, (rows, columns), {"bits": 4, "block": [1, group]})

    def dequantize(self, tensor):
        import torch

        from ..checkpoint.values import to_torch
        from ..dtypes import torch_dtype

        codes, scale = to_torch(tensor.parts["codes"]), to_torch(tensor.parts["scale"])
        if self.global_scale:  # bfloat16 over float32 [1]: computed in float32
            scale = scale.to(torch.bfloat16) / to_torch(tensor.parts["global_scale"])
        else:
            scale = 2.0 ** (scale.to(torch.int32) - 127).to(torch.bfloat16)
        rows, columns = tensor.shape
        out = torch.empty(tensor.shape, dtype=torch_dtype(tensor.dtype))
        step = max(1, tiles.ELEMENTS // max(columns, 1))
        for start in range(0, rows, step):
            values = e2m1(codes[start:start + step]).to(scale.dtype)
            grouped = values.view(values.shape[0], -1, self.group) * scale[start:start + step, :, None]
            out[start:start + step] = grouped.view(values.shape)
        return out


def _present(name: str, tensors: dict) -> list[str]:
    return [name + s for s in ("_packed", "_scale", "_global_scale", "_zero_point") if name + s in tensors]

