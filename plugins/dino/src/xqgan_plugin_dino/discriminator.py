"""The DINO discriminator (StyleGAN-T / VAR's ``DinoDisc``, the discriminator of the paper's best runs): trainable heads
on the features of a frozen, self-supervised DINO ViT-S/16.

    images in [-1, 1] -> the trunk's normalisation (mean/std of its pretraining) -> input_size x input_size
      (training: with probability crop_prob a random crop when the image is larger, else an area / bicubic resize;
       evaluation: always the resize)
    -> frozen ViT: features after the patch embedding (+ position embedding) and after each of ``feature_blocks``,
       each read out as patch tokens + class token: (B, C, L)
    -> one trainable FeatureHead per feature (heads.py) -> (B, 1, L) each -> concatenated: logits (B, F * L)

The trunk is a frozen part (``xqgan_core.frozen``): never optimised, never saved (``discriminators.safetensors``
holds the heads only), rebuilt from ``init`` at every build; gradients flow through it to the images, not into it.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from timm.models import get_pretrained_cfg
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from xqgan_core.config import at_least, between, config, each, option, positive, require_checked
from xqgan_core.errors import ConfigError
from xqgan_core.frozen import seeded
from xqgan_core.interfaces import Discriminator
from xqgan_core.timm_weights import WEIGHT_SUFFIXES, load_trunk_weights

from .heads import FeatureHead

#: the timm model whose weights and preprocessing the paper's DINO discriminator uses (DINO v1, ViT-S/16)
DINO_VIT_S16 = "vit_small_patch16_224.dino"
INIT_KEY = "discriminators.init (dino)"


class DinoDiscriminator(Discriminator):
    """``forward(images (B, 3, H, W) in [-1, 1]) -> logits (B, (1 + len(feature_blocks)) * L)`` with
    ``L = (input_size / patch_size)^2`` tokens per feature."""

    plugin_api = 1

    @config
    class Config:
        init: str = option(
            DINO_VIT_S16,
            help="frozen trunk weights: a timm model name with weights in the Hugging Face cache (downloaded there "
            f"when online; default: DINO ViT-S/16, {DINO_VIT_S16!r}), a local .safetensors / .pt / .pth file of timm "
            "ViT weights, or '' = random weights from a fixed seed (tests only)",
        )
        embed_dim: int = option(384, help="trunk width (ViT-S: 384)", validator=positive())
        depth: int = option(12, help="trunk blocks (ViT-S: 12)", validator=positive())
        num_heads: int = option(6, help="trunk attention heads (ViT-S: 6); must divide embed_dim", validator=positive())
        patch_size: int = option(16, help="trunk patch side in pixels (DINO ViT-S/16: 16)", validator=positive())
        input_size: int = option(
            224, help="side images are cropped / resized to before the trunk (224: DINO's own; other multiples of "
            "patch_size resample its position embedding)", validator=positive(),
        )
        feature_blocks: tuple[int, ...] = option(
            (2, 5, 8, 11), help="trunk blocks (0-based) whose outputs get a head, besides the patch embedding's",
            validator=each(at_least(0)),
        )
        crop_prob: float = option(
            0.5, help="training: probability that an image larger than input_size is randomly cropped to it instead "
            "of resized (drawn per image)", validator=between(0, 1),
        )
        kernel_size: int = option(
            9, help="kernel of each head's circular convolution over the token sequence (odd)", validator=positive()
        )
        virtual_batch: int = option(
            8, help="samples per virtual batch of the heads' local batch norm", validator=positive()
        )
        spectral_norm: bool = option(True, help="spectral normalisation of the heads' convolutions")

        def check(self) -> list[str]:
            problems = []
            if self.embed_dim % self.num_heads:
                problems.append(f"num_heads ({self.num_heads}) must divide embed_dim ({self.embed_dim})")
            if self.input_size % self.patch_size:
                problems.append(f"input_size ({self.input_size}) must be a multiple of patch_size ({self.patch_size})")
            late = [b for b in self.feature_blocks if b >= self.depth]
            if late:
                problems.append(f"feature_blocks {late} do not exist in a trunk of depth {self.depth} (0-based)")
            if sorted(set(self.feature_blocks)) != list(self.feature_blocks):
                problems.append(f"feature_blocks must be increasing without repeats, got {list(self.feature_blocks)}")
            if self.kernel_size % 2 == 0:
                problems.append(f"kernel_size must be odd, got {self.kernel_size}")
            tokens = (self.input_size // self.patch_size) ** 2
            if self.kernel_size // 2 > tokens:
                problems.append(
                    f"kernel_size {self.kernel_size} wraps around more than the {tokens} tokens of an input_size "
                    f"{self.input_size} image (patch_size {self.patch_size}): use a smaller kernel or larger input"
                )
            return problems

    def __init__(self, config: DinoDiscriminator.Config) -> None:
        super().__init__(config)
        c = config
        require_checked(c, "discriminators (dino)")  # a Config made in Python skipped validate's cross-field check
        trunk = seeded(lambda: _build_trunk(c))  # random weights (init = ''): the same on every rank and rebuild
        load_trunk_weights(trunk, c.init, INIT_KEY)
        self.hold_frozen("trunk", trunk)
        mean, std = _normalisation(c.init)
        # images in [-1, 1] -> (x/2 + 1/2 - mean) / std, as one affine map; not saved (derived from init)
        self.register_buffer("in_scale", (0.5 / std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("in_shift", ((0.5 - mean) / std).view(1, 3, 1, 1), persistent=False)
        self.heads = nn.ModuleList(
            FeatureHead(c.embed_dim, c.kernel_size, c.virtual_batch, c.spectral_norm)
            for _ in range(1 + len(c.feature_blocks))
        )

    def forward(self, images: Tensor) -> Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"dino discriminator expects (B, 3, H, W) images, got {tuple(images.shape)}")
        features = self.features(self.prepare(images))
        return torch.cat([head(f).flatten(1) for head, f in zip(self.heads, features)], dim=1)

    def prepare(self, images: Tensor) -> Tensor:
        """Normalise for the trunk and bring to ``input_size`` (random crops in training, see ``crop_prob``)."""
        x = images.float() * self.in_scale + self.in_shift
        size = self.config.input_size
        h, w = x.shape[-2:]
        if (h, w) == (size, size):
            return x
        resized = F.interpolate(x, size=(size, size), mode="area" if h >= size and w >= size else "bicubic",
                                align_corners=None if h >= size and w >= size else False)
        if not (self.training and h > size and w > size and self.config.crop_prob > 0):
            return resized
        # per-image choice and window from the global RNG (restored on resume); chosen on the device, no host sync
        b = x.shape[0]
        crop = torch.rand(b, device=x.device) < self.config.crop_prob
        top = torch.randint(0, h - size + 1, (b,), device=x.device)
        left = torch.randint(0, w - size + 1, (b,), device=x.device)
        return torch.where(crop[:, None, None, None], _crop(x, top, left, size), resized)

    def features(self, x: Tensor) -> list[Tensor]:
        """(B, C, L) readouts (patch tokens + class token) after the patch embedding and each of ``feature_blocks``."""
        trunk: VisionTransformer = self.trunk
        x = trunk.norm_pre(trunk.patch_drop(trunk._pos_embed(trunk.patch_embed(x))))
        taps = set(self.config.feature_blocks)
        out = [_readout(x, trunk.num_prefix_tokens)]
        for i, block in enumerate(trunk.blocks[: max(taps, default=-1) + 1]):
            x = block(x)
            if i in taps:
                out.append(_readout(x, trunk.num_prefix_tokens))
        return out

    def extra_repr(self) -> str:
        return f"frozen trunk: {self.config.init or 'random'} (not trained, not saved)"


def _build_trunk(c: DinoDiscriminator.Config) -> VisionTransformer:
    return VisionTransformer(
        img_size=c.input_size, patch_size=c.patch_size, embed_dim=c.embed_dim, depth=c.depth,
        num_heads=c.num_heads, num_classes=0, global_pool="",
        weight_init="" if not c.init else "skip",  # loaded weights replace every tensor: no random init to draw
    )


def _normalisation(init: str) -> tuple[Tensor, Tensor]:
    """The mean / std of the trunk's pretraining: from timm's config of ``init`` when it names a timm model, else
    (a file, random weights) DINO's."""
    named = init and Path(init).suffix not in WEIGHT_SUFFIXES and not Path(init).expanduser().exists()
    cfg = (get_pretrained_cfg(init) if named else None) or get_pretrained_cfg(DINO_VIT_S16)
    if cfg is None:  # pragma: no cover - timm always knows DINO's config
        raise ConfigError([f"{INIT_KEY}: timm has no pretrained config for {DINO_VIT_S16!r}"])
    return torch.tensor(cfg.mean, dtype=torch.float32), torch.tensor(cfg.std, dtype=torch.float32)


def _readout(tokens: Tensor, prefix: int) -> Tensor:
    """(B, prefix + L, C) -> (B, C, L): each patch token plus the class token."""
    return (tokens[:, prefix:] + tokens[:, :1]).transpose(1, 2)


def _crop(x: Tensor, top: Tensor, left: Tensor, size: int) -> Tensor:
    """Per-image ``size x size`` windows at (top, left), by gathering rows then columns (differentiable)."""
    b, c, _, w = x.shape
    rows = top[:, None] + torch.arange(size, device=x.device)  # (B, size)
    cols = left[:, None] + torch.arange(size, device=x.device)
    x = x.gather(2, rows[:, None, :, None].expand(b, c, size, w))
    return x.gather(3, cols[:, None, None, :].expand(b, c, size, size))
