"""PEFT's merge arithmetic (tuners/lora/layer.py ``get_delta_weight``, dora.py), in float32.

Layouts: ``linear`` (nn.Linear, weight (out, in)); ``transposed`` (GPT-2 Conv1D, fan_in_fan_out:
weight (in, out)); ``embedding`` (weight (num, dim), delta ``(B @ A).T``); ``conv`` (Conv1d/2d/3d,
weight (out, in, *kernel), A (r, in, *kernel), B (out, r, 1...)). DoRA rescales each output row
(embedding: each column) of ``W + dW`` to the learned magnitude: ``m / ||W + dW||``.
"""

from __future__ import annotations

import torch


def delta(layout: str, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``dW`` in the base weight's own layout, float32."""
    a, b = a.float(), b.float()
    if layout == "conv":
        r = a.shape[0]
        product = (b.reshape(b.shape[0], r) @ a.reshape(r, -1)).reshape(b.shape[0], *a.shape[1:])
    else:
        product = a.T @ b.T if layout in ("transposed", "embedding") else b @ a  # (B @ A).T, contiguous
    return product.mul_(scaling)


def merged(layout: str, weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float,
           magnitude: torch.Tensor | None = None) -> torch.Tensor:
    """``W + dW`` in float32, or with a DoRA ``magnitude``, ``m / ||W + dW|| * (W + dW)``."""
    result = delta(layout, a, b, scaling).add_(weight)
    if magnitude is None:
        return result
    m = magnitude.float().reshape(-1)
    if layout == "linear":
        norm, shape = torch.linalg.norm(result, dim=1), (-1, 1)
    elif layout in ("transposed", "embedding"):  # stored (in, out) / (num, dim): one column per output
        norm, shape = torch.linalg.norm(result, dim=0), (1, -1)
    else:
        norm, shape = result.norm(p=2, dim=tuple(range(1, result.dim()))), (-1,) + (1,) * (result.dim() - 1)
    return result.mul_((m / norm).reshape(shape))


def bias(base: torch.Tensor, lora_bias: torch.Tensor, scaling: float) -> torch.Tensor:
    """``b + lora_B.bias * scaling`` (lora_bias), float32."""
    return lora_bias.float().mul(scaling).add_(base)


def svd_pair(difference: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """B (m, r) and A (r, n) with ``B @ A`` the best rank-``rank`` approximation of the 2-D
    ``difference`` (``B = U_r sqrt(S_r)``, ``A = sqrt(S_r) Vh_r``), and the relative error
    ``||difference - B A|| / ||difference||``."""
    d = difference.float()
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    b, a = u[:, :r] * root, root[:, None] * vh[:r]
    total = float(torch.linalg.norm(s))
    rest = float(torch.linalg.norm(s[r:])) if r < s.numel() else 0.0
    return b.contiguous(), a.contiguous(), (rest / total if total else 0.0)
