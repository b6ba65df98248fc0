"""xqgan generator plugin ``var``: next-scale prediction (VAR, Tian et al. 2024) over multi-scale tokens."""

from __future__ import annotations

__all__ = ["NextScaleGenerator"]


def __getattr__(name: str) -> object:
    # lazy, so that importing the package (e.g. for metadata) does not import torch
    if name == "NextScaleGenerator":
        from .generator import NextScaleGenerator

        return NextScaleGenerator
    raise AttributeError(name)
