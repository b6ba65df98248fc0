"""ViT encoder with learned latent queries: image (B, 3, S, S) -> latents (B, P * code_dim, K, K)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from xqgan_core.config import config, option, positive
from xqgan_core.errors import ConfigError
from xqgan_core.interfaces import Encoder

from .options import TrunkOptions
from .trunk import (build_trunk, check_positional_init, check_trunk_options, grid_positions,
                    positional_routing_init, run_blocks)
from xqgan_core.timm_weights import load_trunk_weights

#: std of the latent queries' initialisation: tiny, so they start as (almost) pure position + level embeddings
QUERY_INIT_STD = 1e-6


class ViTEncoder(Encoder):
    """A timm ViT over [CLS, image patches, P*K^2 learned latent queries]; the last P*K^2 output tokens, projected to
    ``out_dim / P`` channels by one linear map shared by all branches, are the latents.

    Layout for a product quantizer: branch i's K^2 tokens form channel group i of the output, i.e. latents
    ``(B, P * code_dim, K, K)`` with ``[:, i*code_dim:(i+1)*code_dim]`` = branch i's K x K token grid. ``pq`` with
    ``branches = P`` splits channels into the same groups, so its branch i quantizes exactly the tokens of branch i.
    """

    plugin_api = 1

    @config
    class Config(TrunkOptions):
        latent_size: int = option(11, help="side K of each branch's K x K grid of latent queries", validator=positive())
        branches: int = option(
            1, help="number of latent-query branches P (= the product quantizer's branches); branch i is channel "
            "group i of the output", validator=positive())
        out_dim: int = option(
            8, help="output channels = the quantizer's dim = branches * code dimension (pq: branches * branch.dim)",
            validator=positive())

    @classmethod
    def config_downsample(cls, config: Config) -> int | None:
        # the latent grid is latent_size x latent_size whatever the patch grid: no fixed pixels-per-token factor
        return None

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        c = config
        check_trunk_options(c, "encoder")
        check_positional_init(c, "encoder")
        if c.out_dim % c.branches:
            raise ConfigError([f"encoder.out_dim ({c.out_dim}) must be a multiple of encoder.branches ({c.branches})"])
        self.out_dim = c.out_dim
        self.code_dim = c.out_dim // c.branches
        # pixels per latent side, only exact when latent_size divides image_size; the token grid is latent_grid()
        self.downsample = max(c.image_size // c.latent_size, 1)
        self.grid = (c.image_size // c.patch_size,) * 2
        self.query_grid = (c.latent_size, c.latent_size)

        self.trunk = build_trunk(c)
        load_trunk_weights(self.trunk, c.init, "encoder.init")
        self.latent_queries = nn.Parameter(torch.randn(1, c.branches * c.latent_size**2, c.embed_dim) * QUERY_INIT_STD)
        # level 0: CLS and image tokens; level i + 1: the queries of branch i
        self.level_embed = nn.Embedding(1 + c.branches, c.embed_dim)
        nn.init.trunc_normal_(self.level_embed.weight, std=0.02)
        self.project = nn.Linear(c.embed_dim, self.code_dim)
        if c.positional_init:
            positional_routing_init(self.trunk)
            with torch.no_grad():  # patches write content channels only, the latents read content channels only
                half = c.embed_dim // 2
                self.trunk.patch_embed.proj.weight[:half] = 0
                if self.trunk.patch_embed.proj.bias is not None:
                    self.trunk.patch_embed.proj.bias[:half] = 0
                self.project.weight[:, :half] = 0

    def latent_grid(self, height: int, width: int) -> tuple[int, int]:
        """K x K (``latent_size``) for images of exactly ``image_size``; ValueError for any other size."""
        c = self.config
        if (height, width) != (c.image_size, c.image_size):
            raise ValueError(
                f"the vit encoder runs at encoder.image_size = {c.image_size}, got images of {height}x{width}: "
                f"resize to {c.image_size}x{c.image_size}")
        return self.query_grid

    def forward(self, images: Tensor) -> Tensor:
        c = self.config
        self.latent_grid(*images.shape[-2:])  # raises for any size but image_size
        b, p, k2 = images.shape[0], c.branches, c.latent_size**2
        trunk = self.trunk
        image_tokens = trunk._pos_embed(trunk.patch_embed(images)) + self.level_embed.weight[0]  # CLS + patches
        query_pos = grid_positions(trunk, self.grid, self.query_grid).repeat(1, p, 1)
        query_levels = self.level_embed.weight[1:].repeat_interleave(k2, dim=0)
        queries = (self.latent_queries + query_pos + query_levels).expand(b, -1, -1)
        x = trunk.norm_pre(torch.cat([image_tokens, queries], dim=1))
        x = run_blocks(trunk, x, self.config.checkpointing and self.training,
                       self.config.attention)
        latents = self.project(x[:, -p * k2:])  # (B, P*K^2, code_dim), branch-major
        k = c.latent_size
        return latents.view(b, p, k, k, self.code_dim).permute(0, 1, 4, 2, 3).reshape(b, p * self.code_dim, k, k)
