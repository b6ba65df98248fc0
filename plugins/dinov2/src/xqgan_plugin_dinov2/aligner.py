"""``use = "dinov2"``: a frozen timm DINOv2 (S/B/L/g) teacher with the core's shared alignment head.

As the reference, the teacher runs at ``image_size = 256`` with ``patch_size = 16`` (a 16x16 patch grid): the
released 14-px-patch, 518-px weights are resampled to that geometry when loaded (timm's ``checkpoint_filter_fn``
resamples the patch embedding and the position embedding). Global feature: the final-norm CLS token; patch
features: the final-norm patch tokens (register tokens, if any, skipped).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import timm
from torch import Tensor

from xqgan_core import at_least, config, option
from xqgan_core.alignment import IMAGENET_MEAN, IMAGENET_STD, Preprocessing, Teacher, TeacherAligner, TeacherFeatures
from xqgan_core.timm_weights import load_trunk_weights

#: variant -> timm model (architecture and, through the Hugging Face cache, weights)
VARIANTS = {
    "small": "vit_small_patch14_dinov2.lvd142m",
    "base": "vit_base_patch14_dinov2.lvd142m",
    "large": "vit_large_patch14_dinov2.lvd142m",
    "giant": "vit_giant_patch14_dinov2.lvd142m",
}


class DINOv2Teacher(Teacher):
    """A timm DINOv2 ViT at ``image_size`` px with ``patch_size``-px patches (ImageNet mean / std)."""

    def __init__(self, model_name: str, weights: str, image_size: int, patch_size: int, arch: dict[str, int],
                 key: str) -> None:
        super().__init__()
        self.net = timm.create_model(model_name.split(".")[0], pretrained=False, num_classes=0, img_size=image_size,
                                     patch_size=patch_size, drop_path_rate=0.0, **arch)
        load_trunk_weights(self.net, weights or model_name, key)
        self.preprocessing = Preprocessing(IMAGENET_MEAN, IMAGENET_STD, image_size, patch_size)
        self.cls_dim = self.patch_dim = int(self.net.embed_dim)

    def extract(self, pixels: Tensor) -> TeacherFeatures:
        tokens = self.net.forward_features(pixels)  # (B, prefix + g*g, D), after the final norm
        g = self.preprocessing.grid
        patches = tokens[:, self.net.num_prefix_tokens:].transpose(1, 2).reshape(tokens.shape[0], -1, g, g)
        return TeacherFeatures(cls=tokens[:, 0], patches=patches)


class DINOv2Aligner(TeacherAligner):
    """Aligns a branch of the codes with a frozen DINOv2 (paper: DINOv2-B on the last, semantic branch)."""

    plugin_api = 1

    @config
    class Config(TeacherAligner.Config):
        variant: Literal["small", "base", "large", "giant"] = option(
            "base", help="DINOv2 size: small / base / large / giant = timm's vit_{small,base,large,giant}_patch14_"
            "dinov2.lvd142m (reference: base)")
        weights: str = option(
            "", help="a .safetensors / .pt / .pth state dict of the variant; empty: the variant's timm weights from "
            "the Hugging Face cache (downloaded there when online; offline without them the run stops before "
            "training)")
        image_size: int = option(256, help="teacher input size in px (images are resized to it)",
                                 validator=at_least(1))
        patch_size: int = option(16, help="teacher patch size in px; the weights' 14-px patch embedding is resampled "
                                          "(reference: 16 at 256 px, a 16x16 grid)", validator=at_least(1))
        embed_dim: int = option(0, help="override the variant's width (0: the variant's; for tiny test teachers)",
                                validator=at_least(0))
        depth: int = option(0, help="override the variant's depth (0: the variant's)", validator=at_least(0))
        num_heads: int = option(0, help="override the variant's heads (0: the variant's)", validator=at_least(0))

    @classmethod
    def save_tiny_teacher(cls, folder: Path) -> dict[str, Any]:
        from .tiny import save_tiny_weights, tiny_options

        return tiny_options(save_tiny_weights(folder / "tiny-dinov2.safetensors"))

    @classmethod
    def build_teacher(cls, config: Config) -> Teacher:
        arch = {k: v for k, v in (("embed_dim", config.embed_dim), ("depth", config.depth),
                                  ("num_heads", config.num_heads)) if v}
        return DINOv2Teacher(VARIANTS[config.variant], config.weights, config.image_size, config.patch_size, arch,
                             key="aligners.dinov2.weights")
