"""DINO discriminator: trainable heads on the features of a frozen DINO ViT-S/16 (timm)."""

from __future__ import annotations

__all__ = ["DinoDiscriminator"]


def __getattr__(name: str) -> object:
    # Lazy so that reading entry-point metadata never imports torch or timm.
    if name == "DinoDiscriminator":
        from .discriminator import DinoDiscriminator

        return DinoDiscriminator
    raise AttributeError(name)
