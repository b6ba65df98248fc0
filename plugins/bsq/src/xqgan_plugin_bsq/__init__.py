"""xqgan quantizer plugin ``bsq``: binary spherical quantization."""

from __future__ import annotations

__all__ = ["BinarySphericalQuantizer"]


def __getattr__(name: str) -> object:
    # lazy, so that importing the package (e.g. for metadata) does not import torch
    if name == "BinarySphericalQuantizer":
        from .quantizer import BinarySphericalQuantizer

        return BinarySphericalQuantizer
    raise AttributeError(name)
