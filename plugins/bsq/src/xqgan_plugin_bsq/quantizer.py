"""Binary spherical quantization (XQ-GAN Sec. 4.5, BSQ-ViT): LFQ on the unit sphere.

A token ``z in R^bits`` is l2-normalised, ``u = z / ||z||``, then quantized to ``sign(u) / sqrt(bits)``, a code of
unit norm (0 maps to -1/sqrt(bits)); the index is ``sum_i [z_i > 0] 2^i`` (codebook of ``2^bits`` entries, none
stored). Normalising bounds the quantization error. The straight-through gradient reaches ``z`` through the
normalisation, so it is not the identity. Losses: ``entropy`` (per-token minus codebook entropy of the soft
assignment to the ``+-1/sqrt(bits)`` codes, factorised over groups of bits) and ``commitment`` (between the
normalised token and its code). The shared machinery and formulas live in ``xqgan_core.binary_codes``.
"""

from __future__ import annotations

from typing import ClassVar

from xqgan_core import config
from xqgan_core.binary_codes import BinaryQuantizer, BinaryQuantizerOptions


class BinarySphericalQuantizer(BinaryQuantizer):
    """``forward(z (B, bits, H, W)) -> QuantOut(z_q in {-1, 1}/sqrt(bits), indices (B, H, W) int64, losses, stats)``."""

    plugin_api = 1
    spherical: ClassVar[bool] = True

    @config
    class Config(BinaryQuantizerOptions):
        """BSQ options: unit-norm codes +-1/sqrt(bits); p(bit = 1 | z) = sigmoid(4 u / (sqrt(bits) temperature))."""
