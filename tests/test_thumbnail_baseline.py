"""The thumbnail baseline: a bicubic thumbnail at the token grid's size, scored like a reconstruction."""

from __future__ import annotations

import math

import torch
from torch.utils.data import Dataset

from xqgan_core.devices import CPUDevice
from xqgan_core.evaluation import evaluate
from xqgan_core.metrics import bicubic_thumbnail, psnr, ssim
from xqgan_core.model import TokenizerModel
from xqgan_core.registry import build

SIZE = 64
MEAN = 0.5  # on the [0, 1] scale the metrics use
AMPLITUDE = 0.1


def _unit_to_model(x: torch.Tensor) -> torch.Tensor:
    return x * 2 - 1


def _stripes(period: int) -> torch.Tensor:
    """(1, 3, SIZE, SIZE) grey MEAN +- AMPLITUDE in vertical stripes of ``period`` pixels (half light, half dark)."""
    col = torch.arange(SIZE)
    sign = torch.where((col // (period // 2)) % 2 == 0, 1.0, -1.0)
    unit = MEAN + AMPLITUDE * sign.view(1, 1, 1, SIZE).expand(1, 3, SIZE, SIZE)
    return _unit_to_model(unit)


# PSNR of the flat grey MEAN against the stripes: every pixel is off by AMPLITUDE -> 10 log10(1 / AMPLITUDE^2).
FLAT_PSNR = 10 * math.log10(1 / AMPLITUDE**2)  # 20 dB


def test_a_constant_image_survives_the_thumbnail_exactly() -> None:
    image = torch.full((2, 3, SIZE, SIZE), 0.3)
    thumb = bicubic_thumbnail(image, (16, 16))
    assert thumb.shape == image.shape
    torch.testing.assert_close(thumb, image)


def test_detail_finer_than_the_grid_is_averaged_away() -> None:
    """Stripes 2 px wide (finer than a 4x4 block of a 16x16 grid) leave only their mean: hand-computed 20 dB."""
    image = _stripes(period=4)
    thumb = bicubic_thumbnail(image, (16, 16))
    assert torch.allclose(thumb, torch.full_like(thumb, _unit_to_model(torch.tensor(MEAN)).item()), atol=0.05)
    assert abs(psnr(thumb, image).item() - FLAT_PSNR) < 0.3


def test_detail_coarser_than_the_grid_is_kept() -> None:
    """Stripes 16 px wide span four grid cells each: the thumbnail keeps them, far above the flat 20 dB."""
    image = _stripes(period=32)
    thumb = bicubic_thumbnail(image, (16, 16))
    assert psnr(thumb, image).item() > FLAT_PSNR + 8
    assert ssim(thumb, image).item() > 0.8


class _Images(Dataset):
    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[i]}


def _model(channel_mult: list[int]) -> TokenizerModel:
    """A tiny untrained CNN + VQ tokenizer; its downsampling is 2 ** (len(channel_mult) - 1)."""
    cnn = {"channels": 8, "channel_mult": channel_mult, "num_res_blocks": 1, "z_channels": 8,
           "level_attention": False, "mid_attention": False}
    return TokenizerModel(
        build("encoder", {"use": "cnn", "out_dim": 4, **cnn}),
        build("quantizer", {"use": "vq", "codebook_size": 16, "dim": 4}),
        build("decoder", {"use": "cnn", "in_dim": 4, **cnn}),
    )


def test_evaluate_scores_the_thumbnail_at_the_models_token_grid() -> None:
    """Stripes 4 px wide (period 8) fit a 16x16 grid (4x downsampling) but not an 8x8 one (8x): only the model's
    own grid decides which, and at 8x the baseline is the flat grey's hand-computed PSNR."""
    torch.manual_seed(0)
    images = _Images(torch.cat([_stripes(period=8), _stripes(period=8).flip(-1)]))
    fine, _ = evaluate(_model([1, 2, 2]), images, CPUDevice(CPUDevice.Config()), batch_size=2, progress=False)
    coarse, _ = evaluate(_model([1, 2, 2, 2]), images, CPUDevice(CPUDevice.Config()), batch_size=2, progress=False)
    assert abs(coarse["thumbnail/psnr"] - FLAT_PSNR) < 0.3
    assert fine["thumbnail/psnr"] > FLAT_PSNR + 3
    assert fine["thumbnail/ssim"] > coarse["thumbnail/ssim"] + 0.1
    # the baseline does not depend on the (untrained) model's reconstructions
    assert fine["thumbnail/psnr"] != fine["psnr"]
