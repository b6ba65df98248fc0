"""StyleGAN discriminator: the contract kit, shapes, the blur/stride arithmetic, minibatch std, equalized LR."""

from __future__ import annotations

import pytest
import torch

from xqgan_core import build
from xqgan_core.testing import DiscriminatorContract
from xqgan_plugin_stylegan.discriminator import Blur, DownBlock, minibatch_std


class TestStyleGAN(DiscriminatorContract):
    name = "stylegan"
    options = {"input_size": 32, "channels": 8, "max_channels": 32}


class TestStyleGANPlain(DiscriminatorContract):
    name = "stylegan"
    options = {"input_size": 32, "channels": 8, "max_channels": 16, "mbstd_group": 0, "equalized_lr": False}


def disc(**options):
    torch.manual_seed(0)
    return build("discriminator", {"use": "stylegan", "input_size": 32, "channels": 8, "max_channels": 32, **options})


def test_one_logit_per_image_and_blocks_down_to_4x4():
    d = disc()
    assert d(torch.zeros(3, 3, 32, 32)).shape == (3, 1)
    assert len(d.blocks) == 3  # 32 -> 16 -> 8 -> 4
    assert [b.conv2.weight.shape[0] for b in d.blocks] == [16, 32, 32]  # doubling, capped at max_channels


def test_down_block_halves_the_map_and_blur_preserves_constants():
    assert DownBlock(4, 8, equalized=True)(torch.randn(2, 4, 16, 16)).shape == (2, 8, 8, 8)
    blurred = Blur(2, pad=2)(torch.ones(1, 2, 8, 8))
    assert blurred.shape == (1, 2, 9, 9)
    assert torch.allclose(blurred[..., 3:-3, 3:-3], torch.ones(1, 2, 3, 3))  # a normalised low-pass filter


def test_minibatch_std_channel_measures_diversity_within_groups():
    same = torch.ones(4, 2, 4, 4)
    out = minibatch_std(same, group=4)
    assert out.shape == (4, 3, 4, 4) and torch.allclose(out[:, 2], torch.full((4, 4, 4), 1e-4))
    varied = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 2, 4, 4)
    assert minibatch_std(varied, group=4)[:, 2].mean() > 1.0
    assert minibatch_std(torch.randn(3, 2, 4, 4), group=4).shape == (3, 3, 4, 4)  # group shrinks to divide 3


def test_equalized_lr_scales_at_run_time():
    eq, plain = disc(), disc(equalized_lr=False)
    w_eq, w_plain = eq.from_rgb.weight, plain.from_rgb.weight
    assert w_eq.std() > 0.5  # stored ~N(0,1)
    assert torch.allclose(w_eq * eq.from_rgb.scale, w_plain)  # same effective weights, same seed


def test_wrong_image_size_names_the_option():
    with pytest.raises(ValueError, match=r"input_size = 32; set it to the run's data.resolution"):
        disc()(torch.zeros(2, 3, 64, 64))


def test_input_size_must_be_a_power_of_two():
    with pytest.raises(ValueError, match="power of two"):
        disc(input_size=48)


def test_trains_a_tokenizer_through_the_engine(tmp_path):
    import json

    from engine_fixtures import make_images, tiny_run

    from xqgan_core import Registry
    from xqgan_core.engine import Engine

    make_images(tmp_path / "data")
    run = tiny_run(tmp_path / "data", tmp_path / "out", steps=5).replace(
        'use = "patchgan"\nndf = 8\nn_layers = 1', 'use = "stylegan"\ninput_size = 16\nchannels = 8\nmax_channels = 16')
    assert 'use = "stylegan"' in run
    (tmp_path / "run.toml").write_text(run)
    Engine(Registry.from_toml(tmp_path / "run.toml")).fit()
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if r.get("split") == "train" and "d_loss" in r]
    assert trained and all(torch.isfinite(torch.tensor(r["d_loss"])) for r in trained)
    assert all("adv" in r for r in trained)  # the generator felt the discriminator too
