"""Tiny tokenizer run folders with random weights (no training), for tokenization and generator tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from xqgan_core import checkpoint as ckpt
from xqgan_core.model import TokenizerModel
from xqgan_core.registry import Registry

CNN = {"use": "cnn", "channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "z_channels": 8,
       "level_attention": False, "mid_attention": False}  # fmt: skip


def write_tiny_tokenizer(out_dir: Path, *, seed: int = 0, resolution: int = 16,
                         quantizer: dict[str, Any] | None = None) -> Path:  # fmt: skip
    """A tokenizer run folder (CNN encoder/decoder, downsample 2, VQ of 64 codes by default) whose weights are a
    seeded random initialisation, saved through the real checkpoint writer; returns the checkpoint folder."""
    registry = Registry.from_dict({
        "run": {"name": f"tiny-tokenizer-{seed}", "out_dir": str(out_dir), "seed": seed},
        "device": "cpu",
        "data": {"use": "sample", "resolution": resolution},
        "encoder": {**CNN, "out_dim": 4},
        "quantizer": quantizer or {"use": "vq", "codebook_size": 64, "dim": 4},
        "decoder": {**CNN, "in_dim": 4},
    })  # fmt: skip
    cfg = registry.config
    torch.manual_seed(seed)
    model = TokenizerModel(cfg.encoder.build(), cfg.quantizer.build(), cfg.decoder.build())
    run_toml = registry.to_toml(with_provenance=True)
    return ckpt.save_checkpoint(out_dir, 0, {"model": model.state_dict()}, state={}, run_toml=run_toml, meta={}, keep=1)
