"""xqgan quantizer plugin ``pq``: product quantization over nested branch quantizers."""

from __future__ import annotations

__all__ = ["ProductQuantizer"]


def __getattr__(name: str) -> object:
    # lazy, so that importing the package (e.g. for metadata) does not import torch
    if name == "ProductQuantizer":
        from .quantizer import ProductQuantizer

        return ProductQuantizer
    raise AttributeError(name)
