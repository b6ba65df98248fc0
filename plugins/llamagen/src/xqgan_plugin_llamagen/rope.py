"""2-D rotary position embeddings over a token grid (RoFormer's rotation, one half of the pairs per grid axis).

A head of width ``d`` is split into ``d / 2`` pairs ``(x[j], x[j + d/2])`` ("rotate half" pairing); the first
``d / 4`` pairs rotate by the row of the token's grid cell, the last ``d / 4`` by its column, each axis with the
usual geometric frequencies ``base^(-i / (d/4))``. Attention scores then depend on the row and column offsets
between two cells, not on their raster distance, which is what an image grid wants.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["grid_angles", "apply_rotary"]


def grid_angles(cells: Tensor, grid_width: int, head_dim: int, base: float) -> Tensor:
    """Rotation angles ``(T, head_dim / 2)`` float32 on the CPU for ``cells`` ``(T,)``, raster indices into a grid
    ``grid_width`` wide. ``head_dim`` must be a multiple of 4 (two axes, pairs of channels). Computed in float64 on
    the CPU (not every accelerator has float64), for angles exact to float32 on long sequences."""
    if head_dim % 4:
        raise ValueError(f"2-D rotary embeddings need a head width divisible by 4, got {head_dim}")
    quarter = head_dim // 4
    freqs = base ** (-torch.arange(quarter, dtype=torch.float64) / quarter)
    cells = cells.cpu()
    rows = torch.div(cells, grid_width, rounding_mode="floor").to(torch.float64)
    cols = (cells % grid_width).to(torch.float64)
    return torch.cat([rows[:, None] * freqs, cols[:, None] * freqs], dim=-1).float()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` ``(B, heads, T, d)`` by angles whose cosines and sines are ``(T, d / 2)``; computed in at
    least float32 (rotations in bf16 lose the position signal on long sequences), returned in ``x``'s dtype."""
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    half = xf.shape[-1] // 2
    x1, x2 = xf[..., :half], xf[..., half:]
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.to(x.dtype)
