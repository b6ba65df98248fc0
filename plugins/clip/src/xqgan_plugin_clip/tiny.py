"""Tiny random-weight CLIP teachers of open_clip's real architecture (a whole CLIP, text tower included, as released
checkpoints are), saved as a file the real loader reads: for tests and tiny CPU runs, never for real training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import open_clip
import torch
from safetensors.torch import save_file

#: the architecture overrides of a tiny teacher (options of the clip aligner)
TINY_ARCH: dict[str, int] = {"width": 16, "layers": 1, "head_width": 8, "patch_size": 4, "embed_dim": 8}


def save_tiny_weights(path: Path, image_size: int = 16, seed: int = 0) -> Path:
    """A whole open_clip CLIP (QuickGELU, as OpenAI's) shrunk to ``TINY_ARCH``, random weights, as safetensors."""
    vision = {"image_size": image_size, "layers": 1, "width": 16, "head_width": 8, "patch_size": 4}
    text = {"context_length": 8, "vocab_size": 32, "width": 16, "heads": 2, "layers": 1}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.model.CLIP(embed_dim=8, vision_cfg=vision, text_cfg=text, quick_gelu=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def tiny_options(path: Path, image_size: int = 16) -> dict[str, Any]:
    """The clip aligner options that read ``path`` (written by ``save_tiny_weights``)."""
    return {"weights": str(path), "image_size": image_size, **TINY_ARCH}
