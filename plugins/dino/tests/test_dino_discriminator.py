"""DINO discriminator: the contract kit, the frozen trunk (loaded through the real loader, never trained, never saved,
no gradient), the heads (trained, saved, resumed exactly), local batch norm, crops, and clear errors.

The trunk is a tiny ViT of the real architecture with random weights saved to a file (DINO's weights cannot be
downloaded here); the default options are DINO ViT-S/16 itself.
"""

from __future__ import annotations

import os
import signal
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import VisionTransformer

from xqgan_core import ConfigError, Registry, build
from xqgan_core.checkpoint import latest_checkpoint, load_tensors
from xqgan_core.engine import Engine
from xqgan_core.errors import RunInterrupted
from xqgan_core.frozen import all_frozen_parts
from xqgan_core.testing import DiscriminatorContract
from xqgan_core.trainer import Trainer
from xqgan_plugin_dino.heads import LocalBatchNorm

TINY = {"embed_dim": 16, "depth": 4, "num_heads": 2, "patch_size": 8, "input_size": 32, "feature_blocks": [1, 3]}


def write_tiny_trunk(path: Path, seed: int = 123) -> Path:
    """Random weights of a timm ViT with TINY's architecture, saved as safetensors (as a user's local file)."""
    torch.manual_seed(seed)
    vit = VisionTransformer(img_size=TINY["input_size"], patch_size=TINY["patch_size"], embed_dim=TINY["embed_dim"],
                            depth=TINY["depth"], num_heads=TINY["num_heads"], num_classes=0, global_pool="")
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))
    return path


TRUNK_FILE = write_tiny_trunk(Path(tempfile.mkdtemp(prefix="xqgan-dino-test-")) / "tiny-dino.safetensors")


class TestDino(DiscriminatorContract):
    name = "dino"
    options = {"init": str(TRUNK_FILE), **TINY}


class TestDinoRandomTrunk(DiscriminatorContract):
    """init = '': random trunk weights drawn from a fixed seed, so rebuilds (round trip, resume) get the same ones."""

    name = "dino"
    options = {"init": "", **TINY, "feature_blocks": [3], "spectral_norm": False, "kernel_size": 3}


def disc(**options) -> torch.nn.Module:
    torch.manual_seed(0)
    return build("discriminator", {"use": "dino", "init": str(TRUNK_FILE), **TINY, **options})


def test_trunk_comes_from_the_file_and_is_frozen_outside_parameters_and_state_dict():
    d = disc()
    saved = load_file(str(TRUNK_FILE))
    trunk = d.trunk.state_dict()
    assert set(saved) == set(trunk) and all(torch.equal(saved[k], trunk[k]) for k in saved)
    trunk_ids = {id(p) for p in d.trunk.parameters()}
    assert not trunk_ids & {id(p) for p in d.parameters()}  # what optimizers, DDP and gradient averaging see
    assert all(k.startswith("heads.") for k in d.state_dict())  # what discriminators.safetensors holds
    assert all_frozen_parts(torch.nn.ModuleList([d])) == {"0.trunk": d.trunk}
    assert not any(p.requires_grad for p in d.trunk.parameters()) and not d.trunk.training
    d.train()
    assert not d.trunk.training  # stays in eval mode
    d.to(torch.float64)
    assert next(d.trunk.parameters()).dtype == torch.float64  # moves with its owner


def test_five_heads_by_default_and_one_logit_per_token_and_feature():
    d = disc()
    assert len(d.heads) == 1 + len(TINY["feature_blocks"])
    logits = d(torch.rand(3, 3, 32, 32) * 2 - 1)
    assert logits.shape == (3, 3 * (32 // 8) ** 2)
    default = build("discriminator", {"use": "dino", "init": ""})  # DINO ViT-S/16's shape: 5 heads of 384 channels
    assert len(default.heads) == 5
    n_heads = sum(p.numel() for p in default.parameters())
    assert n_heads == 5 * (384 * 384 + 384 + 384 * 384 * 9 + 384 + 384 + 1 + 4 * 384)  # 7.39 M, the reference's


def test_frozen_trunk_gets_no_gradient_but_passes_it_to_the_images():
    d = disc().train()
    x = (torch.rand(4, 3, 40, 40) * 2 - 1).requires_grad_(True)
    d(x).square().mean().backward()
    assert all(p.grad is None for p in d.trunk.parameters())
    assert all(p.grad is not None for p in d.heads.parameters())
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_local_batch_norm_uses_virtual_batches():
    norm = LocalBatchNorm(4, virtual_batch=8)
    x = torch.randn(16, 4, 5)
    out = norm(x)
    changed = x.clone()
    changed[12] += 10.0  # a sample of the second virtual batch
    out2 = norm(changed)
    assert torch.equal(out[:8], out2[:8]) and not torch.allclose(out[8:], out2[8:])
    group = out[:8].transpose(0, 1).reshape(4, -1)
    assert torch.allclose(group.mean(1), torch.zeros(4), atol=1e-5)
    assert torch.allclose(group.var(1, unbiased=False), torch.ones(4), atol=1e-3)
    assert norm(torch.randn(11, 4, 5)).shape == (11, 4, 5)  # 2 near-equal groups when 8 does not divide the batch


def test_training_crops_or_resizes_evaluation_resizes():
    d = disc(crop_prob=1.0)
    x = torch.rand(2, 3, 48, 48) * 2 - 1
    cropped = d.train().prepare(x)
    normalised = x * d.in_scale + d.in_shift
    windows = [normalised[:, :, i:i + 32, j:j + 32] for i in range(17) for j in range(17)]
    for b in range(2):
        assert any(torch.equal(cropped[b], w[b]) for w in windows)
    resized = d.eval().prepare(x)
    assert torch.allclose(resized, torch.nn.functional.interpolate(normalised, size=(32, 32), mode="area"))
    assert torch.equal(d.train().prepare(x[:, :, :32, :32]), normalised[:, :, :32, :32])  # already the right size


def test_normalisation_is_the_teachers_mean_and_std():
    d = disc()
    white = d.prepare(torch.ones(1, 3, 32, 32))[0, :, 0, 0]
    mean, std = torch.tensor((0.485, 0.456, 0.406)), torch.tensor((0.229, 0.224, 0.225))  # DINO's (ImageNet)
    assert torch.allclose(white, (1 - mean) / std)


def test_bad_options_are_named():
    with pytest.raises(ConfigError, match=r"feature_blocks \[7\] do not exist in a trunk of depth 4"):
        disc(feature_blocks=[1, 7])
    with pytest.raises(ConfigError, match="input_size .30. must be a multiple of patch_size"):
        disc(input_size=30)
    with pytest.raises(ConfigError, match=r"discriminators.init \(dino\).*do not fit"):
        disc(embed_dim=32, num_heads=2)  # the file's trunk is 16 wide
    with pytest.raises(ConfigError, match="does not exist"):
        disc(init=str(TRUNK_FILE.with_name("missing.safetensors")))


def test_default_weights_offline_fail_before_training_naming_the_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf

    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ConfigError, match=r"discriminators.init \(dino\) = 'vit_small_patch16_224.dino'.*"
                                          r"models--timm--vit_small_patch16_224.dino.*HF_HUB_OFFLINE"):
        build("discriminator", {"use": "dino"})


def test_a_config_made_in_python_is_checked_too():
    from xqgan_plugin_dino.discriminator import DinoDiscriminator

    with pytest.raises(ConfigError, match=r"discriminators \(dino\)\.num_heads \(3\) must divide embed_dim \(16\)"):
        DinoDiscriminator(DinoDiscriminator.Config(init="", **{**TINY, "num_heads": 3}))


# -- through the Engine ----------------------------------------------------------------------------------------------


def dino_run(tmp_path: Path, name: str, steps: int = 6) -> Registry:
    from engine_fixtures import make_images, tiny_run

    data = tmp_path / "data"
    if not data.exists():
        make_images(data)
    text = tiny_run(data, tmp_path / name, steps=steps, checkpoint_every=1, keep_checkpoints=10, eval_every=100)
    options = "\n".join(f"{k} = {v!r}".replace("'", '"') for k, v in {"init": str(TRUNK_FILE), **TINY}.items())
    text = text.replace('use = "patchgan"\nndf = 8\nn_layers = 1', f'use = "dino"\n{options}')
    text = text.replace("[loss]\n", '[loss]\ndiffaug = "translation,color,cutout"\n')
    assert 'use = "dino"' in text and "diffaug" in text
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return Registry.from_toml(path)


def test_engine_trains_the_heads_only_and_saves_them_only(tmp_path, monkeypatch):
    trainers: list[Trainer] = []
    fit = Trainer.fit

    def capture(self):
        trainers.append(self)
        return fit(self)

    monkeypatch.setattr(Trainer, "fit", capture)
    Engine(dino_run(tmp_path, "out")).fit()
    live = trainers[0].task.discs[0]
    saved = load_file(str(TRUNK_FILE))
    assert all(torch.equal(saved[k], v) for k, v in live.trunk.state_dict().items())  # bit-identical after training
    assert all(p.grad is None for p in live.trunk.parameters())
    opt_params = {id(p) for g in trainers[0].task.disc_opt.param_groups for p in g["params"]}
    assert opt_params == {id(p) for p in live.heads.parameters()}

    folders = sorted((tmp_path / "out" / "checkpoints").glob("step-*"))
    before, after = (load_tensors(f / "discriminators.safetensors") for f in (folders[1], folders[-1]))  # steps 2, 6
    assert all(k.startswith("0.heads.") for k in after)  # no trunk tensor in the checkpoint
    assert sum(v.numel() for v in after.values()) == sum(v.numel() for v in live.state_dict().values())
    moved = [k for k in before if k.endswith("weight_orig") and not torch.equal(before[k], after[k])]
    assert moved  # the heads trained (the discriminator starts at step 3)


def test_missing_default_weights_stop_the_run_before_its_folder_is_made(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf

    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hub"))
    path = tmp_path / "run.toml"
    dino_run(tmp_path, "out")  # writes out.toml
    path.write_text((tmp_path / "out.toml").read_text().replace(f'init = "{TRUNK_FILE}"\n', ""))
    with pytest.raises(ConfigError, match=r"discriminators.init \(dino\) = 'vit_small_patch16_224.dino'"):
        Engine(Registry.from_toml(path)).fit()
    assert not (tmp_path / "out").exists()


def test_engine_resumes_the_heads_exactly(tmp_path, monkeypatch):
    Engine(dino_run(tmp_path, "straight")).fit()
    expected = load_tensors(latest_checkpoint(tmp_path / "straight") / "discriminators.safetensors")

    original = Trainer._step

    def step(self, micro):  # SIGTERM before step 5: stops with a checkpoint, then the same command again
        if self.state.step == 4 and not getattr(self, "_stopped", False):
            self._stopped = True
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, micro)

    monkeypatch.setattr(Trainer, "_step", step)
    with pytest.raises((RunInterrupted, SystemExit, KeyboardInterrupt)):
        Engine(dino_run(tmp_path, "resumed")).fit()
    assert latest_checkpoint(tmp_path / "resumed").name != "step-00000006"
    Engine(dino_run(tmp_path, "resumed")).fit()
    got = load_tensors(latest_checkpoint(tmp_path / "resumed") / "discriminators.safetensors")
    assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in expected)
