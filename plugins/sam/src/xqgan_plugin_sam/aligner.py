"""``use = "sam"``: the image encoder of Segment Anything (ViT-B/L/H, segment-anything's ``ImageEncoderViT``) as a
frozen teacher, with the core's shared alignment head. The reference code never shipped its SAM module; this is
our definition:

* **input**: images resized (bicubic, antialiased) to ``image_size`` px, normalised with SAM's pixel mean / std
  (the ImageNet statistics). SAM's own input is 1024 px (a 64x64 grid of 16-px patches); ``image_size = 256``
  (the default: the tokenizer's resolution, 16x16 patches, 16x cheaper) builds the encoder at that size and resamples
  the checkpoint's absolute position embedding (bicubic) and the relative-position tables of its global-attention
  blocks (linear, as SAM's ``get_rel_pos`` does at run time); windowed blocks keep their 14x14 windows.
* **patch features**: the encoder's output, SAM's "image embedding" after its neck (256 channels on the
  ``image_size / 16`` grid), resampled to the token grid by the shared head.
* **global feature**: SAM has no class token: the spatial mean of those patch features.

Weights: ``weights`` (a local .pth / .safetensors of the whole SAM or of the image encoder, read without executing
pickled code), else the official checkpoint of ``variant`` in ``$TORCH_HOME/hub/checkpoints/`` (downloaded there,
SHA-256-prefix checked, when online; offline without it the run stops before training).
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT
from torch import Tensor, nn

from xqgan_core import at_least, config, each, option, positive
from xqgan_core.alignment import IMAGENET_MEAN, IMAGENET_STD, Preprocessing, Teacher, TeacherAligner, TeacherFeatures
from xqgan_core.errors import ConfigError
from xqgan_core.perceptual import OFFLINE_VARIABLES, is_offline
from xqgan_core.timm_weights import read_state_dict

KEY = "aligners.sam"
URL = "https://dl.fbaipublicfiles.com/segment_anything/"
#: variant -> (checkpoint file, embed_dim, depth, num_heads, global-attention blocks), as segment-anything's build_sam
VARIANTS: dict[str, tuple[str, int, int, int, tuple[int, ...]]] = {
    "vit_b": ("sam_vit_b_01ec64.pth", 768, 12, 12, (2, 5, 8, 11)),
    "vit_l": ("sam_vit_l_0b3195.pth", 1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": ("sam_vit_h_4b8939.pth", 1280, 32, 16, (7, 15, 23, 31)),
}


class SAMTeacher(Teacher):
    def __init__(self, encoder: ImageEncoderViT, image_size: int, patch_size: int, out_chans: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.preprocessing = Preprocessing(IMAGENET_MEAN, IMAGENET_STD, image_size, patch_size)
        self.cls_dim = self.patch_dim = out_chans

    def extract(self, pixels: Tensor) -> TeacherFeatures:
        patches = self.encoder(pixels)  # (B, out_chans, g, g): SAM's image embedding
        return TeacherFeatures(cls=patches.mean(dim=(2, 3)), patches=patches)


class SAMAligner(TeacherAligner):
    """Aligns a branch of the codes with SAM's frozen image encoder (patch mode is its natural use)."""

    plugin_api = 1

    @config
    class Config(TeacherAligner.Config):
        variant: Literal["vit_b", "vit_l", "vit_h"] = option("vit_b", help="SAM image encoder: vit_b / vit_l / vit_h")
        weights: str = option("", help="a local SAM checkpoint (.pth / .safetensors, whole SAM or image encoder); "
                                       "empty: the variant's official file in $TORCH_HOME/hub/checkpoints (downloaded "
                                       "there when online)")
        image_size: int = option(256, help="encoder input size in px (SAM: 1024; 256 = 16x16 patches); position "
                                           "tables are resampled", validator=positive())
        patch_size: int = option(16, help="patch size in px (SAM: 16; other values for tiny test teachers only)",
                                 validator=positive())
        embed_dim: int = option(0, help="override the variant's width (0: the variant's; tiny test teachers)",
                                validator=at_least(0))
        depth: int = option(0, help="override the variant's depth (0: the variant's)", validator=at_least(0))
        num_heads: int = option(0, help="override the variant's heads (0: the variant's)", validator=at_least(0))
        global_attn_indexes: tuple[int, ...] = option(
            (), help="override the blocks with global attention (empty: the variant's)", validator=each(at_least(0)))
        window_size: int = option(14, help="window of the windowed-attention blocks (SAM: 14)", validator=positive())
        out_chans: int = option(256, help="channels of the encoder's neck (SAM: 256)", validator=positive())

    @classmethod
    def save_tiny_teacher(cls, folder: Path) -> dict[str, Any]:
        from .tiny import save_tiny_weights, tiny_options

        return tiny_options(save_tiny_weights(folder / "tiny-sam.pth"))

    @classmethod
    def build_teacher(cls, config: Config) -> Teacher:
        file, dim, depth, heads, global_blocks = VARIANTS[config.variant]
        encoder = ImageEncoderViT(
            img_size=config.image_size, patch_size=config.patch_size, embed_dim=config.embed_dim or dim,
            depth=config.depth or depth, num_heads=config.num_heads or heads, mlp_ratio=4,
            norm_layer=partial(nn.LayerNorm, eps=1e-6), qkv_bias=True, use_rel_pos=True,
            global_attn_indexes=tuple(config.global_attn_indexes) or global_blocks, window_size=config.window_size,
            out_chans=config.out_chans)
        state = read_state_dict(_weights_file(config, file), f"{KEY}.weights")
        _load_encoder(encoder, state)
        return SAMTeacher(encoder, config.image_size, config.patch_size, config.out_chans)


def _weights_file(config: Any, file: str) -> Path:
    if config.weights:
        return Path(config.weights).expanduser()
    path = Path(torch.hub.get_dir()) / "checkpoints" / file
    if path.is_file():
        return path
    if is_offline():
        raise ConfigError([f"{KEY}.weights: SAM {config.variant} weights not found at {path} and offline "
                           f"({' / '.join(OFFLINE_VARIABLES)}); get {URL}{file} into that folder or set {KEY}.weights"])
    print(f"Downloading SAM {config.variant} weights {URL}{file} to {path}", file=sys.stderr)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:  # the file name's last part is a SHA-256 prefix, checked as torchvision does
        torch.hub.download_url_to_file(URL + file, str(path), hash_prefix=file.rsplit("_", 1)[1].split(".")[0])
    except (OSError, RuntimeError) as e:
        raise ConfigError([f"{KEY}.weights: could not download {URL}{file} ({e}); get it into {path.parent} or "
                           f"set {KEY}.weights to a local copy"]) from e
    return path


def _load_encoder(encoder: ImageEncoderViT, state: dict[str, Tensor]) -> None:
    """Whole-SAM keys (``image_encoder.*``) or encoder keys; position tables resampled to the encoder's geometry."""
    if any(k.startswith("image_encoder.") for k in state):
        state = {k[len("image_encoder."):]: v for k, v in state.items() if k.startswith("image_encoder.")}
    own = encoder.state_dict()
    state = {k: _resampled(k, v, own[k].shape) if k in own and v.shape != own[k].shape else v for k, v in state.items()}
    try:
        encoder.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ConfigError([f"{KEY}: the weights do not fit the encoder's options (variant, embed_dim, depth, ...): "
                           f"{str(e).splitlines()[0]} ..."]) from e


def _resampled(key: str, value: Tensor, shape: torch.Size) -> Tensor:
    """The absolute position embedding (1, G, G, C) bicubic, a relative-position table (2G-1, C) linear, to
    ``shape``; anything else unchanged (the strict load then names it)."""
    if key == "pos_embed" and value.ndim == 4:
        grid = F.interpolate(value.permute(0, 3, 1, 2).float(), size=tuple(shape[1:3]), mode="bicubic",
                             align_corners=False)
        return grid.permute(0, 2, 3, 1).to(value.dtype)
    if key.endswith(("rel_pos_h", "rel_pos_w")) and value.ndim == 2 and value.shape[1] == shape[1]:
        table = F.interpolate(value.t()[None].float(), size=shape[0], mode="linear", align_corners=False)
        return table[0].t().to(value.dtype)
    return value
