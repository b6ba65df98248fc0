"""xqgan quantizer plugin ``msrq``: multi-scale residual quantization (VAR).

The token-sequence helpers (``flatten_scales`` / ``unflatten_scales`` / ``token_count``) live in
``xqgan_core.quant_ops``, shared with product quantizers and generators.
"""

from __future__ import annotations

__all__ = ["MultiScaleResidualQuantizer", "phi_schedule"]


def __getattr__(name: str) -> object:
    # lazy, so that importing the package (e.g. for metadata) does not import torch
    if name not in __all__:
        raise AttributeError(name)
    from . import quantizer

    return getattr(quantizer, name)
