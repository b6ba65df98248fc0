"""VQGAN-style CNN decoder: latents (B, in_dim, h, w) -> images (B, 3, h*2**(L-1), w*2**(L-1))."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from xqgan_core.config import at_least, config, option, positive
from xqgan_core.interfaces import Decoder

from .blocks import Level, MidBlock, Normalize, Upsample, run_stage
from .options import BackboneOptions


class CNNDecoder(Decoder):
    """1x1 projection from ``in_dim`` to ``z_channels`` -> conv_in -> mid block (Res, Attn, Res) -> levels from the
    lowest resolution up, with nearest-2x + conv3x3 Upsample between them -> GroupNorm, swish, conv3x3 to RGB.

    The output is not squashed (no tanh): images are nominally in [-1, 1]; the engine clamps them for metrics
    and saving, and the reconstruction losses see the raw values.
    """

    plugin_api = 1

    @config
    class Config(BackboneOptions):
        num_res_blocks: int = option(3, help="ResBlocks per resolution level", validator=at_least(1))
        in_dim: int = option(8, help="input channels = the quantizer's code dimension", validator=positive())

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        c = config
        widths = [c.channels * m for m in c.channel_mult]
        n = len(widths)
        self.in_dim = c.in_dim
        self.upsample = c.patch_size * 2 ** (n - 1)

        self.post_quant_conv = nn.Conv2d(c.in_dim, c.z_channels, 1)
        self.conv_in = nn.Conv2d(c.z_channels, widths[-1], 3, padding=1)
        self.mid = MidBlock(widths[-1], c.dropout, c.mid_attention)
        # levels[0] is the lowest resolution (widest); widths walk back down channel_mult.
        self.levels = nn.ModuleList(
            Level(
                in_channels=widths[n - i] if i > 0 else widths[-1],
                out_channels=widths[n - 1 - i],
                num_res_blocks=c.num_res_blocks,
                dropout=c.dropout,
                attention=c.level_attention and i == 0,
                resample=Upsample if i < n - 1 else None,
            )
            for i in range(n)
        )
        self.norm_out = Normalize(widths[0])
        self.conv_out = nn.Conv2d(widths[0], 3 * c.patch_size**2, 3, padding=1)
        self.unpatchify = nn.PixelShuffle(c.patch_size) if c.patch_size > 1 else nn.Identity()

    @property
    def last_layer(self) -> Tensor:
        return self.conv_out.weight

    def forward(self, latents: Tensor) -> Tensor:
        ckpt = self.config.checkpointing and self.training
        x = self.conv_in(self.post_quant_conv(latents))
        x = run_stage(self.mid, x, ckpt)
        for level in self.levels:
            x = run_stage(level, x, ckpt)
        return self.unpatchify(self.conv_out(F.silu(self.norm_out(x))))
