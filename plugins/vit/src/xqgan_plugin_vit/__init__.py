"""ViT encoder with learned latent queries and ViT decoder with mask tokens (the XQ-GAN-SC backbone), on timm."""

from __future__ import annotations

__all__ = ["ViTDecoder", "ViTEncoder"]


def __getattr__(name: str) -> object:
    # Lazy so that reading entry-point metadata never imports torch or timm.
    if name == "ViTEncoder":
        from .encoder import ViTEncoder

        return ViTEncoder
    if name == "ViTDecoder":
        from .decoder import ViTDecoder

        return ViTDecoder
    raise AttributeError(name)
