"""``var`` through the engine: a tiny msrq tokenizer run, then a generator run on its tokens (made on the fly from
images), checkpointed without the tokenizer's quantizer, loaded back and sampled into images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from xqgan_core import Engine, Registry
from xqgan_core.checkpoint import latest_checkpoint, load_tensors
from xqgan_core.generator_run import load_generator_run

CNN = 'use = "cnn"\nchannels = 8\nchannel_mult = [1, 1, 1]\nnum_res_blocks = 1\nz_channels = 8\nlevel_attention = false'

TOKENIZER = f"""
[run]
name = "tok"
out_dir = "{{out}}"

[data]
use = "folder"
root = "{{data}}"
resolution = 16
holdout = 0.25

[encoder]
{CNN}
out_dim = 4

[quantizer]
use = "msrq"
scales = [1, 2, 4]
phi_count = 1
[quantizer.code]
use = "vq"
codebook_size = 16
dim = 4

[decoder]
{CNN}
in_dim = 4

[train]
steps = 2
batch_size = 4
warmup_steps = 1
checkpoint_every = 2
eval_every = 2

[loss]
perceptual = 0.0

[eval]
lpips = false
grid_images = 0
"""

GENERATOR = """
[run]
name = "gen"
out_dir = "{out}"

[tokenizer]
run = "{tok}"

[generator]
use = "var"
depth = 1
width = 16
heads = 2

[data]
use = "folder"
root = "{data}"
resolution = 16
holdout = 0.25

[train]
steps = 4
batch_size = 4
warmup_steps = 1
checkpoint_every = 2
eval_every = 4
lr = 3e-3

[eval]
batch_size = 4
grid_images = 4

[sample]
cfg_scale = 2.0
top_k = 4
"""


def images(folder: Path, n: int = 8) -> None:
    """Blurry random 16-px images in two class folders."""
    rng = np.random.default_rng(0)
    for i in range(n):
        sub = folder / ("a" if i % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((16, 16), Image.BILINEAR).save(
            sub / f"{i}.png")


def test_var_trains_on_an_msrq_tokenizer_and_samples_images(tmp_path: Path) -> None:
    images(tmp_path / "data")
    (tmp_path / "tok.toml").write_text(TOKENIZER.format(out=tmp_path / "tok", data=tmp_path / "data"))
    Engine(Registry.from_toml(tmp_path / "tok.toml")).fit()
    (tmp_path / "gen.toml").write_text(GENERATOR.format(out=tmp_path / "gen", tok=tmp_path / "tok",
                                                        data=tmp_path / "data"))
    metrics = Engine(Registry.from_toml(tmp_path / "gen.toml")).fit()
    assert metrics["ce"] > 0
    ck = latest_checkpoint(tmp_path / "gen")
    assert ck is not None and (tmp_path / "gen" / "samples.png").is_file()
    saved = load_tensors(ck / "generator.safetensors")
    assert saved and not any("quantizer" in k or k == "attn_mask" for k in saved)
    run = load_generator_run(tmp_path / "gen", device="cpu")
    with torch.no_grad():
        tokens = run.generator.sample(2, torch.tensor([0, 1]), cfg_scale=2.0, top_k=4,
                                      generator=torch.Generator().manual_seed(0))
        pictures = run.decode(tokens)
    assert tokens.shape == (2, 1 + 4 + 16, 1) and int(tokens.max()) < 16
    assert pictures.shape == (2, 3, 16, 16) and torch.isfinite(pictures).all()
