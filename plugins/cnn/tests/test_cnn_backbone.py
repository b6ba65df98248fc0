"""Contract and behaviour tests for the CNN encoder/decoder plugin (tiny sizes; the whole file runs in seconds)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from xqgan_core import build
from xqgan_core.testing import DecoderContract, EncoderContract
from xqgan_plugin_cnn import blocks
from xqgan_plugin_cnn.blocks import AttnBlock, Normalize, group_count

TINY: dict[str, Any] = {"channels": 32, "channel_mult": [1, 2], "num_res_blocks": 1, "z_channels": 32}


class TestCNNEncoderContract(EncoderContract):
    name = "cnn"
    options = {**TINY, "out_dim": 8}


class TestCNNDecoderContract(DecoderContract):
    name = "cnn"
    options = {**TINY, "in_dim": 8}


PATCH_STEM: dict[str, Any] = {**TINY, "patch_size": 2}


class TestPatchStemEncoderContract(EncoderContract):
    name = "cnn"
    options = {**PATCH_STEM, "out_dim": 8}


class TestPatchStemDecoderContract(DecoderContract):
    name = "cnn"
    options = {**PATCH_STEM, "in_dim": 8}


def _pair(**options: Any) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    return build("encoder", {"use": "cnn", **options}), build("decoder", {"use": "cnn", **options})


@pytest.mark.parametrize(("mult", "factor"), [([1, 1, 2, 2], 8), ([1, 1, 1, 2, 2], 16)])
def test_8x_and_16x_latent_sizes_on_64px(mult: list[int], factor: int) -> None:
    enc, dec = _pair(channels=32, channel_mult=mult, num_res_blocks=1, z_channels=32)
    assert enc.downsample == dec.upsample == factor
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        z = enc(x)
        assert z.shape == (1, 8, 64 // factor, 64 // factor)
        assert dec(z).shape == (1, 3, 64, 64)


@pytest.mark.parametrize("mult", [[1], [1, 2], [1, 1, 2, 2, 4]])
def test_config_downsample_matches_the_built_encoder(mult: list[int]) -> None:
    enc = build("encoder", {"use": "cnn", "channels": 8, "channel_mult": mult, "num_res_blocks": 1, "z_channels": 8})
    assert type(enc).config_downsample(enc.config) == enc.downsample == 2 ** (len(mult) - 1)


@pytest.mark.parametrize(("mult", "patch", "factor"), [([1], 4, 4), ([1, 2], 2, 4), ([1, 2], 4, 8)])
def test_patch_stem_folds_pixels_into_channels(mult: list[int], patch: int, factor: int) -> None:
    enc, dec = _pair(channels=16, channel_mult=mult, num_res_blocks=1, z_channels=16, patch_size=patch)
    assert type(enc).config_downsample(enc.config) == enc.downsample == dec.upsample == factor
    assert enc.conv_in.in_channels == 3 * patch**2 and dec.conv_out.out_channels == 3 * patch**2
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        z = enc(x)
        assert z.shape == (2, 8, 32 // factor, 32 // factor)
        assert dec(z).shape == (2, 3, 32, 32)
    # the stem is a pure rearrangement: the patch of pixels (i, j) of block (0, 0) is what conv_in reads at (0, 0)
    folded = enc.patchify(x)
    assert torch.equal(folded[:, :, 0, 0].view(2, 3, patch, patch), x[:, :, :patch, :patch])


def test_patch_size_1_keeps_the_vqgan_state_dict() -> None:
    enc, dec = _pair(**TINY)
    enc1, dec1 = _pair(**TINY, patch_size=1)
    assert enc.state_dict().keys() == enc1.state_dict().keys() and dec.state_dict().keys() == dec1.state_dict().keys()
    assert enc.conv_in.in_channels == 3 and dec.conv_out.out_channels == 3


def test_encoder_rejects_sizes_not_divisible_by_downsampling() -> None:
    enc, _ = _pair(**TINY)
    with pytest.raises(ValueError, match="not divisible"):
        enc(torch.zeros(1, 3, 33, 32))


@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_checkpointing_gives_same_outputs_and_gradients(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bool] = []

    def counting_checkpoint(fn: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs.get("use_reentrant"))
        return checkpoint(fn, *args, **kwargs)

    monkeypatch.setattr(blocks, "checkpoint", counting_checkpoint)
    # dropout > 0 also checks that recomputation replays the same dropout masks
    options = {**TINY, "dropout": 0.1}
    torch.manual_seed(0)
    plain = build(kind, {"use": "cnn", **options}).train()
    ckpt = build(kind, {"use": "cnn", **options, "checkpointing": True}).train()
    ckpt.load_state_dict(plain.state_dict())
    shape = (2, 3, 16, 16) if kind == "encoder" else (2, 8, 4, 4)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    outs, grads = [], []
    for m in (plain, ckpt):
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(7)
        y = m(xi)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outs.append(y.detach())
        grads.append([xi.grad] + [p.grad for p in m.parameters()])
    # one checkpointed stage per resolution level plus the mid block, only in the checkpointed model
    assert calls == [False] * (len(TINY["channel_mult"]) + 1)
    with torch.no_grad():
        ckpt.eval()(x)
    assert len(calls) == len(TINY["channel_mult"]) + 1  # never in eval / no-grad
    torch.testing.assert_close(outs[0], outs[1])
    assert len(grads[0]) == len(grads[1])
    for g0, g1 in zip(grads[0], grads[1], strict=True):
        assert g0 is not None and g1 is not None
        torch.testing.assert_close(g0, g1, atol=1e-5, rtol=1e-4)


def test_attention_switches_control_where_attention_blocks_are() -> None:
    def count(m: torch.nn.Module) -> int:
        return sum(isinstance(b, AttnBlock) for b in m.modules())

    opts = {**TINY, "num_res_blocks": 2}
    enc, dec = _pair(**opts)
    assert count(enc) == 1 + 2  # mid + after each ResBlock of the lowest level
    assert count(dec) == 1 + 2
    assert all(len(level.attn) == 0 for level in enc.levels[:-1]) and len(enc.levels[-1].attn) == 2
    assert len(dec.levels[0].attn) == 2 and all(len(level.attn) == 0 for level in dec.levels[1:])
    enc, dec = _pair(**opts, level_attention=False)
    assert count(enc) == count(dec) == 1
    enc, dec = _pair(**opts, level_attention=False, mid_attention=False)
    assert count(enc) == count(dec) == 0
    with torch.no_grad():
        assert dec(enc(torch.zeros(1, 3, 16, 16))).shape == (1, 3, 16, 16)


def test_attention_block_matches_explicit_softmax_attention() -> None:
    torch.manual_seed(0)
    block = AttnBlock(32).eval()
    x = torch.randn(2, 32, 3, 5)
    with torch.no_grad():
        y = block.norm(x)
        q, k, v = (t.flatten(2) for t in (block.q(y), block.k(y), block.v(y)))  # (B, C, N)
        weights = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(32), dim=-1)  # (B, N, N)
        ref = x + block.proj_out((v @ weights.transpose(1, 2)).view_as(x))
        torch.testing.assert_close(block(x), ref, atol=1e-5, rtol=1e-4)


def test_group_norm_uses_32_groups_and_falls_back_only_when_needed() -> None:
    assert Normalize(64).num_groups == 32 and Normalize(64).eps == 1e-6
    assert group_count(32) == 32 and group_count(512) == 32
    assert group_count(48) == 24 and group_count(20) == 20 and group_count(7) == 7
    enc, dec = _pair(channels=24, channel_mult=[1, 2], num_res_blocks=1, z_channels=24)
    with torch.no_grad():
        assert dec(enc(torch.zeros(1, 3, 8, 8))).shape == (1, 3, 8, 8)


def test_decoder_last_layer_is_the_rgb_conv_weight() -> None:
    _, dec = _pair(**TINY)
    assert dec.last_layer is dec.conv_out.weight
    assert dec.last_layer.shape == (3, 32, 3, 3)
    y = dec(torch.randn(1, 8, 2, 2))
    (grad,) = torch.autograd.grad(F.mse_loss(y, torch.zeros_like(y)), dec.last_layer)
    assert grad.abs().sum() > 0


def test_llamagen_vq16_sized_backbone_parameter_count() -> None:
    # LlamaGen's VQ-16 tokenizer (this layout plus a 16384 x 8 codebook) has about 72M parameters.
    enc, dec = _pair()  # all defaults: channels 128, mult 1,1,2,2,4, 2 / 3 res blocks, z 256, code dim 8
    n_enc = sum(p.numel() for p in enc.parameters())
    n_dec = sum(p.numel() for p in dec.parameters())
    print(f"CNN VQ-16 backbone parameters: encoder {n_enc:,}, decoder {n_dec:,}, total {n_enc + n_dec:,}")
    assert enc.downsample == dec.upsample == 16
    assert 25e6 < n_enc < 35e6 and 35e6 < n_dec < 50e6
    assert 68e6 < n_enc + n_dec < 76e6
