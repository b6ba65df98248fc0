"""Vector quantization (XQ-GAN Sec. 4.1): each latent token is replaced by its nearest codebook entry.

``z' = argmin_j ||z - e_j||^2`` over a learned codebook ``{e_j}``. With ``l2_norm`` (the default, as in the
reference recipe) tokens and codebook rows are l2-normalised first, so the search is by cosine similarity and
every code lies on the unit sphere. Training signal: the codebook loss ``mean((z_q - sg z)^2)`` moves the codes,
the commitment loss ``beta * mean((sg z_q - z)^2)`` moves the encoder, and the straight-through estimator passes
the reconstruction gradient from ``z_q`` to the (normalised) input. No EMA updates, no entropy loss.

The codebook is ``self.embedding`` (an ``nn.Embedding``; state-dict key ``embedding.weight``, shape
``(codebook_size, dim)``). With ``l2_norm`` the stored rows are normalised on use, so the code of index ``i`` is
``normalize(embedding.weight[i])``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xqgan_core import at_least, config, option, positive
from xqgan_core.interfaces import Indices, QuantOut, Quantizer
from xqgan_core.quant_ops import (
    autocast_disabled,
    codebook_usage,
    commitment_losses,
    flatten_tokens,
    nearest_code,
    straight_through,
    unflatten_tokens,
)


class VectorQuantizer(Quantizer):
    """``forward(z (B, dim, H, W)) -> QuantOut(z_q, indices (B, H, W) int64, losses, stats)``."""

    plugin_api = 1

    @config
    class Config:
        codebook_size: int = option(4096, help="number of codebook entries", validator=positive())
        dim: int = option(8, help="code dimension = channels of the latent fed to the quantizer (8-64 typical)", validator=positive())
        beta: float = option(0.25, help="commitment loss weight: beta * mean((sg z_q - z)^2)", validator=at_least(0.0))
        l2_norm: bool = option(
            True, help="l2-normalise tokens and codebook rows; nearest code by cosine, codes on the unit sphere"
        )
        chunk_size: int = option(
            4096,
            help="tokens scored against the codebook at once; bounds the distance buffer to chunk_size x codebook_size",
            validator=positive(),
        )
        init_scale: float | None = option(
            None,
            help="codebook init U(-init_scale, init_scale); unset = 1/codebook_size. Rows are then l2-normalised "
            "if l2_norm, so the scale only matters without it",
            validator=positive(),
        )

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.dim = config.dim
        self.codebook_size = config.codebook_size
        self.embedding = nn.Embedding(config.codebook_size, config.dim)
        scale = config.init_scale if config.init_scale is not None else 1.0 / config.codebook_size
        with torch.no_grad():
            self.embedding.weight.uniform_(-scale, scale)
            if config.l2_norm:
                self.embedding.weight.copy_(F.normalize(self.embedding.weight, dim=1))

    def codebook(self) -> Tensor:
        """The effective codes ``(codebook_size, dim)`` in at least fp32 (normalised rows when ``l2_norm``)."""
        weight = self.embedding.weight
        weight = weight.to(torch.promote_types(weight.dtype, torch.float32))
        return F.normalize(weight, dim=1) if self.config.l2_norm else weight

    def forward(self, z: Tensor) -> QuantOut:
        if z.ndim != 4 or z.shape[1] != self.dim:
            raise ValueError(f"vq expects latents of shape (B, {self.dim}, H, W), got {tuple(z.shape)}")
        b, _, h, w = z.shape
        # Everything below runs in >= fp32 with autocast off: under bf16 autocast the nearest-code search and the
        # losses would otherwise lose precision. Only z_q is cast back to the input dtype.
        with autocast_disabled(z.device):
            flat = flatten_tokens(z)
            flat = flat.to(torch.promote_types(flat.dtype, torch.float32))
            if self.config.l2_norm:
                flat = F.normalize(flat, dim=1)
            codebook = self.codebook()
            idx = nearest_code(flat, codebook, self.config.chunk_size, normalized=self.config.l2_norm)
            z_f = unflatten_tokens(flat, (b, h, w))
            codes = unflatten_tokens(codebook[idx], (b, h, w))  # carries the gradient to the codebook
            losses = commitment_losses(z_f, codes, self.config.beta)
            # with l2_norm the gradient reaches z through the normalisation (as in the reference)
            z_q = straight_through(z_f, codes).to(z.dtype)
        indices = idx.view(b, h, w)
        return QuantOut(z_q=z_q, indices=indices, losses=losses, stats=codebook_usage(indices, self.codebook_size))

    def indices_to_codes(self, indices: Indices) -> Tensor:
        """``(B, H, W)`` indices -> ``(B, dim, H, W)`` codes (normalised rows when ``l2_norm``), in >= fp32."""
        if not isinstance(indices, Tensor) or indices.ndim != 3:
            raise ValueError("vq expects indices as one (B, H, W) tensor")
        return F.embedding(indices.long(), self.codebook()).permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        c = self.config
        return f"codebook_size={c.codebook_size}, dim={c.dim}, beta={c.beta}, l2_norm={c.l2_norm}"
