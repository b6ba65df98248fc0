"""xqgan quantizer plugin ``vq``: vector quantization with a learned codebook."""

from __future__ import annotations

__all__ = ["VectorQuantizer"]


def __getattr__(name: str) -> object:
    # lazy, so that importing the package (e.g. for metadata) does not import torch
    if name == "VectorQuantizer":
        from .quantizer import VectorQuantizer

        return VectorQuantizer
    raise AttributeError(name)
