"""Building the timm ViT trunk from the shared options, and resampling its position embedding to other grids."""

from __future__ import annotations

import torch
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


#: std of the position embeddings under ``positional_init``: large against the content (about 0.4 after the patch
#: embedding), so that after each block's LayerNorm positions decide the attention
POSITIONAL_INIT_STD = 1.0


def check_positional_init(c: TrunkOptions, kind: str) -> None:
    problems = []
    if c.positional_init and c.init:
        problems.append(f"{kind}.positional_init is a random init: it cannot be combined with {kind}.init")
    if c.positional_init and c.embed_dim % 2:
        problems.append(f"{kind}.positional_init splits the channels in two halves: {kind}.embed_dim must be even")
    if problems:
        raise ConfigError(problems)


@torch.no_grad()
def positional_routing_init(trunk: VisionTransformer) -> None:
    """Channels [:D/2] carry positions, [D/2:] content: the position embedding lives in the first half; every
    head's query and key read the first half (W_q = W_k, so a token attends most to the tokens at its own position),
    its value reads the second half and the output projection writes back there (averaging the heads that read the
    same channels). The caller keeps its read-in / read-out maps on the content half."""
    d = trunk.embed_dim
    half = d // 2
    trunk.pos_embed.normal_(0.0, POSITIONAL_INIT_STD)
    trunk.pos_embed[..., half:] = 0
    source = torch.arange(d) % half  # head channel o reads position / content channel o mod D/2
    for block in trunk.blocks:
        qkv, proj = block.attn.qkv, block.attn.proj
        qkv.weight.zero_()
        qkv.weight[torch.arange(d), source] = 1.0          # queries
        qkv.weight[d + torch.arange(d), source] = 1.0      # keys
        qkv.weight[2 * d + torch.arange(d), half + source] = 1.0  # values
        proj.weight.zero_()
        proj.weight[half + source, torch.arange(d)] = half / d
        for bias in (qkv.bias, proj.bias):
            if bias is not None:
                bias.zero_()


def grid_positions(trunk: VisionTransformer, grid: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """The trunk's image-patch position embedding (on its ``grid``, without the class token's) resampled to
    ``size``: (1, h*w, D)."""
    patches = trunk.pos_embed[:, trunk.num_prefix_tokens:]
    if tuple(size) == tuple(grid):
        return patches
    return resample_abs_pos_embed(patches, new_size=list(size), old_size=list(grid), num_prefix_tokens=0)


def use_fused_attention(attention: str, x: Tensor) -> bool:
    """The ``attention`` option for input ``x``: "auto" is fused except under bf16 autocast on the CPU (there the
    CPU flash-attention kernel runs slower in bf16 than in fp32, while the math form's matrix products run about
    2x faster than fp32 ones)."""
    if attention != "auto":
        return attention == "fused"
    cpu_bf16 = (x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
                and torch.get_autocast_dtype("cpu") == torch.bfloat16)
    return not cpu_bf16


def run_blocks(trunk: VisionTransformer, x: Tensor, checkpointing: bool, attention: str = "auto") -> Tensor:
    """The trunk's blocks and final norm; with ``checkpointing`` each block is recomputed in backward.
    ``attention``: the kernel choice of :func:`use_fused_attention`."""
    fused = use_fused_attention(attention, x)
    for block in trunk.blocks:
        block.attn.fused_attn = fused  # timm's Attention reads it on every call, recomputation included
        x = checkpoint(block, x, use_reentrant=False) if checkpointing else block(x)
    return trunk.norm(x)
