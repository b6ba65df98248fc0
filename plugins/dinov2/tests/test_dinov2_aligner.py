"""The dinov2 aligner: the aligner contract on a tiny DINOv2 of the real timm architecture with random weights saved
to a file and read by the real loader; the resampled geometry of the reference (16-px patches); the offline error."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from xqgan_core import ConfigError, build
from xqgan_core.testing import AlignerContract, TinyTeacher
from xqgan_plugin_dinov2.tiny import save_tiny_weights, tiny_options

WEIGHTS = save_tiny_weights(Path(tempfile.mkdtemp(prefix="xqgan-dinov2-")) / "tiny-dinov2.safetensors")
OPTIONS = tiny_options(WEIGHTS)


class TestDINOv2GlobalContract(AlignerContract):
    name = "dinov2"
    options = OPTIONS


class TestDINOv2PatchContract(AlignerContract):
    name = "dinov2"
    options = {**OPTIONS, "mode": "patch", "loss": "cosine", "branch": 0, "scale": 1}


class TestDINOv2LearnedLogitScaleContract(AlignerContract):
    name = "dinov2"
    options = {**OPTIONS, "normalize": True, "learn_logit_scale": True, "logit_scale": 10.0}

    def test_the_learned_scale_is_part_of_the_head(self) -> None:
        aligner = self.make()
        assert "log_logit_scale" in aligner.state_dict()
        self.total(aligner(self.inputs())).backward()
        assert aligner.log_logit_scale.grad is not None and aligner.log_logit_scale.grad != 0
        torch.testing.assert_close(aligner.logit_scale(0), torch.tensor(10.0))


class TestDINOv2WithTinyTeacherContract(AlignerContract):
    """The kit's random teacher in place of DINOv2 (how a third party tests a head without weights)."""

    name = "dinov2"
    options = {"mode": "patch", "loss": "infonce"}
    teacher = TinyTeacher


def test_teacher_is_resampled_to_16px_patches_and_reads_the_file() -> None:
    aligner = build("aligner", {"use": "dinov2", **OPTIONS})
    teacher = aligner.teacher
    assert teacher.preprocessing.patch_size == 4 and teacher.preprocessing.grid == 4
    assert teacher.net.patch_embed.proj.weight.shape[-1] == 4  # resampled from the file's 14-px kernel
    file = load_file(str(WEIGHTS))
    torch.testing.assert_close(teacher.net.blocks[0].attn.qkv.weight, file["blocks.0.attn.qkv.weight"])
    feats = teacher.features(torch.rand(2, 3, 32, 32) * 2 - 1)  # resized to image_size
    assert feats.cls.shape == (2, 16) and feats.patches.shape == (2, 16, 4, 4)


def test_missing_weights_offline_fail_before_training(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache, and no network
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError, match="aligners.dinov2.weights = 'vit_small_patch14_dinov2.lvd142m'.*HF_HUB_OFFLINE"):
        build("aligner", {"use": "dinov2", "variant": "small"})
    with pytest.raises(ConfigError, match="does not exist"):
        build("aligner", {"use": "dinov2", "weights": str(tmp_path / "nope.safetensors")})


def test_config_rejects_cosine_in_global_mode() -> None:
    with pytest.raises(ConfigError, match="loss"):
        build("aligner", {"use": "dinov2", "loss": "cosine", **OPTIONS})


def test_aligners_share_a_teacher_only_inside_shared_teachers() -> None:
    from xqgan_core.alignment import shared_teachers

    with shared_teachers():
        a = build("aligner", {"use": "dinov2", **OPTIONS})
        b = build("aligner", {"use": "dinov2", **OPTIONS, "mode": "patch", "loss": "cosine", "branch": 0})
        c = build("aligner", {"use": "dinov2", **OPTIONS, "teacher_precision": "fp32"})  # other teacher options
    assert a.teacher is b.teacher and c.teacher is not a.teacher
    d = build("aligner", {"use": "dinov2", **OPTIONS})
    assert d.teacher is not a.teacher  # outside: its own, so moving it never moves another aligner's
