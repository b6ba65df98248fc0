"""xqgan quantizer plugin ``lfq``: lookup-free quantization."""

from __future__ import annotations

__all__ = ["LookupFreeQuantizer"]


def __getattr__(name: str) -> object:
    # lazy, so that importing the package (e.g. for metadata) does not import torch
    if name == "LookupFreeQuantizer":
        from .quantizer import LookupFreeQuantizer

        return LookupFreeQuantizer
    raise AttributeError(name)
