"""``positional_init``: a random init under which latent queries start by reading the image patch at their position
and mask tokens the latent token at theirs (the routing a random ViT otherwise learns slowly)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from xqgan_core import ConfigError, build

# a 4x4 patch grid and a 4x4 query grid: query (i, j) has the position of patch (i, j)
TRUNK: dict[str, Any] = {"image_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2,
                         "layer_scale": 0.0}
GRID = 4


def _encoder(positional: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    return build("encoder", {"use": "vit", **TRUNK, "latent_size": GRID, "branches": 2, "out_dim": 8,
                             "positional_init": positional}).eval()


def _decoder(positional: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    return build("decoder", {"use": "vit", **TRUNK, "in_dim": 8, "positional_init": positional}).eval()


def _share_at_own_position(changes: torch.Tensor) -> float:
    """changes[j, k]: how much position k of the output moved when input position j was changed. The mean share of
    each row that lands on its own position."""
    return float((changes.diagonal() / changes.sum(dim=1)).mean())


@torch.no_grad()
def _encoder_changes(encoder: torch.nn.Module) -> torch.Tensor:
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    base = encoder(x)
    rows = []
    for j in range(GRID * GRID):
        y = x.clone()
        r, c = divmod(j, GRID)
        y[..., r * 8:(r + 1) * 8, c * 8:(c + 1) * 8] *= -1  # change the pixels of patch j only
        rows.append((encoder(y) - base).abs().sum(dim=1).flatten())  # per latent position (both branches)
    return torch.stack(rows)


@torch.no_grad()
def _decoder_changes(decoder: torch.nn.Module) -> torch.Tensor:
    z = torch.randn(1, 8, GRID, GRID, generator=torch.Generator().manual_seed(1))
    base = decoder(z)
    rows = []
    for j in range(GRID * GRID):
        w = z.clone()
        w[..., j // GRID, j % GRID] *= -1  # change latent token j only
        moved = (decoder(w) - base).abs().sum(dim=1)[0]  # (32, 32)
        rows.append(moved.view(GRID, 8, GRID, 8).sum(dim=(1, 3)).flatten())  # per output patch
    return torch.stack(rows)


def test_queries_start_by_reading_the_patch_at_their_position() -> None:
    routed, plain = _encoder_changes(_encoder(True)), _encoder_changes(_encoder(False))
    assert torch.equal(routed.argmax(dim=1), torch.arange(GRID * GRID))
    assert _share_at_own_position(routed) > 0.5 > 3 * _share_at_own_position(plain)


def test_mask_tokens_start_by_reading_the_latent_token_at_their_position() -> None:
    routed, plain = _decoder_changes(_decoder(True)), _decoder_changes(_decoder(False))
    assert torch.equal(routed.argmax(dim=1), torch.arange(GRID * GRID))
    assert _share_at_own_position(routed) > 0.5 > 3 * _share_at_own_position(plain)


def test_positional_init_is_off_by_default_and_refuses_loaded_weights_and_odd_widths() -> None:
    assert build("encoder", {"use": "vit", **TRUNK}).config.positional_init is False
    with pytest.raises(ConfigError, match="encoder.positional_init"):
        build("encoder", {"use": "vit", **TRUNK, "positional_init": True, "init": "some-weights.safetensors"})
    with pytest.raises(ConfigError, match="decoder.embed_dim must be even"):
        build("decoder", {"use": "vit", **TRUNK, "embed_dim": 33, "num_heads": 3, "positional_init": True})
