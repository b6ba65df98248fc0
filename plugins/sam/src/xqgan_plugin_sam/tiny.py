"""Tiny random-weight SAM image encoders of segment-anything's real architecture, saved in the released checkpoints'
layout (a whole-SAM ``.pth``), for tests and tiny CPU runs, never for real training."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import torch
from segment_anything.modeling import ImageEncoderViT
from torch import nn

#: the architecture overrides of a tiny teacher (options of the sam aligner)
TINY_ARCH: dict[str, Any] = {"patch_size": 8, "embed_dim": 16, "depth": 2, "num_heads": 2,
                             "global_attn_indexes": [1], "window_size": 2, "out_chans": 8}


def tiny_encoder(img_size: int) -> ImageEncoderViT:
    """The tiny encoder (non-zero relative-position tables, so resampling them is visible)."""
    a = TINY_ARCH
    return ImageEncoderViT(img_size=img_size, patch_size=a["patch_size"], embed_dim=a["embed_dim"], depth=a["depth"],
                           num_heads=a["num_heads"], mlp_ratio=4, norm_layer=partial(nn.LayerNorm, eps=1e-6),
                           qkv_bias=True, use_rel_pos=True, rel_pos_zero_init=False,
                           global_attn_indexes=tuple(a["global_attn_indexes"]), window_size=a["window_size"],
                           out_chans=a["out_chans"])


def save_tiny_weights(path: Path, img_size: int = 64, seed: int = 0) -> Path:
    """Random weights with SAM's checkpoint keys (``image_encoder.*`` and a stand-in for the rest), as a .pth of
    plain tensors, at ``img_size`` (larger than the aligner's, so loading resamples the position tables)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        state = {f"image_encoder.{k}": v for k, v in tiny_encoder(img_size).state_dict().items()}
    state["mask_decoder.iou_token.weight"] = torch.zeros(1, TINY_ARCH["out_chans"])  # the rest of SAM: ignored
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def tiny_options(path: Path, image_size: int = 32) -> dict[str, Any]:
    """The sam aligner options that read ``path`` (written by ``save_tiny_weights``)."""
    return {"weights": str(path), "image_size": image_size, **TINY_ARCH}
