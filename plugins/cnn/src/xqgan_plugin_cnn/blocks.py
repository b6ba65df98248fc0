"""Building blocks shared by the CNN encoder and decoder (taming/LlamaGen VQGAN layout).

All blocks work on (B, C, H, W) tensors and are memory-format agnostic (the engine may switch to channels_last).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

PREFERRED_GROUPS = 32


def group_count(channels: int, preferred: int = PREFERRED_GROUPS) -> int:
    """``preferred`` groups when they divide ``channels``, else the largest divisor of ``channels`` below it.

    The standard recipe always has widths that are multiples of 32; the fallback only exists so that unusual
    widths (e.g. ``channels = 48``) still build instead of failing inside GroupNorm.
    """
    for groups in range(min(preferred, channels), 0, -1):
        if channels % groups == 0:
            return groups
    return 1


def Normalize(channels: int) -> nn.GroupNorm:  # noqa: N802 - named like the block it stands for
    """GroupNorm with 32 groups (fewer only when 32 does not divide ``channels``), eps 1e-6, affine."""
    return nn.GroupNorm(group_count(channels), channels, eps=1e-6, affine=True)


class ResBlock(nn.Module):
    """norm -> swish -> conv3x3 -> norm -> swish -> dropout -> conv3x3, plus a (1x1 when widths differ) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.shortcut: nn.Module = (
            nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with a residual connection (1x1 conv projections).

    Uses ``scaled_dot_product_attention`` so fused kernels apply and the (HW x HW) matrix is never built here.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = Normalize(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)

        def tokens(t: Tensor) -> Tensor:  # (B, C, H, W) -> (B, 1 head, HW, C)
            return t.reshape(b, c, h * w).transpose(1, 2).unsqueeze(1)

        out = F.scaled_dot_product_attention(tokens(self.q(y)), tokens(self.k(y)), tokens(self.v(y)))
        out = out.squeeze(1).transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3x3 conv after padding right/bottom by one (taming's asymmetric padding)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour 2x, then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: ``len(res)`` ResBlocks (each followed by an AttnBlock when ``attention``),
    then an optional resampling block (Downsample in the encoder, Upsample in the decoder)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_res_blocks: int,
        dropout: float,
        attention: bool,
        resample: type[Downsample] | type[Upsample] | None,
    ) -> None:
        super().__init__()
        self.res = nn.ModuleList(
            ResBlock(in_channels if i == 0 else out_channels, out_channels, dropout) for i in range(num_res_blocks)
        )
        self.attn = nn.ModuleList(AttnBlock(out_channels) for _ in range(num_res_blocks if attention else 0))
        self.resample: nn.Module = resample(out_channels) if resample is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        for i, block in enumerate(self.res):
            x = block(x)
            if self.attn:
                x = self.attn[i](x)
        return self.resample(x)


class MidBlock(nn.Module):
    """ResBlock -> AttnBlock (optional) -> ResBlock at the lowest resolution."""

    def __init__(self, channels: int, dropout: float, attention: bool) -> None:
        super().__init__()
        self.res1 = ResBlock(channels, channels, dropout)
        self.attn: nn.Module = AttnBlock(channels) if attention else nn.Identity()
        self.res2 = ResBlock(channels, channels, dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.res2(self.attn(self.res1(x)))


def run_stage(module: Callable[[Tensor], Tensor], x: Tensor, checkpointed: bool) -> Tensor:
    """Run ``module(x)``; with ``checkpointed`` its activations are recomputed in backward instead of stored.

    Non-reentrant checkpointing keeps gradients to parameters and inputs exact and restores the RNG state, so
    dropout draws the same masks during recomputation.
    """
    if checkpointed and torch.is_grad_enabled():
        return checkpoint(module, x, use_reentrant=False)
    return module(x)
