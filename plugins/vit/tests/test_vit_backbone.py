"""Contract and behaviour tests for the ViT encoder/decoder plugin (tiny architectures; the file runs in seconds)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed, resample_patch_embed
from timm.models.vision_transformer import VisionTransformer
from torch.utils.checkpoint import checkpoint

from xqgan_core import ConfigError, Registry, build
from xqgan_core.engine import Engine
from xqgan_core.model import TokenizerModel
from xqgan_core.testing import DecoderContract, EncoderContract
from xqgan_core.tokenizer import Tokenizer
from xqgan_plugin_vit import trunk as trunk_module

TRUNK: dict[str, Any] = {"image_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}


class TestViTEncoderContract(EncoderContract):
    name = "vit"
    # latent_size 3 at 32 px: the contract reads the expected grid from latent_grid(), not image_size // downsample
    options = {**TRUNK, "latent_size": 3, "branches": 2, "out_dim": 8}


class TestViTDecoderContract(DecoderContract):
    name = "vit"
    options = {**TRUNK, "in_dim": 8}


def _encoder(**options: Any) -> torch.nn.Module:
    torch.manual_seed(0)
    return build("encoder", {"use": "vit", **TRUNK, "latent_size": 3, "branches": 2, "out_dim": 8, **options})


def _decoder(**options: Any) -> torch.nn.Module:
    torch.manual_seed(0)
    return build("decoder", {"use": "vit", **TRUNK, "in_dim": 8, **options})


def _source_vit(patch: int, grid: int, layer_scale: float | None = 1e-5) -> VisionTransformer:
    """A timm ViT with the tiny width/depth but its own patch size and grid (e.g. DINOv2's 14-px patches)."""
    torch.manual_seed(3)
    return VisionTransformer(img_size=patch * grid, patch_size=patch, embed_dim=32, depth=2, num_heads=2,
                             init_values=layer_scale, num_classes=0, global_pool="")


def test_latents_put_branch_i_tokens_in_channel_group_i() -> None:
    enc = _encoder().eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    captured: dict[str, torch.Tensor] = {}
    enc.project.register_forward_hook(lambda m, i, o: captured.update(tokens=o))  # returns None: output unchanged
    with torch.no_grad():
        z = enc(x)
    assert z.shape == (2, 8, 3, 3) and enc.out_dim == 8 and enc.code_dim == 4
    tokens = captured["tokens"]  # (B, P*K^2, code_dim): branch-major, each branch's K^2 tokens row-major
    assert tokens.shape == (2, 18, 4)
    for branch in range(2):
        group = z[:, 4 * branch:4 * (branch + 1)]  # (B, code_dim, K, K)
        expected = tokens[:, 9 * branch:9 * (branch + 1)].transpose(1, 2).reshape(2, 4, 3, 3)
        torch.testing.assert_close(group, expected)


def test_query_branches_differ_only_by_their_level_embedding() -> None:
    enc = _encoder()
    assert enc.level_embed.num_embeddings == 3  # CLS + image, branch 0, branch 1
    assert enc.latent_queries.shape == (1, 2 * 9, 32)
    assert enc.latent_queries.abs().max() < 1e-4  # tiny init: queries start as position + level embeddings
    # the two branches differ only in their level embedding, so their outputs differ only through it
    with torch.no_grad():
        enc.latent_queries.zero_()
        enc.level_embed.weight[2] = enc.level_embed.weight[1]
        z = enc(torch.zeros(1, 3, 32, 32))
    torch.testing.assert_close(z[:, :4], z[:, 4:])


def test_encoder_rejects_other_image_sizes_and_bad_options() -> None:
    with pytest.raises(ValueError, match="image_size = 32"):
        _encoder()(torch.zeros(1, 3, 24, 24))
    with pytest.raises(ConfigError, match="encoder.out_dim"):
        _encoder(out_dim=7)
    with pytest.raises(ConfigError, match="encoder.image_size"):
        _encoder(image_size=30)


def test_encoder_has_no_fixed_downsampling_for_validation() -> None:
    enc = _encoder()
    assert type(enc).config_downsample(enc.config) is None


def test_decoder_maps_any_latent_grid_to_the_image_and_exposes_last_layer() -> None:
    dec = _decoder()
    assert "trunk.patch_embed.proj.weight" not in dec.state_dict()
    for k in (3, 4):
        assert dec(torch.randn(2, 8, k, k)).shape == (2, 3, 32, 32)
    assert dec.last_layer is dec.to_pixels.weight


def test_decoder_unpatchifies_patch_by_patch() -> None:
    dec = _decoder().eval()
    with torch.no_grad():
        # only patch (row 1, column 2) of the 4x4 grid gets values: 0, 1, 2, ... in (row, column, channel) order
        def mark_one_patch(module: Any, inputs: Any, out: torch.Tensor) -> torch.Tensor:
            out = torch.zeros_like(out)
            out[0, 1 * 4 + 2] = torch.arange(8 * 8 * 3, dtype=out.dtype)
            return out

        dec.to_pixels.register_forward_hook(mark_one_patch)
        y = dec(torch.randn(1, 8, 3, 3))
    patch = y[0, :, 8:16, 16:24]  # rows of patch row 1, columns of patch column 2
    torch.testing.assert_close(patch, torch.arange(8 * 8 * 3, dtype=y.dtype).view(8, 8, 3).permute(2, 0, 1))
    assert y.abs().sum() == patch.abs().sum()


@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_checkpointing_gives_same_outputs_and_gradients(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[object] = []

    def counting_checkpoint(fn: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(fn)
        return checkpoint(fn, *args, **kwargs)

    monkeypatch.setattr(trunk_module, "checkpoint", counting_checkpoint)
    make = _encoder if kind == "encoder" else _decoder
    plain, ckpt = make(drop_path=0.2).train(), make(drop_path=0.2, checkpointing=True).train()
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn((2, 3, 32, 32) if kind == "encoder" else (2, 8, 3, 3), generator=torch.Generator().manual_seed(1))
    outs, grads = [], []
    for m in (plain, ckpt):
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(7)  # the same drop-path draws; recomputation must replay them
        y = m(xi)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outs.append(y.detach())
        grads.append([xi.grad] + [p.grad for p in m.parameters()])
    assert calls == list(ckpt.trunk.blocks)  # one checkpoint per block, only in the checkpointed model
    torch.testing.assert_close(outs[0], outs[1])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_init_from_a_file_with_the_same_layout_loads_exactly(tmp_path: Path) -> None:
    source = _source_vit(patch=8, grid=4)
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    enc, dec = _encoder(init=str(path)), _decoder(init=str(path))
    for k, v in source.state_dict().items():
        torch.testing.assert_close(enc.trunk.state_dict()[k], v)
        if not k.startswith("patch_embed."):
            torch.testing.assert_close(dec.trunk.state_dict()[k], v)


def test_init_resamples_a_14px_source_like_timm(tmp_path: Path) -> None:
    # a "DINOv2-like" source: 14-px patches on a 5x5 grid (70 px) -> our 8-px patches on the 4x4 grid of 32 px
    source = _source_vit(patch=14, grid=5)
    path = tmp_path / "dinov2_like.pth"
    torch.save(source.state_dict(), path)
    enc = _encoder(init=str(path))
    state = source.state_dict()
    torch.testing.assert_close(enc.trunk.patch_embed.proj.weight,
                               resample_patch_embed(state["patch_embed.proj.weight"], [8, 8]))
    torch.testing.assert_close(enc.trunk.pos_embed, resample_abs_pos_embed(state["pos_embed"], [4, 4], [5, 5]))
    torch.testing.assert_close(enc.trunk.blocks[1].mlp.fc2.weight, state["blocks.1.mlp.fc2.weight"])
    assert enc(torch.zeros(1, 3, 32, 32)).shape == (1, 8, 3, 3)
    dec = _decoder(init=str(path))  # the decoder takes the resampled positions, not the patch embedding
    torch.testing.assert_close(dec.trunk.pos_embed, enc.trunk.pos_embed)
    torch.testing.assert_close(dec.trunk.blocks[0].attn.qkv.weight, state["blocks.0.attn.qkv.weight"])


def test_init_rejects_weights_of_another_architecture_and_pickled_code(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in _source_vit(8, 4, layer_scale=None).state_dict().items()}, str(path))
    with pytest.raises(ConfigError, match="encoder.init.*layer_scale"):
        _encoder(init=str(path))  # our trunk has LayerScale, the file has none
    assert _encoder(init=str(path), layer_scale=0.0) is not None

    class Payload:
        def __reduce__(self) -> Any:
            return (print, ("pickled code ran",))

    evil = tmp_path / "evil.pt"
    torch.save({"pos_embed": Payload()}, evil)
    with pytest.raises(ConfigError, match="weights_only"):
        _encoder(init=str(evil))
    assert "pickled code ran" not in capsys.readouterr().out
    with pytest.raises(ConfigError, match="does not exist"):
        _encoder(init=str(tmp_path / "missing.safetensors"))


def test_named_weights_offline_fail_before_training_naming_the_cache(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as hf

    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ConfigError, match=r"hub.models--timm--vit_small_patch14_dinov2\.lvd142m.*HF_HUB_OFFLINE"):
        _encoder(init="dinov2", embed_dim=384, num_heads=6)
    with pytest.raises(ConfigError, match=r"neither an existing file \(.*\) nor a timm model name"):
        _encoder(init="no_such_model_name")


def test_pq_branch_i_quantizes_the_tokens_of_branch_i_and_gradients_reach_the_queries() -> None:
    enc, dec = _encoder(), _decoder()
    torch.manual_seed(0)
    pq = build("quantizer", {"use": "pq", "branches": 2, "branch": {"use": "vq", "codebook_size": 16, "dim": 4}})
    model = TokenizerModel(enc, pq, dec).train()
    seen: list[torch.Tensor] = []
    for branch in pq.branches:
        branch.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    tokens: dict[str, torch.Tensor] = {}
    enc.project.register_forward_hook(lambda m, i, o: tokens.update(out=o.detach()))  # returns None: output unchanged
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y, quant = model(x)
    assert y.shape == x.shape and quant.indices.shape == (2, 2, 3, 3)
    for i in range(2):  # branch i's input, read row-major, is exactly the K^2 tokens of query branch i
        torch.testing.assert_close(seen[i].flatten(2).transpose(1, 2), tokens["out"][:, 9 * i:9 * (i + 1)])
    ((y - x) ** 2).mean().add(quant.loss).backward()
    for name in ("latent_queries", "level_embed.weight", "project.weight", "trunk.patch_embed.proj.weight"):
        grad = dict(enc.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    # no unused parameters (DDP would need find_unused_parameters otherwise)
    assert [n for n, p in [*enc.named_parameters(), *dec.named_parameters()] if p.grad is None] == []


def test_multi_scale_product_branches_read_the_latent_grid() -> None:
    enc, dec = _encoder(), _decoder()
    msrq = {"use": "msrq", "scales": [1, 2, 3], "phi_count": 0, "code": {"use": "vq", "codebook_size": 16, "dim": 4},
            "dropout": {"rate": 0.5, "min_levels": 2}}
    pq = build("quantizer", {"use": "pq", "branches": 2, "branch": msrq})
    y, quant = TokenizerModel(enc, pq, dec).train()(torch.rand(4, 3, 32, 32) * 2 - 1)
    assert [tuple(i.shape) for i in quant.indices] == [(4, 2, 1, 1), (4, 2, 2, 2), (4, 2, 3, 3)]
    assert pq.token_layout(3, 3).scales == (1, 2, 3) and y.shape == (4, 3, 32, 32)
    y.mean().add(quant.loss).backward()
    assert enc.latent_queries.grad is not None


def _write_run(tmp_path: Path, encoder_init: str = "", latent_size: int = 4, steps: int = 3,
               quantizer_branches: int = 2) -> Path:
    """A ``steps``-step run of vit (``latent_size``) + pq(2 x vq) + vit on eight 32-px images."""
    rng = np.random.default_rng(0)
    data = tmp_path / "data" / "a"
    data.mkdir(parents=True)
    for i in range(8):
        coarse = rng.uniform(0, 255, size=(4, 4, 3)).astype(np.uint8)
        Image.fromarray(coarse).resize((32, 32), Image.BICUBIC).save(data / f"img{i}.png")
    trunk = "\n".join(f"{k} = {v}" for k, v in {**TRUNK, "layer_scale": 0.0}.items())
    run = tmp_path / "run.toml"
    run.write_text(f"""
[run]
name = "vit-pq"
out_dir = "{tmp_path / 'out'}"

[data]
use = "folder"
root = "{tmp_path / 'data'}"
resolution = 32
holdout = 0.25

[encoder]
use = "vit"
{trunk}
latent_size = {latent_size}
branches = 2
out_dim = 8
init = "{encoder_init}"

[quantizer]
use = "pq"
branches = {quantizer_branches}
branch = {{ use = "vq", codebook_size = 16, dim = {8 // quantizer_branches} }}

[decoder]
use = "vit"
{trunk}
in_dim = 8

[train]
steps = {steps}
batch_size = 2
checkpoint_every = {steps}
eval_every = {steps}
log_every = 1
warmup_steps = 1
lr = 1e-3

[loss]
perceptual = 0.0

[eval]
lpips = false
""")
    return run


def test_named_init_offline_fails_before_the_run_folder_is_made(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as hf

    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hub"))
    run = _write_run(tmp_path, encoder_init="vit_tiny_patch16_224.augreg_in21k")
    with pytest.raises(ConfigError, match="encoder.init"):
        Engine(Registry.from_toml(run)).fit()
    assert not (tmp_path / "out").exists()


def test_vit_with_pq_trains_a_few_engine_steps(tmp_path: Path) -> None:
    run = _write_run(tmp_path)
    metrics = Engine(Registry.from_toml(run)).fit()
    assert {"psnr", "utilization/branch0", "utilization/branch1"} <= set(metrics)
    # the Tokenizer reloads the run and keeps pq's layout
    tok = Tokenizer.from_checkpoint(tmp_path / "out", device="cpu")
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    indices = tok.encode(images)
    assert indices.shape == (2, 2, 4, 4)  # (B, branch, K, K)
    sequence = tok.encode(images, as_sequence=True)
    assert sequence.shape == (2, 16, 2)  # 16 positions, one token per branch
    torch.testing.assert_close(tok.decode(sequence, as_sequence=True), tok.decode(indices))


def test_tokenizer_reads_the_query_grid_when_latent_size_does_not_divide_the_image(tmp_path: Path) -> None:
    # K = 3 at 32 px: no whole pixels-per-token factor, the grid is the encoder's 3 x 3 queries
    run = _write_run(tmp_path, latent_size=3, steps=2)
    Engine(Registry.from_toml(run)).fit()
    tok = Tokenizer.from_checkpoint(tmp_path / "out", device="cpu")
    assert tok.latent_grid(32, 32) == (3, 3)
    layout = tok.token_layout
    assert (layout.length, layout.tokens_per_step) == (9, 2)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    indices = tok.encode(images)
    assert indices.shape == (2, 2, 3, 3)  # (B, branch, K, K)
    sequence = tok.encode(images, as_sequence=True)
    assert sequence.shape == (2, 9, 2)
    torch.testing.assert_close(layout.from_sequence(sequence), indices)
    decoded = tok.decode(sequence, as_sequence=True)
    assert decoded.shape == (2, 3, 32, 32)
    torch.testing.assert_close(decoded, tok.decode(indices))
    # preprocess keeps an image of the accepted size, and resizes to the run's resolution
    assert tok.preprocess(Image.new("RGB", (40, 40))).shape == (3, 32, 32)
    with pytest.raises(ValueError, match="encoder.image_size = 32.*30x30"):
        tok.encode(torch.zeros(1, 3, 30, 30))
    with pytest.raises(ValueError, match="encoder.image_size = 32"):
        tok.layout_for(30, 30)


def test_encoder_latent_grid_is_the_query_grid_only_at_image_size() -> None:
    enc = _encoder(latent_size=3)
    assert enc.latent_grid(32, 32) == (3, 3)
    with pytest.raises(ValueError, match="encoder.image_size = 32, got images of 33x32"):
        enc.latent_grid(33, 32)


def test_validation_refuses_encoder_and_pq_branch_counts_that_differ(tmp_path: Path) -> None:
    run = _write_run(tmp_path, quantizer_branches=4)  # 4 pq branches of dim 2 over the encoder's 2 branches of 4
    with pytest.raises(ConfigError, match=r"quantizer.branches: 4 does not match encoder.branches = 2"):
        Registry.from_toml(run)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_math_and_fused_attention_agree_and_auto_picks_math_under_cpu_bf16_autocast(kind: str) -> None:
    make = _encoder if kind == "encoder" else _decoder
    fused, math = make(attention="fused").train(), make(attention="math").train()
    auto = make().train()  # attention = "auto"
    math.load_state_dict(fused.state_dict())
    auto.load_state_dict(fused.state_dict())
    x = torch.randn((2, 3, 32, 32) if kind == "encoder" else (2, 8, 3, 3), generator=torch.Generator().manual_seed(1))
    outs, grads = [], []
    for m in (fused, math):
        y = m(x)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outs.append(y.detach())
        grads.append([p.grad for p in m.parameters()])
        assert all(b.attn.fused_attn == (m is fused) for b in m.trunk.blocks)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)

    auto(x)
    assert all(b.attn.fused_attn for b in auto.trunk.blocks)  # fp32: the fused kernel
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16 = auto(x)
    assert not any(b.attn.fused_attn for b in auto.trunk.blocks)  # CPU bf16: the math form
    assert torch.isfinite(y16).all()
    err = (y16.float() - outs[0]).norm() / outs[0].norm()
    assert err < 0.03, f"bf16 output differs from fp32 by {err:.3f} (relative)"
