"""xqgan quantizer plugin ``rq``: residual quantization over a nested single-level quantizer."""

from __future__ import annotations

__all__ = ["ResidualQuantizer"]


def __getattr__(name: str) -> object:
    # lazy, so that importing the package (e.g. for metadata) does not import torch
    if name == "ResidualQuantizer":
        from .quantizer import ResidualQuantizer

        return ResidualQuantizer
    raise AttributeError(name)
