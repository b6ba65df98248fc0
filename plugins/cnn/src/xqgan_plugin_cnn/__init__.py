"""VQGAN-style convolutional encoder/decoder (the taming/LlamaGen recipe used by XQ-GAN-V)."""

from __future__ import annotations

__all__ = ["CNNDecoder", "CNNEncoder"]


def __getattr__(name: str) -> object:
    # Lazy so that reading entry-point metadata never imports torch.
    if name == "CNNEncoder":
        from .encoder import CNNEncoder

        return CNNEncoder
    if name == "CNNDecoder":
        from .decoder import CNNDecoder

        return CNNDecoder
    raise AttributeError(name)
