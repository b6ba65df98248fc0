"""Tiny random-weight DINOv2 teachers of the real timm architecture, saved as a file the real loader reads: for tests
and tiny CPU runs (``xqgan-run make-tiny-teachers``), never for real training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import save_file

#: the architecture overrides of a tiny teacher (options of the dinov2 aligner)
TINY_ARCH: dict[str, int] = {"embed_dim": 16, "depth": 1, "num_heads": 2}


def save_tiny_weights(path: Path, seed: int = 0) -> Path:
    """DINOv2-S shrunk to ``TINY_ARCH``, random weights, at the released geometry (14-px patches, so loading
    exercises the resampling to the aligner's patch size), as safetensors."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=28,
                                patch_size=14, **TINY_ARCH)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


def tiny_options(path: Path, image_size: int = 16, patch_size: int = 4) -> dict[str, Any]:
    """The dinov2 aligner options that read ``path`` (written by ``save_tiny_weights``)."""
    return {"weights": str(path), "image_size": image_size, "patch_size": patch_size, **TINY_ARCH}
