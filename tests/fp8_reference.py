"""DeepSeek-V3's fp8-block layout computed here, independently of paramsurgeon: the ground truth of
the quantized tests. Codes and scales tile by tile (scale_inv = amax / 448, an all-zero tile scale 1,
codes rounded to e4m3), and ``weight_dequant`` on the CPU (each code times its tile's scale in float32,
rounded to the dtype)."""

import torch

BLOCK = 128


def quantize(weight: torch.Tensor, block: int | tuple[int, int] = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's layout, tile by tile (``block``: its side, or (rows, columns)): scale_inv = amax / 448
    (1 for an all-zero tile), codes in e4m3."""
    (bm, bn), (rows, columns) = _sides(block), weight.shape
    scale = torch.empty(-(-rows // bm), -(-columns // bn))
    codes = torch.empty(rows, columns, dtype=torch.float8_e4m3fn)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            tile = weight[i * bm:(i + 1) * bm, j * bn:(j + 1) * bn].float()
            amax = tile.abs().max()
            scale[i, j] = amax / 448 if amax > 0 else 1.0
            codes[i * bm:(i + 1) * bm, j * bn:(j + 1) * bn] = (tile / scale[i, j]).to(torch.float8_e4m3fn)
    return codes, scale


def dequantize(codes: torch.Tensor, scale: torch.Tensor, dtype=torch.bfloat16,
               block: int | tuple[int, int] = BLOCK) -> torch.Tensor:
    """DeepSeek's weight_dequant on the CPU: each code times its tile's scale, in float32, then ``dtype``."""
    (bm, bn), out = _sides(block), torch.empty(codes.shape)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            tile = (slice(i * bm, (i + 1) * bm), slice(j * bn, (j + 1) * bn))
            out[tile] = codes[tile].float() * scale[i, j]
    return out.to(dtype)


def _sides(block: int | tuple[int, int]) -> tuple[int, int]:
    return (block, block) if isinstance(block, int) else block
