"""DiffAug: each operation does what it says per sample, gradients reach the images, draws follow the RNG (exact
resume), the run-file option is validated and actually reaches the discriminators in training."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from engine_fixtures import make_images, tiny_run

from xqgan_core import ConfigError, Registry
from xqgan_core.checkpoint import latest_checkpoint, load_tensors
from xqgan_core.diffaug import DiffAug, parse_policy
from xqgan_core.engine import Engine
from xqgan_core.errors import RunInterrupted
from xqgan_core.trainer import Trainer


def distinct_images(b: int = 4, h: int = 16, w: int = 16) -> torch.Tensor:
    """Images whose every pixel value is unique and non-zero (so shifts and holes are recognisable)."""
    return (torch.arange(b * 3 * h * w, dtype=torch.float32).view(b, 3, h, w) + 1) / (b * 3 * h * w)


def test_policy_names_are_parsed_and_checked():
    assert parse_policy(" translation, color ,cutout") == ("translation", "color", "cutout")
    assert parse_policy("") == ()
    with pytest.raises(ValueError, match=r"unknown DiffAug operation\(s\) 'colour'.*translation, color, cutout"):
        parse_policy("translation,colour")
    with pytest.raises(ValueError, match="'color' named more than once"):
        parse_policy("color,color")


def test_translation_shifts_each_sample_by_at_most_an_eighth_zero_filled():
    x = distinct_images(b=8)
    out = DiffAug(("translation",))(x, torch.Generator().manual_seed(0))
    shifts = set()
    for i in range(8):
        matches = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                   if torch.equal(out[i], _shifted(x[i], dy, dx))]
        assert len(matches) == 1, f"sample {i} is not a shifted copy within 16/8 = 2 pixels"
        shifts.add(matches[0])
    assert len(shifts) > 1  # drawn per sample


def _shifted(img: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """out[y, x] = img[y + dy, x + dx], zero outside."""
    _, h, w = img.shape
    out = torch.zeros_like(img)
    ys, xs = slice(max(0, -dy), min(h, h - dy)), slice(max(0, -dx), min(w, w - dx))
    out[:, ys, xs] = img[:, ys.start + dy: ys.stop + dy, xs.start + dx: xs.stop + dx]
    return out


def test_color_on_a_grey_image_only_changes_brightness_per_sample():
    x = torch.full((6, 3, 8, 8), 0.2)
    out = DiffAug(("color",))(x, torch.Generator().manual_seed(0))
    offsets = (out - x)[:, 0, 0, 0]
    assert torch.allclose(out, x + offsets.view(6, 1, 1, 1), atol=1e-6)  # saturation / contrast keep a flat image
    assert offsets.abs().max() <= 0.5 and len(set(offsets.tolist())) == 6


def test_color_scales_saturation_and_contrast():
    torch.manual_seed(0)
    x = torch.rand(64, 3, 8, 8) * 2 - 1
    out = DiffAug(("color",))(x)
    ratio = out.std(dim=(1, 2, 3)) / x.std(dim=(1, 2, 3))
    assert ratio.min() < 0.6 and ratio.max() > 1.3  # saturation in (0, 2) x contrast in (0.5, 1.5)


def test_cutout_zeroes_one_square_of_a_fifth_of_the_side_per_sample():
    x = torch.ones(16, 3, 20, 20)
    out = DiffAug(("cutout",))(x, torch.Generator().manual_seed(0))
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 0], out[:, 2])  # the same hole in every channel
    corners = set()
    for hole in (out[:, 0] == 0):
        ys, xs = hole.nonzero(as_tuple=True)
        assert len(ys) > 0 and hole.sum() == (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)  # a rectangle
        assert ys.max() - ys.min() + 1 <= 4 and xs.max() - xs.min() + 1 <= 4  # 0.2 * 20, clipped at the border
        corners.add((int(ys.min()), int(xs.min())))
    assert len(corners) > 4


def test_prob_is_drawn_per_sample():
    x = distinct_images(b=64)
    out = DiffAug(("translation", "color", "cutout"), prob=0.5)(x, torch.Generator().manual_seed(0))
    unchanged = sum(torch.equal(out[i], x[i]) for i in range(64))
    assert 0 < unchanged < 64  # each op hits a sample with p = 0.5: about 1/8 come through untouched
    assert torch.equal(DiffAug(("color",), prob=0.0)(x), x)


@pytest.mark.parametrize("policy", ["translation", "color", "cutout", "translation,color,cutout"])
def test_gradient_reaches_the_images(policy):
    torch.manual_seed(0)
    x = torch.rand(4, 3, 16, 16, requires_grad=True)
    out = DiffAug(parse_policy(policy))(x)
    (out * torch.randn_like(out)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_translation_gradient_is_the_shift_back():
    x = distinct_images(b=1, h=8, w=8).requires_grad_(True)
    g = torch.Generator().manual_seed(3)
    out = DiffAug(("translation",))(x, g)
    out.sum().backward()
    # every input pixel is used at most once: gradient 1 where it landed inside the image, 0 where it fell out
    assert set(x.grad.unique().tolist()) <= {0.0, 1.0}
    assert x.grad.sum() == (out != 0).sum()


def test_draws_come_from_the_generator_or_the_global_rng():
    x = distinct_images()
    aug = DiffAug(("translation", "color", "cutout"))
    a = aug(x, torch.Generator().manual_seed(7))
    assert torch.equal(a, aug(x, torch.Generator().manual_seed(7)))
    torch.manual_seed(1)
    b = aug(x)
    torch.manual_seed(1)
    assert torch.equal(b, aug(x)) and not torch.equal(a, b)


def test_run_file_validates_the_policy(tmp_path):
    run = tmp_path / "run.toml"
    run.write_text(tiny_run(tmp_path / "data", tmp_path / "out") + '\n')
    with pytest.raises(ConfigError, match=r"loss\.diffaug: unknown DiffAug operation\(s\) 'colour'"):
        Registry.from_toml(run, overrides=['loss.diffaug="translation,colour"'])
    with pytest.raises(ConfigError, match=r"loss\.diffaug_prob"):
        Registry.from_toml(run, overrides=["loss.diffaug_prob=1.5"])
    reg = Registry.from_toml(run, overrides=['loss.diffaug="translation,color,cutout"', "loss.diffaug_prob=0.5"])
    aug = DiffAug.from_loss_section(reg.config.loss)
    assert aug == DiffAug(("translation", "color", "cutout"), 0.5, 0.125, 0.2)
    assert DiffAug.from_loss_section(Registry.from_toml(run).config.loss) is None  # off by default


DIFFAUG = ['loss.diffaug="translation,color,cutout"']


def _run(tmp_path, data, name: str, overrides: list[str], **train):
    out = tmp_path / name
    path = tmp_path / f"{name}.toml"
    path.write_text(tiny_run(data, out, **{"steps": 6, "checkpoint_every": 2, "eval_every": 100, **train}))
    return out, Registry.from_toml(path, overrides=overrides)


def _final(out):
    ck = latest_checkpoint(out)
    return {stem: load_tensors(ck / f"{stem}.safetensors") for stem in ("model", "discriminators")}


def test_discriminators_see_augmented_images_in_both_steps(tmp_path, monkeypatch):
    make_images(tmp_path / "data")
    seen: list[tuple[bool, torch.Tensor]] = []
    from xqgan_plugin_patchgan.discriminator import PatchGANDiscriminator

    original = PatchGANDiscriminator.forward

    def forward(self, images):
        seen.append((torch.is_grad_enabled() and images.requires_grad, images.detach().clone()))
        return original(self, images)

    monkeypatch.setattr(PatchGANDiscriminator, "forward", forward)
    _, reg = _run(tmp_path, tmp_path / "data", "aug", DIFFAUG, steps=5)
    Engine(reg).fit()
    # steps 3 and 4 (0-based; disc_start = 3): adversarial term (fake, with grad) + discriminator step (real, fake) each
    assert len(seen) == 6
    # cutout leaves exact zeros and translation zero borders: images straight from the data never have those
    assert all((img == 0).any() for _, img in seen)
    assert [needs_grad for needs_grad, _ in seen] == [True, False, False] * 2


def test_exact_resume_with_diffaug(tmp_path, monkeypatch):
    make_images(tmp_path / "data")
    data = tmp_path / "data"
    out, reg = _run(tmp_path, data, "straight", DIFFAUG)
    Engine(reg).fit()
    expected = _final(out)

    original = Trainer._step

    def step(self, micro):  # SIGTERM before step 5: a checkpoint of step 4, then the same command again
        if self.state.step == 4 and not getattr(self, "_stopped", False):
            self._stopped = True
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, micro)

    monkeypatch.setattr(Trainer, "_step", step)
    out, reg = _run(tmp_path, data, "resumed", DIFFAUG)
    with pytest.raises((RunInterrupted, SystemExit, KeyboardInterrupt)):
        Engine(reg).fit()
    assert latest_checkpoint(out).name in {"step-00000004", "step-00000005"}  # stopped early, with a checkpoint
    _, reg = _run(tmp_path, data, "resumed", DIFFAUG)
    Engine(reg).fit()
    got = _final(out)
    for stem in expected:
        different = [k for k in expected[stem] if not torch.equal(expected[stem][k], got[stem][k])]
        assert not different, f"{stem}: {different[:5]}"
