"""A tiny but complete training run (first-party CNN + VQ + PatchGAN on a folder of generated images)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def make_images(folder: Path, n: int = 12, size: int = 24, seed: int = 0) -> list[Path]:
    """Smooth random colour images, in two class sub-folders."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        sub = folder / ("a" if i % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        coarse = rng.uniform(0, 255, size=(4, 4, 3)).astype(np.uint8)
        img = Image.fromarray(coarse).resize((size, size), Image.BICUBIC)
        path = sub / f"img{i:02d}.png"
        img.save(path)
        paths.append(path)
    return paths


def tiny_run(data_root: Path, out_dir: Path, **train) -> str:
    """A run file for a few-second CPU run; ``train`` overrides [train] keys."""
    train_table = {"steps": 6, "batch_size": 4, "checkpoint_every": 2, "eval_every": 6, "log_every": 1,
                   "warmup_steps": 2, "lr": 1e-3, **train}
    lines = "\n".join(f"{k} = {v!r}".replace("'", '"').replace("True", "true").replace("False", "false")
                      for k, v in train_table.items())
    return f"""
[run]
name = "tiny"
out_dir = "{out_dir}"

[data]
use = "folder"
root = "{data_root}"
resolution = 16
holdout = 0.25

[encoder]
use = "cnn"
channels = 16
channel_mult = [1, 2]
num_res_blocks = 1
z_channels = 16
level_attention = false
out_dim = 8

[quantizer]
use = "vq"
codebook_size = 32
dim = 8

[decoder]
use = "cnn"
channels = 16
channel_mult = [1, 2]
num_res_blocks = 1
z_channels = 16
level_attention = false
in_dim = 8

[[discriminators]]
use = "patchgan"
ndf = 8
n_layers = 1

[train]
{lines}

[loss]
perceptual = 0.0
disc_start = 3
lecam = 0.001

[eval]
lpips = false
grid_images = 4
"""
