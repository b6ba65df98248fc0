"""xqgan generator plugin ``llamagen``: a raster-order LlamaGen-style transformer over a tokenizer's tokens."""

from .generator import LlamaGenGenerator

__all__ = ["LlamaGenGenerator"]
