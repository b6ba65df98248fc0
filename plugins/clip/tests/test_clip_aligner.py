"""The clip aligner: the aligner contract on a tiny CLIP of open_clip's real architecture with random weights saved to
a file (full CLIP keys, text tower included) and read by the real loader; image-tower-only files; the position
embedding resampled to another input size; the offline error."""

from __future__ import annotations

import tempfile
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import load_file, save_file

from xqgan_core import ConfigError, build
from xqgan_core.testing import AlignerContract
from xqgan_plugin_clip.tiny import TINY_ARCH, save_tiny_weights, tiny_options

WEIGHTS = save_tiny_weights(Path(tempfile.mkdtemp(prefix="xqgan-clip-")) / "tiny-clip.safetensors")
OPTIONS = tiny_options(WEIGHTS)


class TestCLIPGlobalContract(AlignerContract):
    name = "clip"
    options = {**OPTIONS, "branch": 0}


class TestCLIPPatchContract(AlignerContract):
    name = "clip"
    options = {**OPTIONS, "branch": 0, "mode": "patch", "loss": "infonce", "scale": 2}


def test_full_clip_file_fills_the_image_tower_with_clip_preprocessing() -> None:
    teacher = build("aligner", {"use": "clip", **OPTIONS}).teacher
    file = load_file(str(WEIGHTS))
    torch.testing.assert_close(teacher.visual.conv1.weight, file["visual.conv1.weight"])
    assert teacher.preprocessing.mean == tuple(open_clip.OPENAI_DATASET_MEAN)
    assert teacher.cls_dim == 8 and teacher.patch_dim == 16
    feats = teacher.features(torch.rand(2, 3, 16, 16) * 2 - 1)
    assert feats.cls.shape == (2, 8) and feats.patches.shape == (2, 16, 4, 4)


def test_image_tower_file_and_resampled_position_embedding(tmp_path: Path) -> None:
    full = load_file(str(WEIGHTS))
    tower = tmp_path / "tower.safetensors"
    save_file({k[len("visual."):]: v for k, v in full.items() if k.startswith("visual.")}, str(tower))
    teacher = build("aligner", {"use": "clip", **OPTIONS, "weights": str(tower), "image_size": 32}).teacher
    assert teacher.visual.positional_embedding.shape == (1 + 8 * 8, 16)  # 4x4 grid resampled to 8x8
    torch.testing.assert_close(teacher.visual.positional_embedding[0], full["visual.positional_embedding"][0])
    assert teacher.features(torch.zeros(1, 3, 32, 32)).patches.shape == (1, 16, 8, 8)


def test_missing_weights_offline_fail_before_training(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache, and no network
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError, match="aligners.clip.pretrained = 'openai'.*HF_HUB_OFFLINE"):
        build("aligner", {"use": "clip", **TINY_ARCH})
    with pytest.raises(ConfigError, match="not an open_clip architecture"):
        build("aligner", {"use": "clip", "model": "not-a-model", "weights": str(WEIGHTS)})
    with pytest.raises(ConfigError, match="do not fit"):
        build("aligner", {"use": "clip", **OPTIONS, "width": 32})
