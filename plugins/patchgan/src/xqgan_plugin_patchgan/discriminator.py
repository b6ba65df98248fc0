"""PatchGAN discriminator (the pix2pix / taming-transformers "NLayer" design).

Every output logit judges one overlapping image patch rather than the whole image. With the default options
(``ndf=64, n_layers=3``) each logit sees a 70x70 pixel patch, and a 256x256 image gives a 30x30 logit map.

Layout (all convolutions 4x4 with padding 1)::

    conv s2 (in_channels -> ndf)                           + LeakyReLU(0.2)
    n_layers-1 x  conv s2 (channels doubling, capped 8*ndf) + norm + LeakyReLU(0.2)
    conv s1 (doubled once more, capped 8*ndf)              + norm + LeakyReLU(0.2)
    conv s1 (-> 1 channel)                                 = logits
"""

from __future__ import annotations

import math
from typing import Literal

from torch import Tensor, nn

from xqgan_core.config import config, option, positive
from xqgan_core.interfaces import Discriminator

Norm = Literal["batch", "group", "instance", "none"]

# Upper bound on GroupNorm groups; fewer are used when the channel count is not a multiple of it.
_MAX_GROUPS = 32


def _norm_layer(kind: Norm, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(math.gcd(_MAX_GROUPS, channels), channels)
    if kind == "instance":
        # affine so that the layer has a learned scale/shift like the other norms (and the init applies to it)
        return nn.InstanceNorm2d(channels, affine=True)
    return nn.Identity()


def _conv_bias(kind: Norm) -> bool:
    # BatchNorm and InstanceNorm subtract a per-channel mean, which cancels a conv bias exactly; GroupNorm only
    # removes the mean over each group of channels, so there (and without a norm) the bias still does something.
    return kind not in ("batch", "instance")


class PatchGANDiscriminator(Discriminator):
    """Fully convolutional discriminator returning a map of per-patch real/fake logits ``(B, 1, h, w)``."""

    plugin_api = 1

    @config
    class Config:
        ndf: int = option(64, help="Channels of the first convolution; doubled per block up to 8*ndf.",
                          validator=positive())
        n_layers: int = option(3, help="Stride-2 convolutions (3 gives the classic 70x70-pixel patches).",
                               validator=positive())
        norm: Norm = option("batch", help="Normalization after each inner convolution; convolutions followed "
                                          "by batch or instance norm carry no bias.")
        in_channels: int = option(3, help="Channels of the images judged.", validator=positive())

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        ndf, n_layers, norm = config.ndf, config.n_layers, config.norm
        bias = _conv_bias(norm)

        layers: list[nn.Module] = [
            nn.Conv2d(config.in_channels, ndf, kernel_size=4, stride=2, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        channels = ndf
        for i in range(1, n_layers + 1):
            out = ndf * min(2**i, 8)
            stride = 2 if i < n_layers else 1  # the last doubling keeps the resolution
            layers += [
                nn.Conv2d(channels, out, kernel_size=4, stride=stride, padding=1, bias=bias),
                _norm_layer(norm, out),
                nn.LeakyReLU(0.2, inplace=True),
            ]
            channels = out
        layers.append(nn.Conv2d(channels, 1, kernel_size=4, stride=1, padding=1))
        self.layers = nn.Sequential(*layers)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """DCGAN-style init: conv weights N(0, 0.02), norm scales N(1, 0.02), all biases/shifts zero."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.InstanceNorm2d)) and m.weight is not None:
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, images: Tensor) -> Tensor:
        """``images (B, in_channels, H, W)`` in [-1, 1] -> logits ``(B, 1, h, w)``."""
        return self.layers(images)


__all__ = ["PatchGANDiscriminator"]
