"""fp8-block: DeepSeek-V3/R1, Qwen3-FP8, Kimi-K2. ``W`` float8_e4m3fn [M, N] with ``W_scale_inv``
float32 [ceil(M/bm), ceil(N/bn)]; a value is float(code) * scale_inv of its tile (edge tiles
partial), as DeepSeek's ``weight_dequant`` computes it (float32 product, rounded to the dtype)."""

from __future__ import annotations

from .base import Group, Partial, Scheme
from .tiles import grid
from .widen import widen_into

SUFFIX = "_scale_inv"
BLOCK = (128, 128)  # weight_block_size when the config gives none
E4M3_MAX = 448.0
ROWS = 1 << 18  # float32 elements worked at a time (1 MiB: the band stays in cache)


class Fp8Block(Scheme):
    name = "fp8-block"
    roles = ("codes", "scale_inv")
    markers = (SUFFIX,)
    methods = ("fp8",)
    quantizes = True
    scales = ("scale_inv",)

    def part_name(self, name, role):
        return name if role == "codes" else name + SUFFIX

    def find(self, tensors, config):
        block = _block(config)
        for name, scale in tensors.items():
            if not name.endswith(SUFFIX):
                continue
            weight_name = name[:-len(SUFFIX)]
            weight = tensors.get(weight_name)
            if weight is None:
                yield Partial([name], f"a block scale without its weight {weight_name}")
            elif weight.dtype.name != "float8_e4m3fn" or len(weight.shape) != 2:
                yield Partial([weight_name, name], f"{weight_name} is {list(weight.shape)} {weight.dtype}, not the"
                              " 2-D float8_e4m3fn codes a block scale goes with")
            elif tuple(scale.shape) != grid(weight.shape, block) or not scale.dtype.floating:
                yield Partial([weight_name, name], f"the scale grid {list(scale.shape)} {scale.dtype} does not fit"
                              f" {list(weight.shape)} in {block[0]}x{block[1]} blocks (expected"
                              f" {list(grid(weight.shape, block))} float32)")
            else:
                yield Group(weight_name, {"codes": weight_name, "scale_inv": name}, weight.shape,
                            {"bits": 8, "block": list(block)})
        if config.get("quant_method") == "fp8" or any(name.endswith(SUFFIX) for name in tensors):
            for name, weight in tensors.items():  # this layout's codes: each needs its block scale
                if weight.dtype.name == "float8_e4m3fn" and name + SUFFIX not in tensors:
                    yield Partial([name], f"float8 codes without their block scale {name + SUFFIX}")

    def dequantize(self, tensor):
        import torch

        from ..dtypes import torch_dtype

        out = torch.empty(tensor.shape, dtype=torch_dtype(tensor.dtype))
        for start, band in _bands(tensor):
            out[start:start + len(band)].copy_(band)
        return out

    def pieces(self, tensor):
        from ..dtypes import torch_dtype

        dtype = torch_dtype(tensor.dtype)
        return (band.to(dtype, copy=True) for _, band in _bands(tensor))

    def layout(self, shape, params):
        return {"codes": (tuple(shape), "float8_e4m3fn"), "scale_inv": (grid(shape, params["block"]), "float32")}

    def quantization_config(self, params):
        return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                "weight_block_size": list(params["block"])}

    def quantize(self, values, params):
        import torch

        bm, bn = params.get("block", BLOCK)
        rows, columns = values.shape
        scale = torch.empty(grid((rows, columns), (bm, bn)), dtype=torch.float32)
        codes = torch.empty((rows, columns), dtype=torch.float8_e4m3fn)
        padded = scale.shape[1] * bn
        for i, start in enumerate(range(0, rows, bm)):
            band = torch.nn.functional.pad(values[start:start + bm].float(), (0, padded - columns))
            tiles = band.view(band.shape[0], -1, bn)
            amax = tiles.abs().amax(dim=(0, 2))
            scale[i] = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
            codes[start:start + bm] = (tiles / scale[i][None, :, None]).view(band.shape)[:, :columns].to(
                torch.float8_e4m3fn)
        return {"codes": codes, "scale_inv": scale}


def _bands(tensor):
    """(first row, float32 values) of each band of whole tile rows of ``tensor``, a few MiB at a
    time, in one buffer reused from band to band."""
    import torch

    from ..checkpoint.values import to_torch

    codes, scale = to_torch(tensor.parts["codes"]), to_torch(tensor.parts["scale_inv"]).float()
    rows, columns = codes.shape
    bm, bn = min(tensor.params["block"][0], rows), min(tensor.params["block"][1], columns)  # the same grid
    step = max(bm, ROWS // max(columns, 1) // bm * bm)  # whole tiles of rows, a few MiB of float32
    work = torch.empty(min(step, rows) * columns)
    for start in range(0, rows, step):
        count = min(step, rows - start)
        band, tiles = work[:count * columns].view(count, columns), scale[start // bm:-(-(start + count) // bm)]
        widen_into(band, codes[start:start + count])
        if count % bm == 0 and columns % bn == 0:  # whole tiles: each scale broadcast over its tile
            band.view(count // bm, bm, columns // bn, bn).mul_(tiles[:, None, :, None])
        else:
            band.mul_(tiles.repeat_interleave(bm, 0)[:count].repeat_interleave(bn, 1)[:, :columns])
        yield start, band


def _block(config: dict) -> tuple[int, int]:
    size = config.get("weight_block_size") if config.get("quant_method") == "fp8" else None
    if isinstance(size, list) and len(size) == 2 and all(isinstance(n, int) and n > 0 for n in size):
        return size[0], size[1]
    return BLOCK
