"""VQGAN-style CNN encoder: image (B, 3, H, W) -> latents (B, out_dim, H/2**(L-1), W/2**(L-1))."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from xqgan_core.config import at_least, config, option, positive
from xqgan_core.interfaces import Encoder

from .blocks import Downsample, Level, MidBlock, Normalize, run_stage
from .options import BackboneOptions


class CNNEncoder(Encoder):
    """conv_in -> levels of ResBlocks with a Downsample between them -> mid block (Res, Attn, Res)
    -> GroupNorm, swish, conv3x3 to ``z_channels`` -> 1x1 projection to ``out_dim`` (the quantizer's code dim)."""

    plugin_api = 1

    @config
    class Config(BackboneOptions):
        num_res_blocks: int = option(2, help="ResBlocks per resolution level", validator=at_least(1))
        out_dim: int = option(8, help="output channels = the quantizer's code dimension", validator=positive())

    @classmethod
    def config_downsample(cls, config: Config) -> int:
        # the stem folds patch_size x patch_size pixels; then one 2x Downsample between consecutive levels
        return config.patch_size * 2 ** (len(config.channel_mult) - 1)

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        c = config
        widths = [c.channels * m for m in c.channel_mult]
        n = len(widths)
        self.out_dim = c.out_dim
        self.downsample = self.config_downsample(c)

        # patch_size 1 adds no module, so the VQGAN layout's state dict is unchanged
        self.patchify = nn.PixelUnshuffle(c.patch_size) if c.patch_size > 1 else nn.Identity()
        self.conv_in = nn.Conv2d(3 * c.patch_size**2, c.channels, 3, padding=1)
        self.levels = nn.ModuleList(
            Level(
                in_channels=c.channels if i == 0 else widths[i - 1],
                out_channels=widths[i],
                num_res_blocks=c.num_res_blocks,
                dropout=c.dropout,
                attention=c.level_attention and i == n - 1,
                resample=Downsample if i < n - 1 else None,
            )
            for i in range(n)
        )
        self.mid = MidBlock(widths[-1], c.dropout, c.mid_attention)
        self.norm_out = Normalize(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], c.z_channels, 3, padding=1)
        self.quant_conv = nn.Conv2d(c.z_channels, c.out_dim, 1)

    def forward(self, images: Tensor) -> Tensor:
        self.latent_grid(*images.shape[-2:])  # ValueError for a size that is not a multiple of downsample
        ckpt = self.config.checkpointing and self.training
        x = self.conv_in(self.patchify(images))
        for level in self.levels:
            x = run_stage(level, x, ckpt)
        x = run_stage(self.mid, x, ckpt)
        return self.quant_conv(self.conv_out(F.silu(self.norm_out(x))))
