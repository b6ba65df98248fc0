"""Options shared by the CNN encoder and decoder (each declares its own ``Config`` on top of these)."""

from __future__ import annotations

from xqgan_core.config import between, config, each, non_empty, option, positive


@config
class BackboneOptions:
    channels: int = option(
        128, help="base width; level i has channels * channel_mult[i] channels", validator=positive()
    )
    channel_mult: tuple[int, ...] = option(
        (1, 1, 2, 2, 4),
        help="width multiplier per resolution level; the scale factor is 2**(len - 1): "
        "[1, 1, 2, 2, 4] = 16x, [1, 2, 2, 4] = 8x",
        validator=[non_empty(), each(positive())],
    )
    patch_size: int = option(
        1,
        help="space-to-depth stem: the encoder first folds each patch_size x patch_size block of pixels into channels "
        "(pixel unshuffle) and the decoder unfolds its output the same way (pixel shuffle), so every conv runs at "
        "1/patch_size resolution; the scale factor becomes patch_size * 2**(len(channel_mult) - 1). "
        "1 = off (the VQGAN layout)",
        validator=positive(),
    )
    z_channels: int = option(
        256, help="width at the bottleneck, before the 1x1 projection to/from the code dimension", validator=positive()
    )
    dropout: float = option(0.0, help="dropout probability inside every ResBlock", validator=between(0.0, 1.0))
    mid_attention: bool = option(True, help="self-attention block in the middle block (lowest resolution)")
    level_attention: bool = option(
        True,
        help="also a self-attention block after each ResBlock of the lowest-resolution level "
        "(the taming/LlamaGen layout; false leaves attention to the middle block only)",
    )
    checkpointing: bool = option(
        False,
        help="activation checkpointing per resolution level (recompute in backward; training only): "
        "less memory, about one extra forward of compute",
    )
