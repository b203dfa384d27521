"""DeepSeek-V3's fp8-block layout computed here, independently of paramsurgeon: the ground truth of
the quantized tests. Codes and scales tile by tile (scale_inv = amax / 448, an all-zero tile scale 1,
codes rounded to e4m3), and ``weight_dequant`` on the CPU (each code times its tile's scale in float32,
rounded to the dtype)."""

import torch

BLOCK = 128


def quantize(weight: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's layout, tile by tile: scale_inv = amax / 448 (1 for an all-zero tile), codes in e4m3."""
    rows, columns = weight.shape
    scale = torch.empty(-(-rows // block), -(-columns // block))
    codes = torch.empty(rows, columns, dtype=torch.float8_e4m3fn)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            tile = weight[i * block:(i + 1) * block, j * block:(j + 1) * block].float()
            amax = tile.abs().max()
            scale[i, j] = amax / 448 if amax > 0 else 1.0
            codes[i * block:(i + 1) * block, j * block:(j + 1) * block] = (tile / scale[i, j]).to(torch.float8_e4m3fn)
    return codes, scale


def dequantize(codes: torch.Tensor, scale: torch.Tensor, dtype=torch.bfloat16, block: int = BLOCK) -> torch.Tensor:
    """DeepSeek's weight_dequant on the CPU: each code times its tile's scale, in float32, then ``dtype``."""
    out = torch.empty(codes.shape)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            tile = (slice(i * block, (i + 1) * block), slice(j * block, (j + 1) * block))
            out[tile] = codes[tile].float() * scale[i, j]
    return out.to(dtype)
