"""The base class of quantizers with several levels (residual depth, scales, or multi-level product branches).

It owns ``forward(z, keep=None)``: ``keep`` says how many leading levels each sample keeps (quantizer dropout,
XQ-GAN Sec. 4.2, Eq. 3), as

* ``None``: in training, ONE draw from the quantizer's ``LevelDropout`` settings (``level_dropout()``, by default
  the subclass's ``dropout`` config section); in eval, every level;
* an ``int``: every sample keeps that many levels (``0`` = none, ``num_levels`` = all);
* a ``(B,)`` integer tensor: per sample. Values are not checked against the range (that would cost a host sync);
  below 0 acts as 0, above ``num_levels`` as ``num_levels``.

``keep`` is normalised here, in one place, to a ``(B,)`` int64 tensor on the latent's device, and handed to the
subclass's ``quantize(z, keep)``. The subclass masks what the dropped levels contribute with ``level_mask`` and
their indices with ``drop_indices`` (index 0, contributing nothing). A wrapper over multi-level parts (a product
quantizer) passes the same ``keep`` tensor to every part, so all parts share one draw.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .interfaces import QuantOut, Quantizer
from .quant_ops import LevelDropout, draw_levels, level_mask

__all__ = ["Keep", "MultiLevelQuantizer"]

#: what ``forward(z, keep=...)`` accepts
Keep = Tensor | int | None


class MultiLevelQuantizer(Quantizer):
    """A quantizer whose indices have ``num_levels`` levels a sample may drop from the end (see module doc).

    Subclasses implement ``quantize(z, keep)`` (``keep``: (B,) int64, already normalised) and may override
    ``level_dropout()``; ``indices_to_codes(indices, keep=None)`` normalises ``keep`` with ``normalize_keep``.
    """

    def level_dropout(self) -> LevelDropout:
        """The dropout settings of the one draw per forward: the subclass's ``dropout`` config section."""
        dropout = getattr(self.config, "dropout", None)
        if not isinstance(dropout, LevelDropout):
            raise NotImplementedError(
                f"{type(self).__name__} has no `dropout` LevelDropout section: override level_dropout()"
            )
        return dropout

    def draw_keep(self, batch: int, device: torch.device) -> Tensor:
        """(B,) int64 kept-level counts: all levels in eval; in training the dropout draw."""
        return draw_levels(batch, self.num_levels, self.level_dropout(), self.training, device)

    def normalize_keep(self, keep: Tensor | int, batch: int, device: torch.device) -> Tensor:
        """An int or a (B,) integer tensor -> (B,) int64 on ``device``; anything else is refused clearly."""
        if isinstance(keep, int) and not isinstance(keep, bool):
            if not 0 <= keep <= self.num_levels:
                raise ValueError(f"keep must be between 0 and {self.num_levels} levels, got {keep}")
            return torch.full((batch,), keep, dtype=torch.long, device=device)
        integer = isinstance(keep, Tensor) and not (keep.dtype.is_floating_point or keep.dtype.is_complex
                                                    or keep.dtype == torch.bool)
        if not integer or keep.shape != (batch,):
            got = f"a {keep.dtype} tensor of shape {tuple(keep.shape)}" if isinstance(keep, Tensor) else repr(keep)
            raise ValueError(
                f"keep must be an int or a ({batch},) integer tensor of levels kept per sample, got {got}"
            )
        return keep.to(device=device, dtype=torch.long)

    def forward(self, z: Tensor, keep: Keep = None) -> QuantOut:
        batch = z.shape[0]
        kept = self.draw_keep(batch, z.device) if keep is None else self.normalize_keep(keep, batch, z.device)
        out = self.quantize(z, kept)
        if out.keep is None:  # aligners leave out the samples dropout truncated
            out.keep = kept
        return out

    def quantize(self, z: Tensor, keep: Tensor) -> QuantOut:
        """The forward pass with ``keep`` (B,) int64 levels kept per sample."""
        raise NotImplementedError

    # -- masking helpers ---------------------------------------------------------------------------------------------
    @staticmethod
    def level_mask(keep: Tensor, level: int, like: Tensor) -> Tensor:
        """1 where the sample keeps ``level`` (0-based), else 0: shape (B, 1, ...) in ``like``'s dtype and rank."""
        return level_mask(keep, level, like)

    @staticmethod
    def drop_indices(indices: Tensor, keep: Tensor, level: int) -> Tensor:
        """``indices`` (B, ...) of ``level`` with 0 where the sample dropped the level, as int64."""
        kept = (keep > level).view(-1, *([1] * (indices.ndim - 1)))
        return torch.where(kept, indices.long(), 0)
