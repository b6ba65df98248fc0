"""Lookup-free quantization (XQ-GAN Sec. 4.4, MAGVIT-v2): every channel of a token is quantized to -1 or +1.

A token ``z in R^bits`` becomes ``sign(z) in {-1, 1}^bits`` (0 maps to -1); its index is ``sum_i [z_i > 0] 2^i``,
so the implicit codebook has ``2^bits`` entries and nothing is looked up or learned. The gradient passes the sign
unchanged (straight-through). Losses: ``entropy`` (per-token entropy minus codebook entropy of the soft
assignment, factorised over groups of bits; never a ``2^bits`` tensor) and ``commitment``. All the shared
machinery and the formulas live in ``xqgan_core.binary_codes``.
"""

from __future__ import annotations

from typing import ClassVar

from xqgan_core import config
from xqgan_core.binary_codes import BinaryQuantizer, BinaryQuantizerOptions


class LookupFreeQuantizer(BinaryQuantizer):
    """``forward(z (B, bits, H, W)) -> QuantOut(z_q in {-1, 1}, indices (B, H, W) int64, losses, stats)``."""

    plugin_api = 1
    spherical: ClassVar[bool] = False

    @config
    class Config(BinaryQuantizerOptions):
        """LFQ options: codes are +-1 per channel; p(bit = 1 | z) = sigmoid(4 z / temperature)."""
