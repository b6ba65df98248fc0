"""lora and frozen on the ViT tokenizer (vit encoder/decoder + pq): timm block names as targets, what trains,
merge, and fine-tuning a trained run through the engine with LoRA rank 8 on the MLPs (the reference's setting)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("xqgan_plugin_vit")  # the vit plugin (and timm) are separate distributions

from xqgan_core import Registry, Tokenizer, build  # noqa: E402
from xqgan_core.checkpoint import latest_checkpoint, load_tensors, load_tokenizer_weights  # noqa: E402
from xqgan_core.engine import Engine  # noqa: E402
from xqgan_core.model import TokenizerModel  # noqa: E402
from xqgan_plugin_finetune.lora import branch_parameter_names  # noqa: E402

# layer_scale 0: plain blocks, so a LoRA update of a block changes the output visibly (LayerScale 1e-5 would damp it)
TRUNK = {"image_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "layer_scale": 0.0}
BLOCK_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")  # the nn.Linear layers of a timm ViT block
MLP_RANK8 = {"use": "lora", "targets": ["*.mlp.fc*"], "rank": 8}  # the reference's fine-tuning setting


def tokenizer(seed: int = 0) -> TokenizerModel:
    torch.manual_seed(seed)
    encoder = build("encoder", {"use": "vit", **TRUNK, "latent_size": 4, "branches": 2, "out_dim": 8})
    quantizer = build("quantizer", {"use": "pq", "branches": 2,
                                    "branch": {"use": "vq", "codebook_size": 16, "dim": 4, "dead_code_threshold": 1.0}})
    return TokenizerModel(encoder, quantizer, build("decoder", {"use": "vit", **TRUNK, "in_dim": 8}))


def images(n: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def train_steps(model: torch.nn.Module, steps: int = 3) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for i in range(steps):
        x = images(seed=10 + i)
        recon, quant = model(x)
        (torch.nn.functional.mse_loss(recon, x) + quant.loss).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def reconstruct(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(images())[0]


def adapted_layers(model: torch.nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if hasattr(m, "lora_up")}


def blocks(part: str, layers: tuple[str, ...]) -> set[str]:
    return {f"{part}.trunk.blocks.{i}.{layer}" for i in range(TRUNK["depth"]) for layer in layers}


# ---- target selection with timm's names ---------------------------------------------------------------------


@pytest.mark.parametrize(("targets", "expected"), [
    (["*.mlp.fc*"], blocks("encoder", ("mlp.fc1", "mlp.fc2")) | blocks("decoder", ("mlp.fc1", "mlp.fc2"))),
    (["*.attn.qkv", "*.attn.proj", "*.mlp.fc*"], blocks("encoder", BLOCK_LINEARS) | blocks("decoder", BLOCK_LINEARS)),
    (["decoder.trunk.blocks.*.attn.*"], blocks("decoder", ("attn.qkv", "attn.proj"))),
    (["encoder.trunk.blocks.1.mlp.fc2"], {"encoder.trunk.blocks.1.mlp.fc2"}),
    # a whole part: every Linear in it, the latent projections and the pixel head included
    (["decoder"], blocks("decoder", BLOCK_LINEARS) | {"decoder.project_in", "decoder.to_pixels"}),
])
def test_lora_targets_select_timm_block_linears(targets: list[str], expected: set[str]) -> None:
    model = build("adapter", {"use": "lora", "targets": targets}).apply(tokenizer())
    assert adapted_layers(model) == expected


def test_lora_target_written_as_a_suffix_suggests_the_glob() -> None:
    with pytest.raises(ValueError, match=r"targets: 'mlp\.fc\*' match\(es\) no .*did you mean '\*\.mlp\.fc\*'\?"):
        build("adapter", {"use": "lora", "targets": ["mlp.fc*"]}).apply(tokenizer())


# ---- what trains, merge -------------------------------------------------------------------------------------


def test_lora_on_the_vit_starts_at_the_model_and_trains_only_its_branches() -> None:
    base = tokenizer()
    adapted = build("adapter", MLP_RANK8).apply(copy.deepcopy(base))
    assert torch.equal(reconstruct(adapted), reconstruct(base))
    trainable = [n for n, p in adapted.named_parameters() if p.requires_grad]
    assert trainable == branch_parameter_names(adapted)
    assert len(trainable) == 2 * 2 * 2 * 2  # (down, up) x (fc1, fc2) x 2 blocks x (encoder, decoder)
    assert adapted.get_submodule("encoder.trunk.blocks.0.mlp.fc1").lora_down.weight.shape == (8, 32)
    before = {k: v.clone() for k, v in adapted.state_dict().items()}
    train_steps(adapted)
    after = adapted.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert {k for k in changed if ".lora_up." in k}, "no LoRA up-projection moved"
    # queries, position/level embeddings, attention, norms, codebooks and usage buffers stay as they were
    assert changed <= {k for k in before if ".lora_" in k}, sorted(changed - {k for k in before if ".lora_" in k})


def test_lora_merge_on_the_vit_gives_the_same_outputs_with_the_plain_layout() -> None:
    base = tokenizer()
    adapter = build("adapter", {**MLP_RANK8, "targets": ["*.attn.qkv", "*.attn.proj", "*.mlp.fc*"], "alpha": 16.0})
    adapted = adapter.apply(copy.deepcopy(base))
    train_steps(adapted)
    expected = reconstruct(adapted)
    merged = adapter.merge(adapted)
    assert branch_parameter_names(merged) == [] and adapted_layers(merged) == set()
    assert set(merged.state_dict()) == set(base.state_dict())
    torch.testing.assert_close(reconstruct(merged), expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(reconstruct(merged), reconstruct(base))


def test_frozen_vit_encoder_and_quantizer_keep_the_tokens() -> None:
    model = build("adapter", {"use": "frozen", "parts": ["encoder", "quantizer"]}).apply(tokenizer())
    with torch.no_grad():
        tokens = model.encode(images())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_steps(model)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    assert changed and all(k.startswith("decoder.") for k in changed), sorted(changed)
    with torch.no_grad():
        assert torch.equal(model.encode(images()), tokens)


# ---- through the engine: init_from + LoRA rank 8 on mlp.fc*, checkpoint, reload -------------------------------


def _run_file(tmp_path: Path, name: str, steps: int, extra: str = "") -> Path:
    data = tmp_path / "data" / "a"
    if not data.is_dir():
        data.mkdir(parents=True)
        rng = np.random.default_rng(0)
        for i in range(6):
            coarse = rng.uniform(0, 255, size=(4, 4, 3)).astype(np.uint8)
            Image.fromarray(coarse).resize((32, 32), Image.BICUBIC).save(data / f"img{i}.png")
    trunk = "\n".join(f"{k} = {v}" for k, v in TRUNK.items())
    path = tmp_path / f"{name}.toml"
    path.write_text(f"""
[run]
name = "{name}"
out_dir = "{tmp_path / name}"
[data]
use = "folder"
root = "{tmp_path / 'data'}"
resolution = 32
holdout = 0.34
[encoder]
use = "vit"
{trunk}
latent_size = 4
branches = 2
out_dim = 8
[quantizer]
use = "pq"
branches = 2
branch = {{ use = "msrq", scales = [1, 2, 4], phi_count = 1, code = {{ use = "vq", codebook_size = 16, dim = 4 }} }}
[decoder]
use = "vit"
{trunk}
in_dim = 8
[train]
steps = {steps}
batch_size = 2
checkpoint_every = {steps}
eval_every = {steps}
warmup_steps = 1
lr = 1e-2
ema_decay = 0.0
[loss]
perceptual = 0.0
[eval]
lpips = false
{extra}""")
    return path


def test_fine_tuning_a_vit_run_with_lora_rank_8_on_the_mlps(tmp_path: Path) -> None:
    Engine(Registry.from_toml(_run_file(tmp_path, "base", steps=2))).fit()
    source = latest_checkpoint(tmp_path / "base")
    lora = '[[adapters]]\nuse = "lora"\ntargets = ["*.mlp.fc*"]\nrank = 8\n'
    run = _run_file(tmp_path, "ft", steps=2, extra=f'{lora}')
    Engine(Registry.from_toml(run, overrides=[f"train.init_from={str(tmp_path / 'base')!r}"])).fit()

    src = load_tensors(source / "model.safetensors")
    tuned = load_tensors(latest_checkpoint(tmp_path / "ft") / "model.safetensors")
    branches = {k for k in tuned if ".lora_" in k}
    assert branches and all(".mlp.fc" in k for k in branches)
    assert set(tuned) - branches == set(src)  # base names unchanged: the checkpoint keeps the plain layout + branches
    for k in src:
        torch.testing.assert_close(tuned[k], src[k], rtol=0, atol=0, msg=k)
    assert any(".lora_up." in k and tuned[k].abs().sum() > 0 for k in branches)

    # the checkpoint restores into the adapted architecture, and the Tokenizer folds the branches in
    cfg = Registry.from_toml(run).config
    unmerged = cfg.adapters[0].build().apply(TokenizerModel(cfg.encoder.build(), cfg.quantizer.build(),
                                                            cfg.decoder.build()))
    load_tokenizer_weights(unmerged, tmp_path / "ft", use_ema=False)
    for from_folder in (Tokenizer.from_checkpoint, Tokenizer.from_pretrained):
        tok = from_folder(tmp_path / "ft", device="cpu", use_ema=False)
        assert not any(".lora_" in k for k in tok.model.state_dict())
        with torch.no_grad():
            expected = unmerged.eval()(images())[0].clamp(-1, 1)
        torch.testing.assert_close(tok.reconstruct(images()), expected, atol=1e-4, rtol=1e-4)
        assert [i.shape for i in tok.encode(images())] == [(4, 2, s, s) for s in (1, 2, 4)]
