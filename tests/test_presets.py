"""Every shipped run file validates, and each GPU preset is the paper row its name promises.

The 256-px models (~72 M parameters) are built on the meta device: shapes and parameter counts without memory or
initialisation time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from xqgan_core import Registry

ROOT = Path(__file__).resolve().parents[1]
RUN_FILES = sorted([ROOT / "registry.toml", *(ROOT / "configs").glob("*.toml")])
PRESETS = sorted((ROOT / "configs").glob("*.toml"))


@dataclass(frozen=True)
class PaperRow:
    """What a preset's name promises (XQ-GAN paper, Table 2 naming: P = product branches, R = residual scales)."""

    branches: int  # P
    code: str  # the innermost quantizer: vq or bsq
    codebook_size: int  # codes per codebook (bsq: 2**bits)
    code_dim: int | None  # dim of one vq code (bsq: its bits)
    scales: int | None  # multi-scale residual levels (None: single level)


#: XQ-GAN-V (the CNN backbone) at 256 px: 16x downsampling, so every branch sees a 16x16 token grid.
PAPER_ROWS: dict[str, PaperRow] = {
    "xqgan-v-vq16-256": PaperRow(branches=1, code="vq", codebook_size=16384, code_dim=8, scales=None),
    "xqgan-v-vp2-16384": PaperRow(branches=2, code="vq", codebook_size=16384, code_dim=32, scales=None),
    "xqgan-v-msvr10p2-4096": PaperRow(branches=2, code="vq", codebook_size=4096, code_dim=32, scales=10),
    "xqgan-v-msbr10p2-16384": PaperRow(branches=2, code="bsq", codebook_size=16384, code_dim=14, scales=10),
}
RESOLUTION, GRID = 256, 16


@pytest.mark.parametrize("path", RUN_FILES, ids=lambda p: p.name)
def test_run_file_validates(path: Path) -> None:
    reg = Registry.from_toml(path)
    assert reg.config.encoder.config.out_dim == reg.config.decoder.config.in_dim
    q = reg.config.quantizer.build()
    assert q.dim == reg.config.encoder.config.out_dim, "the quantizer's dim must match the encoder's out_dim"


def test_every_preset_has_a_paper_row() -> None:
    assert {p.stem for p in PRESETS} == set(PAPER_ROWS)


def _single_level(spec: Any, row: PaperRow) -> None:
    """The innermost quantizer table: vq with its codebook and dim, or bsq with its bits."""
    assert spec.use == row.code
    if row.code == "vq":
        assert (spec.config.codebook_size, spec.config.dim) == (row.codebook_size, row.code_dim)
        assert spec.config.l2_norm, "XQ-GAN's VQ is l2-normalised"
    else:
        assert 2**spec.config.bits == row.codebook_size and spec.config.bits == row.code_dim
        assert spec.config.entropy_weight == pytest.approx(0.1)


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_is_the_paper_row_it_names(path: Path) -> None:
    row = PAPER_ROWS[path.stem]
    cfg = Registry.from_toml(path).config
    assert cfg.data.config.resolution == RESOLUTION

    # the quantizer hierarchy: P product branches x (multi-scale residual levels) x the single-level code
    spec = cfg.quantizer
    if row.branches > 1:
        assert spec.use == "pq" and spec.config.branches == row.branches
        spec = spec.config.branch
    if row.scales is not None:
        assert spec.use == "msrq"
        scales = spec.config.scales
        assert len(scales) == row.scales and list(scales) == sorted(scales)
        assert scales[-1] == GRID, "the last scale is the full token grid"
        assert (spec.config.dropout.rate, spec.config.dropout.min_levels) == (pytest.approx(0.1), 3)
        spec = spec.config.code
    _single_level(spec, row)

    # built on the meta device: the token grid, the latent width and the model size
    with torch.device("meta"):
        encoder, decoder, quantizer = (cfg.encoder.build(), cfg.decoder.build(), cfg.quantizer.build())
        latents = encoder(torch.empty(1, 3, RESOLUTION, RESOLUTION))
        images = decoder(torch.empty(1, decoder.in_dim, GRID, GRID))
    assert tuple(latents.shape) == (1, quantizer.dim, GRID, GRID)
    assert tuple(images.shape) == (1, 3, RESOLUTION, RESOLUTION)
    assert quantizer.dim == row.branches * row.code_dim  # each branch quantizes its own channel group
    assert quantizer.num_levels == (row.scales or 1)
    params = sum(p.numel() for m in (encoder, decoder, quantizer) for p in m.parameters())
    assert 70e6 < params < 74e6, f"{params / 1e6:.1f} M parameters; XQ-GAN-V at 256 px has ~72 M"


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_trains_as_the_paper_does(path: Path) -> None:
    """GPU settings, the perceptual loss that may not silently switch off, and lr = 1e-4 x (global batch / 128)."""
    cfg = Registry.from_toml(path).config
    assert cfg.device is not None and cfg.device.use == "cuda"
    assert cfg.train.precision == "bf16"
    assert cfg.loss.perceptual > 0 and cfg.loss.require_perceptual
    global_batch = 8 * cfg.train.batch_size * cfg.train.grad_accum  # the 8-GPU node the presets are written for
    assert cfg.train.lr == pytest.approx(1e-4 * global_batch / 128)
    assert cfg.loss.adversarial > 0 and cfg.discriminators[0].use == "patchgan"
