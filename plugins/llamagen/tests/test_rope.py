"""2-D rotary embeddings: attention scores depend on the row and column offsets of two grid cells, nothing else."""

from __future__ import annotations

import torch

from xqgan_plugin_llamagen.rope import apply_rotary, grid_angles

WIDTH = 7  # grid columns


def _score(q: torch.Tensor, k: torch.Tensor, cell_q: tuple[int, int], cell_k: tuple[int, int]) -> float:
    cells = torch.tensor([r * WIDTH + c for r, c in (cell_q, cell_k)])
    angles = grid_angles(cells, WIDTH, q.shape[-1], 100.0)
    x = apply_rotary(torch.stack([q, k])[None, None], angles.cos(), angles.sin())[0, 0]
    return float(x[0] @ x[1])


def test_scores_depend_on_the_2d_offset_only() -> None:
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(16, generator=g, dtype=torch.float64), torch.randn(16, generator=g, dtype=torch.float64)
    base = _score(q, k, (1, 2), (3, 1))
    shifted = _score(q, k, (2, 5), (4, 4))  # both cells moved by (+1, +3): same offset
    assert abs(base - shifted) < 1e-5
    # the same raster distance (13) with another 2-D offset, (1, 6) instead of (2, -1), scores differently
    assert abs(base - _score(q, k, (1, 0), (2, 6))) > 1e-3
    # rows and columns are different axes: offset (2, -1) is not offset (-1, 2)
    assert abs(base - _score(q, k, (3, 1), (2, 3))) > 1e-3
