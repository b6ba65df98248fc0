"""ViT decoder with mask tokens: latents (B, in_dim, K, K) -> images (B, 3, S, S)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from xqgan_core.config import config, option, positive
from xqgan_core.interfaces import Decoder

from .options import TrunkOptions
from .trunk import (build_trunk, check_positional_init, check_trunk_options, grid_positions,
                    positional_routing_init, run_blocks)
from xqgan_core.timm_weights import load_trunk_weights


class ViTDecoder(Decoder):
    """A timm ViT over [CLS, (S/p)^2 mask tokens] ++ [CLS, K^2 latent tokens]; the mask tokens' outputs are mapped
    linearly to p x p x 3 pixels each and unpatchified.

    Each latent token is one position of the K x K grid with all ``in_dim`` channels (for a product quantizer: the
    P branches' codes of that position, concatenated), projected to the width by one linear map. The two parts
    carry the trunk's position embedding (resampled to K x K for the latents) and a level embedding (0 / 1).
    """

    plugin_api = 1

    @config
    class Config(TrunkOptions):
        in_dim: int = option(8, help="input channels = the quantizer's dim", validator=positive())

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        c = config
        check_trunk_options(c, "decoder")
        check_positional_init(c, "decoder")
        self.in_dim = c.in_dim
        self.grid = (c.image_size // c.patch_size,) * 2
        self.upsample_to = c.image_size

        self.trunk = build_trunk(c)
        load_trunk_weights(self.trunk, c.init, "decoder.init", skip=("patch_embed.",))
        self.trunk.patch_embed = nn.Identity()  # the decoder never sees pixels: no (unused) patch weights
        self.project_in = nn.Linear(c.in_dim, c.embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, c.embed_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.level_embed = nn.Embedding(2, c.embed_dim)  # 0: CLS + mask tokens, 1: CLS + latent tokens
        nn.init.trunc_normal_(self.level_embed.weight, std=0.02)
        self.to_pixels = nn.Linear(c.embed_dim, c.patch_size**2 * 3)
        if c.positional_init:
            positional_routing_init(self.trunk)
            with torch.no_grad():  # latents write content channels only, the pixels read content channels only
                half = c.embed_dim // 2
                self.project_in.weight[:half] = 0
                self.project_in.bias[:half] = 0
                self.to_pixels.weight[:, :half] = 0

    @property
    def last_layer(self) -> Tensor:
        return self.to_pixels.weight

    def forward(self, latents: Tensor) -> Tensor:
        if latents.ndim != 4 or latents.shape[1] != self.in_dim:
            raise ValueError(f"the vit decoder expects latents (B, {self.in_dim}, K, K), got {tuple(latents.shape)}")
        trunk, (g, _) = self.trunk, self.grid
        b, _, kh, kw = latents.shape
        cls = trunk.cls_token + trunk.pos_embed[:, :1]
        masks = self.mask_token + grid_positions(trunk, self.grid, self.grid)
        image_part = torch.cat([cls, masks], dim=1) + self.level_embed.weight[0]
        tokens = self.project_in(latents.flatten(2).transpose(1, 2))  # (B, K^2, D), row-major like the encoder
        latent_part = torch.cat([cls.expand(b, -1, -1), tokens + grid_positions(trunk, self.grid, (kh, kw))], dim=1)
        x = torch.cat([image_part.expand(b, -1, -1), latent_part + self.level_embed.weight[1]], dim=1)
        x = run_blocks(trunk, trunk.norm_pre(x), self.config.checkpointing and self.training,
                       self.config.attention)
        pixels = self.to_pixels(x[:, 1:1 + g * g])  # (B, g^2, p*p*3)
        p = self.config.patch_size
        return pixels.view(b, g, g, p, p, 3).permute(0, 5, 1, 3, 2, 4).reshape(b, 3, g * p, g * p)
