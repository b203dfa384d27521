"""mxfp4: gpt-oss's experts. ``x_blocks`` uint8 [experts, out, blocks, 16] holds two e2m1 codes a
byte (low nibble first), 32 a block, with ``x_scales`` uint8 [experts, out, blocks] the E8M0
exponent of each block (2 ** (scale - 127)). The logical tensor ``x`` is what transformers'
dequantized gpt-oss holds (``convert_moe_packed_tensors``): [experts, in, out], in = blocks * 32,
each value e2m1 * 2 ** (scale - 127) computed in float32 and rounded to the dtype.
"""

from __future__ import annotations

from .base import Group, Partial, Scheme

SUFFIXES = {"codes": "_blocks", "scales": "_scales"}
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
BLOCK = 32  # values a scale
ROWS = 1 << 18  # blocks dequantized at a time


class Mxfp4(Scheme):
    name = "mxfp4"
    roles = ("codes", "scales")
    markers = ("_blocks", "_scales")
    methods = ("mxfp4",)
    expert_major = True

    def part_name(self, name, role):
        return name + SUFFIXES[role]

    def find(self, tensors, config):
        if config.get("quant_method") not in (None, *self.methods):
            return
        for name, codes in tensors.items():
            if name.endswith("_scales") and name[:-len("_scales")] + "_blocks" not in tensors \
                    and tensors[name].dtype.name in ("uint8", "float8_e8m0fnu"):
                yield Partial([name], f"mxfp4 block scales without their codes {name[:-len('_scales')]}_blocks")
            if not name.endswith("_blocks") or codes.dtype.name != "uint8":
                continue
            base = name[:-len("_blocks")]
            scales = tensors.get(base + "_scales")
            if scales is None:
                yield Partial([name], f"mxfp4 codes without their block scales {base}_scales")
            elif len(codes.shape) != 4 or codes.shape[-1] != BLOCK // 2 or scales.shape != codes.shape[:-1] \
                    or scales.dtype.name not in ("uint8", "float8_e8m0fnu"):
                yield Partial([name, base + "_scales"], f"{name} {list(codes.shape)} with {base}_scales"
                              f" {list(scales.shape)} {scales.dtype}: not the [experts, out, blocks, 16] codes"
                              " and [experts, out, blocks] uint8 exponents of gpt-oss")
            else:
                experts, columns, blocks, _ = codes.shape
                yield Group(base, {"codes": name, "scales": base + "_scales"}, (experts, blocks * BLOCK, columns),
                            {"bits": 4, "block": [BLOCK, 1]})

    def dequantize(self, tensor):
        import torch

        from ..checkpoint.values import to_torch
        from ..dtypes import torch_dtype

        codes = to_torch(tensor.parts["codes"])
        exponents = to_torch(tensor.parts["scales"]).view(torch.uint8)
        experts, columns, blocks, _ = codes.shape
        out = torch.empty(tensor.shape, dtype=torch_dtype(tensor.dtype))
        step = max(1, ROWS // max(blocks, 1))  # outputs a chunk
        for expert in range(experts):
            for start in range(0, columns, step):
                values = e2m1(codes[expert, start:start + step])
                scaled = torch.ldexp(values, exponents[expert, start:start + step, :, None].to(torch.int32) - 127)
                out[expert, :, start:start + step] = scaled.view(values.shape[0], -1).t()
        return out


def e2m1(codes):
    """The float32 values of the e2m1 codes packed two a byte in ``codes`` (low nibble first):
    the last dimension doubled."""
    import torch

    table = torch.tensor(E2M1)
    values = torch.stack((table[(codes & 0x0F).long()], table[(codes >> 4).long()]), -1)
    return values.view(*codes.shape[:-1], codes.shape[-1] * 2)
