"""``use = "clip"``: the image tower of an open_clip model (default: ViT-B/16, OpenAI weights, the reference's
detail guide) as a frozen teacher, with the core's shared alignment head.

Only the vision tower is built (no text tower). Global feature: CLIP's image embedding (the final-norm class token
through CLIP's projection, ``embed_dim`` wide); patch features: the final-norm patch tokens (``width`` wide).
Preprocessing: CLIP's own mean / std (from open_clip's pretrained config), the tower's input size. With
``image_size`` other than the weights' (e.g. 256 as the reference, a 16x16 grid), the position embedding is
resampled by open_clip's ``resize_pos_embed``.

Weights: ``weights`` (a local .safetensors / .pt / .pth state dict, full CLIP or image tower only, read without
executing pickled code), else the ``pretrained`` tag's file in the Hugging Face cache (downloaded there when online).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import open_clip
from open_clip.model import CLIPVisionCfg, _build_vision_tower, resize_pos_embed
from torch import Tensor, nn

from xqgan_core import at_least, config, option
from xqgan_core.alignment import Preprocessing, Teacher, TeacherAligner, TeacherFeatures
from xqgan_core.errors import ConfigError
from xqgan_core.timm_weights import read_state_dict

KEY = "aligners.clip"
SAFE_FILE, PICKLE_FILE = "open_clip_model.safetensors", "open_clip_pytorch_model.bin"


class CLIPTeacher(Teacher):
    """An open_clip vision tower; returns (image embedding, patch tokens)."""

    def __init__(self, visual: nn.Module, preprocessing: Preprocessing, embed_dim: int, width: int) -> None:
        super().__init__()
        visual.output_tokens = True
        self.visual = visual
        self.preprocessing = preprocessing
        self.cls_dim, self.patch_dim = embed_dim, width

    def extract(self, pixels: Tensor) -> TeacherFeatures:
        pooled, tokens = self.visual(pixels)  # (B, embed_dim), (B, g*g, width)
        g = self.preprocessing.grid
        return TeacherFeatures(cls=pooled, patches=tokens.transpose(1, 2).reshape(tokens.shape[0], -1, g, g))


class CLIPAligner(TeacherAligner):
    """Aligns a branch of the codes with a frozen CLIP image tower (paper: ViT-B/16 OpenAI on branch 0)."""

    plugin_api = 1

    @config
    class Config(TeacherAligner.Config):
        model: str = option("ViT-B-16", help="open_clip architecture (open_clip.list_models()), e.g. ViT-B-16, ViT-L-14")
        pretrained: str = option(
            "openai", help="open_clip pretrained tag: its weights file in the Hugging Face cache (downloaded there "
            "when online; offline without it the run stops before training), its mean / std and QuickGELU setting")
        weights: str = option("", help="a local .safetensors / .pt / .pth state dict (full CLIP or image tower only) "
                                       "instead of the pretrained tag's file")
        image_size: int = option(0, help="teacher input size in px (0: the architecture's, 224 for ViT-B-16; the "
                                         "reference: 256); the position embedding is resampled", validator=at_least(0))
        width: int = option(0, help="override the tower's width (0: the architecture's; for tiny test teachers)",
                            validator=at_least(0))
        layers: int = option(0, help="override the tower's depth (0: the architecture's)", validator=at_least(0))
        head_width: int = option(0, help="override the width per attention head (0: the architecture's)",
                                 validator=at_least(0))
        patch_size: int = option(0, help="override the patch size (0: the architecture's)", validator=at_least(0))
        embed_dim: int = option(0, help="override the image embedding width (0: the architecture's)",
                                validator=at_least(0))

    @classmethod
    def save_tiny_teacher(cls, folder: Path) -> dict[str, Any]:
        from .tiny import save_tiny_weights, tiny_options

        return tiny_options(save_tiny_weights(folder / "tiny-clip.safetensors"))

    @classmethod
    def build_teacher(cls, config: Config) -> Teacher:
        model_cfg = open_clip.get_model_config(config.model)
        if model_cfg is None or "vision_cfg" not in model_cfg:
            raise ConfigError([f"{KEY}.model: {config.model!r} is not an open_clip architecture with an image tower "
                               f"(e.g. 'ViT-B-16'; see open_clip.list_models())"])
        overrides = {k: getattr(config, k) for k in ("image_size", "width", "layers", "head_width", "patch_size")
                     if getattr(config, k)}
        vision = dataclasses.replace(CLIPVisionCfg(**model_cfg["vision_cfg"]), **overrides)
        embed_dim = config.embed_dim or int(model_cfg["embed_dim"])
        tag = open_clip.get_pretrained_cfg(config.model, config.pretrained) if config.pretrained else {}
        if config.pretrained and not tag:
            raise ConfigError([f"{KEY}.pretrained: {config.model!r} has no pretrained tag {config.pretrained!r} "
                               f"(open_clip.list_pretrained_tags_by_model({config.model!r}))"])
        quick_gelu = bool(tag.get("quick_gelu", False) or model_cfg.get("quick_gelu", False))
        visual = _build_vision_tower(embed_dim, vision, quick_gelu=quick_gelu)
        _load_visual(visual, _read_weights(config, tag))
        mean = tuple(tag.get("mean", open_clip.OPENAI_DATASET_MEAN))
        std = tuple(tag.get("std", open_clip.OPENAI_DATASET_STD))
        patch = vision.patch_size if isinstance(vision.patch_size, int) else vision.patch_size[0]
        size = vision.image_size if isinstance(vision.image_size, int) else vision.image_size[0]
        return CLIPTeacher(visual, Preprocessing(mean, std, size, patch), embed_dim, vision.width)


def _read_weights(config: Any, tag: dict[str, Any]) -> dict[str, Tensor]:
    if config.weights:
        return read_state_dict(Path(config.weights).expanduser(), f"{KEY}.weights")
    if not tag.get("hf_hub"):
        raise ConfigError([f"{KEY}: pretrained tag {config.pretrained!r} of {config.model!r} has no Hugging Face "
                           f"hub file; download its weights yourself and set {KEY}.weights to the file"])
    from huggingface_hub import constants, hf_hub_download

    repo = tag["hf_hub"].rstrip("/")
    errors = []
    for filename in (SAFE_FILE, PICKLE_FILE):  # the .bin is read with weights_only=True, never unpickled freely
        try:
            path = Path(hf_hub_download(repo, filename))
        except Exception as e:  # noqa: BLE001 - offline without a cached copy, no network, missing file
            errors.append(type(e).__name__)
            continue
        return read_state_dict(path, f"{KEY}.pretrained")
    where = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}"
    offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
    raise ConfigError([
        f"{KEY}.pretrained = {config.pretrained!r}: no weights of {config.model} at {where} ({repo}/{SAFE_FILE}){offline} "
        f"and they could not be downloaded ({', '.join(errors)}). Download them on a machine with network access "
        f"into that cache, or set {KEY}.weights to a local file"])


def _load_visual(visual: nn.Module, state: dict[str, Tensor]) -> None:
    """Full-CLIP keys (``visual.*``) or image-tower keys; the position embedding resampled to the tower's grid."""
    if any(k.startswith("visual.") for k in state):
        state = {k: v for k, v in state.items() if k.startswith("visual.")}
    else:
        state = {f"visual.{k}": v for k, v in state.items()}
    resize_pos_embed(state, SimpleNamespace(visual=visual))
    state = {k[len("visual."):]: v for k, v in state.items()}
    try:
        visual.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ConfigError([f"{KEY}: the weights do not fit the image tower's options (model, width, layers, ...): "
                           f"{str(e).splitlines()[0]} ..."]) from e
