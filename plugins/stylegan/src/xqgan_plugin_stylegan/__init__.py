"""StyleGAN2-style residual discriminator (one logit per image), as used by MaskBit and Open-MAGVIT2 tokenizers."""
