"""The MaskGIT-style StyleGAN discriminator block (``variant = "maskgit"``), the discriminator the paper's reference code
and LlamaGen train with: it differs from StyleGAN2's residual block in where it blurs and downsamples::

    main: 3x3 conv (Ci -> Co) + lrelu, 3x3 conv (Co -> Co) + lrelu, [1,2,1] blur (reflect border), 3x3 conv stride 2
    skip: 1x1 conv stride 2 (Ci -> Co, with bias), not blurred
    out = (main + skip) / sqrt(2)

LeakyReLU(0.2) without StyleGAN2's sqrt(2) gain. With ``equalized_lr = false`` (the variant's default) the layers are
plain ``nn.Conv2d`` / ``nn.Linear`` with PyTorch's default initialisation, as in the reference.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_TAPS = (1.0, 2.0, 1.0)


def plain_lrelu(x: Tensor) -> Tensor:
    return F.leaky_relu(x, 0.2)


class ReflectBlur(nn.Module):
    """Depthwise [1,2,1] x [1,2,1] / 16 low-pass filter, same size out, the border reflected (kornia's filter2d
    default, which the reference calls)."""

    def __init__(self) -> None:
        super().__init__()
        taps = torch.tensor(_TAPS)
        kernel = torch.outer(taps, taps)
        self.register_buffer("kernel", (kernel / kernel.sum())[None, None], persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        c = x.shape[1]
        weight = self.kernel.to(x.dtype).expand(c, 1, 3, 3)
        return F.conv2d(F.pad(x, [1, 1, 1, 1], mode="reflect"), weight, groups=c)


class MaskGITDownBlock(nn.Module):
    """Residual block halving the resolution (see the module docstring)."""

    def __init__(self, cin: int, cout: int, conv: Callable[..., nn.Module]) -> None:
        super().__init__()
        self.conv1 = conv(cin, cout, 3, padding=1)
        self.conv2 = conv(cout, cout, 3, padding=1)
        self.blur = ReflectBlur()
        self.down = conv(cout, cout, 3, stride=2, padding=1)
        self.skip = conv(cin, cout, 1, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        main = self.down(self.blur(plain_lrelu(self.conv2(plain_lrelu(self.conv1(x))))))
        return (main + self.skip(x)) * (1 / math.sqrt(2))


#: (reference key pattern, our key) of the reference / LlamaGen ``discriminator_stylegan.Discriminator`` state dict;
#: its ``blocks`` list holds the from-RGB conv and its activation first, so block j there is block j - 2 here
_REFERENCE_KEYS = (
    (re.compile(r"blocks\.0\.(weight|bias)"), r"from_rgb.\1"),
    (re.compile(r"blocks\.(\d+)\.conv_res\.(weight|bias)"), r"blocks.{\1}.skip.\2"),
    (re.compile(r"blocks\.(\d+)\.net\.0\.(weight|bias)"), r"blocks.{\1}.conv1.\2"),
    (re.compile(r"blocks\.(\d+)\.net\.2\.(weight|bias)"), r"blocks.{\1}.conv2.\2"),
    (re.compile(r"blocks\.(\d+)\.downsample\.1\.(weight|bias)"), r"blocks.{\1}.down.\2"),
    (re.compile(r"final_conv\.0\.(weight|bias)"), r"final_conv.\1"),
    (re.compile(r"final_linear\.0\.(weight|bias)"), r"final_dense.\1"),
    (re.compile(r"final_linear\.2\.(weight|bias)"), r"out.\1"),
)
_REFERENCE_FIXED = re.compile(r"blocks\.\d+\.downsample\.0\.f")  # the blur taps: a constant, rebuilt here


def from_reference_state_dict(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A state dict of the reference's (and LlamaGen's) MaskGIT-style StyleGAN discriminator in our key names, for
    ``variant = "maskgit"``, ``equalized_lr = false`` with the same input size and widths; KeyError naming a key it
    does not know."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if _REFERENCE_FIXED.fullmatch(key):
            continue
        for pattern, target in _REFERENCE_KEYS:
            match = pattern.fullmatch(key)
            if match:
                name = match.expand(target)
                if "{" in name:  # shift the block index past the reference's from-RGB entries
                    head, index, tail = re.split(r"\{(\d+)\}", name)
                    name = f"{head}{int(index) - 2}{tail}"
                out[name] = value
                break
        else:
            raise KeyError(f"{key!r} is not a key of the reference's StyleGAN discriminator")
    return out
