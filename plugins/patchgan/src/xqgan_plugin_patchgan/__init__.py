"""PatchGAN discriminator plugin for xqgan."""

from .discriminator import PatchGANDiscriminator

__all__ = ["PatchGANDiscriminator"]
