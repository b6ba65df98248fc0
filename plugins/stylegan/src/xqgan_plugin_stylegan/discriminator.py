"""StyleGAN2 residual discriminator (Karras et al., 2020, config E/F "resnet" D), one logit per image.

Layout for an ``input_size`` image (channels double per block from ``channels``, capped at ``max_channels``)::

    from_rgb: 1x1 conv (3 -> C0)                                               + LeakyReLU(0.2)
    per block, while the map is larger than 4x4 (each halves it):
        main: 3x3 conv (Ci -> Ci) + lrelu, blur, 3x3 conv stride 2 (Ci -> Co) + lrelu
        skip: blur, 1x1 conv stride 2 (Ci -> Co), no bias
        out = (main + skip) / sqrt(2)
    minibatch standard deviation (+1 channel), 3x3 conv + lrelu, dense (C*4*4 -> C) + lrelu, dense (C -> 1)

* Blur: the separable [1, 3, 3, 1] low-pass filter before every strided convolution (anti-aliased downsampling).
* Equalized learning rate: weights are drawn from N(0, 1) and multiplied by ``1/sqrt(fan_in)`` in every forward,
  so Adam's per-parameter steps have the same relative size in every layer (``equalized_lr = false`` uses plain
  layers with the default init instead).
* LeakyReLU outputs are multiplied by sqrt(2) (the "gain" that keeps activations at unit variance).
* Minibatch standard deviation: the std of each feature over groups of ``mbstd_group`` samples, averaged to one
  extra channel, lets D see a lack of diversity; the group shrinks to a divisor of the batch when needed.

``variant = "maskgit"`` builds instead the MaskGIT-style discriminator of the paper's reference code and LlamaGen
(``maskgit.py``): 3x3 from-RGB, blocks that blur with [1,2,1] before a 3x3 stride-2 convolution and skip through an
unblurred 1x1 stride-2 convolution, LeakyReLU without gain, no minibatch-std channel and plain layers by default.
At 256 px with the default channels it has 36.5 M parameters against StyleGAN2's 24.0 M.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xqgan_core.config import at_least, config, option, positive
from xqgan_core.interfaces import Discriminator

from .maskgit import MaskGITDownBlock, plain_lrelu

GAIN = math.sqrt(2.0)
_BLUR_TAPS = (1.0, 3.0, 3.0, 1.0)


class EqualConv2d(nn.Module):
    """Conv2d with weights ~ N(0, 1) scaled by 1/sqrt(fan_in) at run time (equalized learning rate)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0, bias: bool = True,
                 equalized: bool = True) -> None:
        super().__init__()
        self.stride, self.padding = stride, padding
        self.weight = nn.Parameter(torch.randn(cout, cin, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(cout)) if bias else None
        self.scale = 1.0 / math.sqrt(cin * kernel * kernel)
        if not equalized:  # plain layer: fold the scale into the stored weights once
            with torch.no_grad():
                self.weight.mul_(self.scale)
            self.scale = 1.0

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight * self.scale, self.bias, self.stride, self.padding)


class EqualLinear(nn.Module):
    def __init__(self, cin: int, cout: int, equalized: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin))
        self.bias = nn.Parameter(torch.zeros(cout))
        self.scale = 1.0 / math.sqrt(cin)
        if not equalized:
            with torch.no_grad():
                self.weight.mul_(self.scale)
            self.scale = 1.0

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight * self.scale, self.bias)


def lrelu(x: Tensor) -> Tensor:
    return F.leaky_relu(x, 0.2) * GAIN


class Blur(nn.Module):
    """Depthwise [1,3,3,1] x [1,3,3,1] / 64 filter with ``pad`` zeros on each side."""

    def __init__(self, channels: int, pad: int) -> None:
        super().__init__()
        taps = torch.tensor(_BLUR_TAPS)
        kernel = torch.outer(taps, taps)
        self.register_buffer("kernel", (kernel / kernel.sum()).expand(channels, 1, 4, 4).contiguous(),
                             persistent=False)
        self.pad, self.channels = pad, channels

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(F.pad(x, [self.pad] * 4), self.kernel.to(x.dtype), groups=self.channels)


class DownBlock(nn.Module):
    """Residual block halving the resolution (sizes: blur pad 2 + 3x3 s2 and blur pad 1 + 1x1 s2 both give H/2)."""

    def __init__(self, cin: int, cout: int, equalized: bool) -> None:
        super().__init__()
        self.conv1 = EqualConv2d(cin, cin, 3, padding=1, equalized=equalized)
        self.blur = Blur(cin, pad=2)
        self.conv2 = EqualConv2d(cin, cout, 3, stride=2, equalized=equalized)
        self.skip_blur = Blur(cin, pad=1)
        self.skip = EqualConv2d(cin, cout, 1, stride=2, bias=False, equalized=equalized)

    def forward(self, x: Tensor) -> Tensor:
        main = lrelu(self.conv2(self.blur(lrelu(self.conv1(x)))))
        return (main + self.skip(self.skip_blur(x))) / GAIN


def minibatch_std(x: Tensor, group: int) -> Tensor:
    """Append the mean over features of the per-group std of each feature as one channel."""
    b, c, h, w = x.shape
    g = min(group, b)
    while b % g:
        g -= 1
    y = x.float().reshape(g, b // g, c, h, w)
    std = (y.var(dim=0, unbiased=False) + 1e-8).sqrt().mean(dim=(1, 2, 3))  # (b // g,)
    feature = std.reshape(1, b // g, 1, 1, 1).expand(g, b // g, 1, h, w).reshape(b, 1, h, w)
    return torch.cat([x, feature.to(x.dtype)], dim=1)


def _layer_types(maskgit: bool, equalized: bool) -> tuple[Callable[..., nn.Module], Callable[..., nn.Module]]:
    """(conv, linear) constructors. Plain maskgit layers are torch's own (the reference's initialisation); plain
    stylegan2 layers keep their N(0, 1) / sqrt(fan_in) draw."""
    if maskgit and not equalized:
        return nn.Conv2d, nn.Linear
    return functools.partial(EqualConv2d, equalized=equalized), functools.partial(EqualLinear, equalized=equalized)


class StyleGANDiscriminator(Discriminator):
    """``forward(images (B, 3, input_size, input_size)) -> (B, 1)`` logits."""

    plugin_api = 1

    @config
    class Config:
        input_size: int = option(
            256, help="image side in pixels (a power of two >= 8); must equal the run's data.resolution",
            validator=at_least(8),
        )
        channels: int = option(64, help="channels of the first block; doubled per block", validator=positive())
        max_channels: int = option(512, help="cap on the channels of any block", validator=positive())
        variant: Literal["stylegan2", "maskgit"] = option(
            "stylegan2", help="'stylegan2': StyleGAN2's residual D; 'maskgit': the MaskGIT-style D of the paper's "
            "reference code and LlamaGen (3x3 from-RGB, [1,2,1] blur, unblurred 1x1 skip, no minibatch-std)",
        )
        mbstd_group: int | None = option(
            None, help="samples per minibatch-std group (0 = no minibatch-std channel); default: 4 for stylegan2, 0 "
            "for maskgit", validator=at_least(0),
        )
        equalized_lr: bool | None = option(
            None, help="equalized learning rate (StyleGAN); false = plain layers; default: true for stylegan2, false "
            "for maskgit (plain nn.Conv2d / nn.Linear with PyTorch's initialisation, as the reference)",
        )
        in_channels: int = option(3, help="image channels", validator=positive())

    def __init__(self, config: StyleGANDiscriminator.Config) -> None:
        super().__init__(config)
        size = config.input_size
        if size & (size - 1):
            raise ValueError(f"stylegan: input_size must be a power of two, got {size}")
        maskgit = config.variant == "maskgit"
        eq = (not maskgit) if config.equalized_lr is None else config.equalized_lr
        self.mbstd_group = (0 if maskgit else 4) if config.mbstd_group is None else config.mbstd_group
        self.act = plain_lrelu if maskgit else lrelu

        def width(level: int) -> int:
            return min(config.channels * 2**level, config.max_channels)

        conv, linear = _layer_types(maskgit, eq)
        self.from_rgb = conv(config.in_channels, width(0), 3 if maskgit else 1, padding=1 if maskgit else 0)
        blocks, level = [], 0
        while size > 4:
            cin, cout = width(level), width(level + 1)
            blocks.append(MaskGITDownBlock(cin, cout, conv) if maskgit else DownBlock(cin, cout, eq))
            size, level = size // 2, level + 1
        self.blocks = nn.Sequential(*blocks)
        c = width(level)
        self.final_conv = conv(c + (1 if self.mbstd_group else 0), c, 3, padding=1)
        self.final_dense = linear(c * 4 * 4, c)
        self.out = linear(c, 1)

    def forward(self, images: Tensor) -> Tensor:
        size = self.config.input_size
        if images.ndim != 4 or images.shape[-2:] != (size, size):
            raise ValueError(
                f"stylegan discriminator expects (B, {self.config.in_channels}, {size}, {size}) images "
                f"(input_size = {size}; set it to the run's data.resolution), got {tuple(images.shape)}"
            )
        x = self.blocks(self.act(self.from_rgb(images)))
        if self.mbstd_group:
            x = minibatch_std(x, self.mbstd_group)
        x = self.act(self.final_conv(x))
        x = self.act(self.final_dense(x.flatten(1)))
        return self.out(x)
