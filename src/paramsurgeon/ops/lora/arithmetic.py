"""PEFT's merge arithmetic (tuners/lora/layer.py ``get_delta_weight``, dora.py), in float32.

Layouts: ``linear`` (nn.Linear, weight (out, in)); ``transposed`` (GPT-2 Conv1D, fan_in_fan_out:
weight (in, out)); ``embedding`` (weight (num, dim), delta ``(B @ A).T``); ``conv`` (Conv1d/2d/3d,
weight (out, in, *kernel), A (r, in, *kernel), B (out, r, 1...)). DoRA rescales each output row
(embedding: each column) of ``W + dW`` to the learned magnitude: ``m / ||W + dW||``.
"""

from __future__ import annotations

import math

import torch

from ...checkpoint.values import computable

CHUNK = 1 << 22  # elements of a weight merged at a time (16 MiB of float32)


def delta(layout: str, a: torch.Tensor, b: torch.Tensor, scaling: float, rows: slice = slice(None)) -> torch.Tensor:
    """Rows ``rows`` of ``dW`` in the base weight's own layout, float32."""
    a, b = a.float(), b.float()
    if layout == "conv":
        r = a.shape[0]
        part = b[rows]
        product = (part.reshape(part.shape[0], r) @ a.reshape(r, -1)).reshape(part.shape[0], *a.shape[1:])
    elif layout in ("transposed", "embedding"):
        product = a[:, rows].T @ b.T  # (B @ A).T, contiguous
    else:
        product = b[rows] @ a
    return product.mul_(scaling)


def merge(layout: str, weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float,
          magnitude: torch.Tensor | None, dtype: torch.dtype) -> tuple[torch.Tensor, float, float]:
    """The merged weight in ``dtype``, computed in float32 a block of rows at a time (a DoRA
    magnitude over columns needs them all at once), and its float32 minimum and maximum."""
    low, high = math.inf, -math.inf
    if magnitude is not None and layout in ("transposed", "embedding"):
        blocks = [slice(None)]
    else:
        per = max(1, CHUNK // max(1, weight[0].numel())) if weight.dim() else 1
        blocks = [slice(i, i + per) for i in range(0, weight.shape[0], per)]
    out = torch.empty(weight.shape, dtype=dtype)
    for rows in blocks:
        values = merged(layout, weight[rows], a, b, scaling, magnitude, rows)
        if values.numel():
            least, most = torch.aminmax(values)
            low, high = min(low, float(least)), max(high, float(most))
            if math.isnan(float(least)) or math.isnan(float(most)):
                low = high = math.nan
        out[rows] = values
    del values
    _release()
    return out, low, high


def _release() -> None:
    """Give the freed float32 blocks back to the system (glibc keeps them in its heap otherwise, and
    the resident memory of a merge would grow with the number of tensors)."""
    if _TRIM is not None:
        _TRIM(0)


def _malloc_trim():
    import ctypes

    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_TRIM = _malloc_trim()


def merged(layout: str, weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float,
           magnitude: torch.Tensor | None = None, rows: slice = slice(None)) -> torch.Tensor:
    """Rows ``rows`` of ``W + dW`` in float32 (``weight``: those rows), or with a DoRA ``magnitude``,
    ``m / ||W + dW|| * (W + dW)``."""
    result = delta(layout, a, b, scaling, rows).add_(computable(weight))  # float8: as float32
    if magnitude is None:
        return result
    m = magnitude.float().reshape(-1)
    m = m if layout in ("transposed", "embedding") else m[rows]
    if layout == "linear":
        norm, shape = torch.linalg.norm(result, dim=1), (-1, 1)
    elif layout in ("transposed", "embedding"):  # stored (in, out) / (num, dim): one column per output
        norm, shape = torch.linalg.norm(result, dim=0), (1, -1)
    else:
        norm, shape = result.norm(p=2, dim=tuple(range(1, result.dim()))), (-1,) + (1,) * (result.dim() - 1)
    return result.mul_((m / norm).reshape(shape))


def bias(base: torch.Tensor, lora_bias: torch.Tensor, scaling: float) -> torch.Tensor:
    """``b + lora_B.bias * scaling`` (lora_bias), float32."""
    return lora_bias.float().mul(scaling).add_(computable(base))


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
