"""nvfp4: NVIDIA ModelOpt's export. ``x.weight`` uint8 [out, in/2] holds two e2m1 codes a byte (low
nibble first), ``x.weight_scale`` float8_e4m3fn [out, in/16] a scale per 16 values, and
``x.weight_scale_2`` float32 (one value) the scale of those scales; ``x.input_scale`` (the
activations' scale), when there is one, goes with the group. A value is e2m1 * (float(weight_scale)
* weight_scale_2), in float32 rounded to the dtype, as ModelOpt's ``NVFP4QTensor.dequantize``
computes it. Found by these names and dtypes, under a ``quant_method: modelopt`` config or none.
"""

from __future__ import annotations

from .base import Group, Partial, Scheme
from .mxfp4 import e2m1

SUFFIXES = {"codes": "", "scale": "_scale", "scale_2": "_scale_2"}
BLOCK = 16  # values a scale
ROWS = 1 << 22  # values dequantized at a time


class Nvfp4(Scheme):
    name = "nvfp4"
    roles = ("codes", "scale", "scale_2", "input_scale")
    markers = ("_scale_2", "_scale")
    methods = ("modelopt", "modelopt_fp4")

    def part_name(self, name, role):
        if role == "input_scale":
            return name.rsplit(".", 1)[0] + ".input_scale" if "." in name else "input_scale"
        return name + SUFFIXES[role]

    def find(self, tensors, config):
        if config.get("quant_method") not in (None, *self.methods):
            return
        for name, tensor in tensors.items():
            if name.endswith("_scale_2") and tensor.numel == 1:
                yield self.group(name[:-len("_scale_2")], tensors)
            elif name.endswith("_scale") and tensor.dtype.name == "float8_e4m3fn" and name + "_2" not in tensors:
                codes = tensors.get(name[:-len("_scale")])
                if codes is not None and codes.dtype.name == "uint8":
                    yield Partial([name[:-len("_scale")], name], f"nvfp4 codes and block scales without their"
                                  f" global scale {name}_2")

    def group(self, weight_name: str, tensors: dict) -> Group | Partial:
        """The group of the codes ``weight_name``, or why its parts do not make one."""
        parts = {role: weight_name + suffix for role, suffix in SUFFIXES.items()}
        input_scale = self.part_name(weight_name, "input_scale")
        if input_scale in tensors:
            parts["input_scale"] = input_scale
        named = [n for n in parts.values() if n in tensors]
        missing = [n for n in parts.values() if n not in tensors]
        if missing:
            return Partial(named, f"an nvfp4 global scale without its {' and '.join(missing)}")
        pre_scale = weight_name.rsplit(".", 1)[0] + ".pre_quant_scale"
        if pre_scale in tensors:  # NVFP4_AWQ: the codes hold weights times the inputs' scale
            return Partial([*named, pre_scale], f"nvfp4 codes with a {pre_scale} (NVFP4_AWQ) are not read")
        codes, scale, scale_2 = (tensors[parts[r]] for r in ("codes", "scale", "scale_2"))
        if codes.dtype.name != "uint8" or scale.dtype.name != "float8_e4m3fn" or not codes.shape \
                or scale.shape != (*codes.shape[:-1], codes.shape[-1] * 2 // BLOCK) or codes.shape[-1] * 2 % BLOCK \
                or scale_2.numel != 1 or not scale_2.dtype.floating:
            return Partial(named, f"{weight_name} {list(codes.shape)} {codes.dtype}, {parts['scale']}"
                           f" {list(scale.shape)} {scale.dtype}, {parts['scale_2']} {list(scale_2.shape)}: not"
                           f" uint8 codes with a float8_e4m3fn scale per {BLOCK} values and one global scale")
        return Group(weight_name, parts, (*codes.shape[:-1], codes.shape[-1] * 2), {"bits": 4, "block": [1, BLOCK]})

    def dequantize(self, tensor):
        import torch

        from ..checkpoint.values import to_torch
        from ..dtypes import torch_dtype

        codes = to_torch(tensor.parts["codes"]).reshape(-1, BLOCK // 2)
        scale = to_torch(tensor.parts["scale"]).reshape(-1, 1).float()
        scale = scale * to_torch(tensor.parts["scale_2"]).float().reshape(())
        out = torch.empty(tensor.shape, dtype=torch_dtype(tensor.dtype))
        flat, step = out.view(-1, BLOCK), ROWS // BLOCK
        for start in range(0, codes.shape[0], step):
            flat[start:start + step] = e2m1(codes[start:start + step]) * scale[start:start + step]
        return out
