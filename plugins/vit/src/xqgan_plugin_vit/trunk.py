"""Building the timm ViT trunk from the shared options, and resampling its position embedding to other grids."""

from __future__ import annotations

from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from xqgan_core.errors import ConfigError

from .options import TrunkOptions


def check_trunk_options(c: TrunkOptions, kind: str) -> None:
    problems = []
    if c.image_size % c.patch_size:
        problems.append(f"{kind}.image_size ({c.image_size}) must be a multiple of {kind}.patch_size ({c.patch_size})")
    if c.embed_dim % c.num_heads:
        problems.append(f"{kind}.num_heads ({c.num_heads}) must divide {kind}.embed_dim ({c.embed_dim})")
    if problems:
        raise ConfigError(problems)


def build_trunk(c: TrunkOptions) -> VisionTransformer:
    """A class-token ViT without a head: patch_embed, cls_token, pos_embed (1 + grid^2 positions), blocks, norm."""
    return VisionTransformer(
        img_size=c.image_size,
        patch_size=c.patch_size,
        embed_dim=c.embed_dim,
        depth=c.depth,
        num_heads=c.num_heads,
        mlp_ratio=c.mlp_ratio,
        init_values=c.layer_scale or None,
        drop_path_rate=c.drop_path,
        num_classes=0,
        global_pool="",
    )


def grid_positions(trunk: VisionTransformer, grid: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """The trunk's image-patch position embedding (on its ``grid``, without the class token's) resampled to
    ``size``: (1, h*w, D)."""
    patches = trunk.pos_embed[:, trunk.num_prefix_tokens:]
    if tuple(size) == tuple(grid):
        return patches
    return resample_abs_pos_embed(patches, new_size=list(size), old_size=list(grid), num_prefix_tokens=0)


def run_blocks(trunk: VisionTransformer, x: Tensor, checkpointing: bool) -> Tensor:
    """The trunk's blocks and final norm; with ``checkpointing`` each block is recomputed in backward."""
    for block in trunk.blocks:
        x = checkpoint(block, x, use_reentrant=False) if checkpointing else block(x)
    return trunk.norm(x)
