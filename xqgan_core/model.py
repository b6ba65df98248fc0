"""The tokenizer: encoder -> quantizer -> decoder, assembled from a run file's components."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .errors import ConfigError
from .interfaces import Decoder, Encoder, Indices, Quantizer, QuantOut, downsampled_grid


class TokenizerModel(nn.Module):
    """Images in [-1, 1] -> (reconstruction, QuantOut); ``encode``/``decode`` go through indices."""

    def __init__(self, encoder: Encoder, quantizer: Quantizer, decoder: Decoder) -> None:
        super().__init__()
        problems = []
        if getattr(encoder, "out_dim", None) != getattr(quantizer, "dim", None):
            problems.append(f"encoder.out_dim ({encoder.out_dim}) must equal the quantizer's dim ({quantizer.dim})")
        if getattr(decoder, "in_dim", None) != getattr(quantizer, "dim", None):
            problems.append(f"decoder.in_dim ({decoder.in_dim}) must equal the quantizer's dim ({quantizer.dim})")
        if problems:
            raise ConfigError(problems)
        self.encoder, self.quantizer, self.decoder = encoder, quantizer, decoder

    @property
    def downsample(self) -> int:
        return int(self.encoder.downsample)

    def latent_grid(self, height: int, width: int) -> tuple[int, int]:
        """The encoder's (h, w) token grid for ``height x width`` images; ValueError for a size it does not accept."""
        grid = getattr(self.encoder, "latent_grid", None)
        if callable(grid):
            h, w = grid(height, width)
            return int(h), int(w)
        return downsampled_grid(self.downsample, height, width)  # an encoder not derived from Encoder

    def forward(
        self, images: Tensor, return_latents: bool = False
    ) -> tuple[Tensor, QuantOut] | tuple[Tensor, QuantOut, Tensor]:
        """(reconstruction, QuantOut), plus the encoder's latents before quantization with ``return_latents``
        (aligners read them)."""
        latents = self.encoder(images)
        quant = self.quantizer(latents)
        recon = self.decoder(quant.z_q)
        return (recon, quant, latents) if return_latents else (recon, quant)

    @torch.no_grad()
    def encode(self, images: Tensor) -> Indices:
        return self.quantizer.codes_to_indices(self.encoder(images))

    @torch.no_grad()
    def decode(self, indices: Indices) -> Tensor:
        return self.decoder(self.quantizer.indices_to_codes(indices))
