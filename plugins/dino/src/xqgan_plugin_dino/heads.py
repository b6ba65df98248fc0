"""The trainable heads of the DINO discriminator: token features (B, C, L) -> one logit per token (B, 1, L).

Each head (StyleGAN-T's discriminator head, as the paper's reference code uses it)::

    1x1 conv (C -> C, spectral norm) + local batch norm + LeakyReLU(0.2)
    residual: [circular conv of kernel k (C -> C, spectral norm) + local batch norm + LeakyReLU(0.2)], (f(x) + x)/sqrt 2
    1x1 conv (C -> 1, spectral norm)

Parameter names follow that nesting (``0.0.weight_orig``, ``1.fn.0.weight_orig``, ``2.weight_orig``, ...), the layout
of the reference's saved discriminator heads.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

LEAK = 0.2


class LocalBatchNorm(nn.Module):
    """Batch norm of (B, C, L) features whose statistics come from virtual batches of ``virtual_batch`` samples (over
    their samples and tokens), so a sample is compared with a few others only, whatever the per-device batch. No
    running statistics: training and evaluation normalise the same way. Computed in fp32."""

    def __init__(self, channels: int, virtual_batch: int = 8, eps: float = 1e-6) -> None:
        super().__init__()
        self.virtual_batch, self.eps = virtual_batch, eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        b, c, length = x.shape
        groups = -(-b // self.virtual_batch)  # ceil: the batch is split into this many near-equal groups
        x32 = x.float()
        if b % groups == 0:
            out = self._normalise(x32.view(groups, b // groups, c, length)).view(b, c, length)
        else:
            out = torch.cat([self._normalise(part[None])[0] for part in x32.tensor_split(groups)])
        return (out * self.weight[:, None] + self.bias[:, None]).to(x.dtype)

    def _normalise(self, grouped: Tensor) -> Tensor:
        """(G, b, C, L): each group's statistics over its samples and tokens."""
        mean = grouped.mean(dim=(1, 3), keepdim=True)
        var = grouped.var(dim=(1, 3), keepdim=True, unbiased=False)
        return (grouped - mean) * torch.rsqrt(var + self.eps)


class Residual(nn.Module):
    """``(fn(x) + x) / sqrt(2)``: keeps the variance of the sum at that of its parts."""

    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return (self.fn(x) + x) * (1 / math.sqrt(2))


def token_conv(cin: int, cout: int, kernel: int, spectral: bool) -> nn.Conv1d:
    """A Conv1d over tokens; kernels wider than 1 wrap around the token sequence (circular padding)."""
    conv = nn.Conv1d(cin, cout, kernel, padding=kernel // 2, padding_mode="circular" if kernel > 1 else "zeros")
    return nn.utils.spectral_norm(conv) if spectral else conv


def conv_norm_act(channels: int, kernel: int, virtual_batch: int, spectral: bool) -> nn.Sequential:
    return nn.Sequential(
        token_conv(channels, channels, kernel, spectral),
        LocalBatchNorm(channels, virtual_batch),
        nn.LeakyReLU(LEAK),
    )


class FeatureHead(nn.Sequential):
    """(B, C, L) trunk features -> (B, 1, L) logits."""

    def __init__(self, channels: int, kernel: int, virtual_batch: int, spectral: bool) -> None:
        super().__init__(
            conv_norm_act(channels, 1, virtual_batch, spectral),
            Residual(conv_norm_act(channels, kernel, virtual_batch, spectral)),
            token_conv(channels, 1, 1, spectral),
        )
