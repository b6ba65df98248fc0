"""The sam aligner: the aligner contract on a tiny SAM image encoder of segment-anything's real architecture with
random weights saved as a whole-SAM .pth (read with weights_only) at a larger input size than it is used at, so the
real loader resamples its position tables; the offline error."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch

from xqgan_core import ConfigError, build
from xqgan_core.testing import AlignerContract
from xqgan_plugin_sam.tiny import TINY_ARCH, save_tiny_weights, tiny_options

WEIGHTS = save_tiny_weights(Path(tempfile.mkdtemp(prefix="xqgan-sam-")) / "tiny-sam.pth")
OPTIONS = tiny_options(WEIGHTS)  # a 64-px file used at 32 px


class TestSAMPatchContract(AlignerContract):
    name = "sam"
    options = {**OPTIONS, "mode": "patch", "loss": "cosine", "branch": 0}


class TestSAMGlobalContract(AlignerContract):
    name = "sam"
    options = OPTIONS


def test_checkpoint_is_resampled_to_the_input_size() -> None:
    saved = torch.load(WEIGHTS, weights_only=True)
    teacher = build("aligner", {"use": "sam", **OPTIONS}).teacher  # 64-px file used at 32 px: 8x8 -> 4x4 grid
    enc = teacher.encoder
    assert enc.pos_embed.shape == (1, 4, 4, 16)
    assert enc.blocks[1].attn.rel_pos_h.shape == (7, 8)  # global block: 2 * 4 - 1 positions (file: 15)
    torch.testing.assert_close(enc.blocks[0].attn.rel_pos_h, saved["image_encoder.blocks.0.attn.rel_pos_h"])
    torch.testing.assert_close(enc.neck[0].weight, saved["image_encoder.neck.0.weight"])
    feats = teacher.features(torch.rand(2, 3, 16, 16) * 2 - 1)
    assert feats.patches.shape == (2, 8, 4, 4) and feats.cls.shape == (2, 8)
    torch.testing.assert_close(feats.cls, feats.patches.mean(dim=(2, 3)))


def test_same_geometry_loads_bit_identical_weights() -> None:
    teacher = build("aligner", {"use": "sam", **OPTIONS, "image_size": 64}).teacher
    saved = torch.load(WEIGHTS, weights_only=True)
    for key, value in teacher.encoder.state_dict().items():
        assert torch.equal(value, saved[f"image_encoder.{key}"]), key


def test_missing_weights_offline_fail_before_training(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XQGAN_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(ConfigError, match=r"sam_vit_b_01ec64\.pth.*offline"):
        build("aligner", {"use": "sam", **TINY_ARCH})
    with pytest.raises(ConfigError, match="do not fit"):
        build("aligner", {"use": "sam", **OPTIONS, "depth": 3})
