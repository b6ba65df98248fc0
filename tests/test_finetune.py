"""Fine-tuning through the engine: train.init_from, adapters in a run file, and the tokenizer of the result."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from engine_fixtures import make_images, tiny_run

from xqgan_core import CheckpointError, Registry, Tokenizer
from xqgan_core.checkpoint import latest_checkpoint, load_tensors, load_tokenizer_weights
from xqgan_core.engine import Engine
from xqgan_core.model import TokenizerModel

LORA = '\n[[adapters]]\nuse = "lora"\nrank = 2\ntargets = ["decoder"]\n'


def records(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("split") == "train"]


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> tuple[Path, Path]:
    """A trained tiny tokenizer (its out_dir) and the data folder it used."""
    root = tmp_path_factory.mktemp("pretrained")
    make_images(root / "data")
    out = root / "out"
    Engine(Registry.from_toml(write(root, "base", tiny_run(root / "data", out, steps=4)))).fit()
    return out, root / "data"


def test_init_from_starts_at_the_checkpoint_and_lora_keeps_the_base_weights(pretrained, tmp_path, capsys):
    source, data = pretrained
    out = tmp_path / "ft"
    run = tiny_run(data, out, steps=3, init_from=str(source), ema_decay=0.0) + LORA
    Engine(Registry.from_toml(write(tmp_path, "ft", run))).fit()
    assert f"weights from {latest_checkpoint(source) / 'ema.safetensors'}" in "".join(capsys.readouterr())
    src = load_tensors(latest_checkpoint(source) / "ema.safetensors")
    tuned = load_tensors(latest_checkpoint(out) / "model.safetensors")
    base_keys = [k for k in tuned if ".lora_" not in k]
    assert set(base_keys) == set(src)
    for k in base_keys:  # every original weight, codebook included, is exactly the pretrained one
        torch.testing.assert_close(tuned[k].float(), src[k].float(), rtol=0, atol=0, msg=k)
    assert any(".lora_up." in k and tuned[k].abs().sum() > 0 for k in tuned)  # the branches trained

    # the fine-tuned tokenizer loads with its adapter folded in: plain layout, same outputs as the unmerged model
    tok = Tokenizer.from_checkpoint(out, device="cpu", use_ema=False)
    assert not any(".lora_" in k for k in tok.model.state_dict())
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    unmerged = Registry.from_toml(write(tmp_path, "ft2", run)).config
    ref = TokenizerModel(unmerged.encoder.build(), unmerged.quantizer.build(), unmerged.decoder.build())
    ref = unmerged.adapters[0].build().apply(ref)
    load_tokenizer_weights(ref, out, use_ema=False)
    with torch.no_grad():
        torch.testing.assert_close(tok.reconstruct(x), ref.eval()(x)[0].clamp(-1, 1), atol=1e-4, rtol=1e-4)


def test_init_from_a_different_architecture_names_the_option(pretrained, tmp_path):
    source, data = pretrained
    run = tiny_run(data, tmp_path / "ft", init_from=str(source)).replace("codebook_size = 32", "codebook_size = 64")
    with pytest.raises(CheckpointError, match=r"train\.init_from: .*shape mismatch: quantizer\.embedding\.weight"):
        Engine(Registry.from_toml(write(tmp_path, "bad", run))).fit()
    assert not (tmp_path / "ft").exists()  # failed before anything was written


def test_resuming_a_fine_tuning_run_ignores_init_from(pretrained, tmp_path, capsys):
    source, data = pretrained
    out = tmp_path / "ft"
    path = write(tmp_path, "ft", tiny_run(data, out, steps=2, init_from=str(source)))
    Engine(Registry.from_toml(path)).fit()
    capsys.readouterr()
    Engine(Registry.from_toml(path, overrides=["train.steps=3"])).fit()
    text = "".join(capsys.readouterr())
    assert "resumed from" in text and "weights from" not in text


def test_missing_init_checkpoint_is_a_clear_error(tmp_path):
    make_images(tmp_path / "data")
    run = tiny_run(tmp_path / "data", tmp_path / "ft", init_from=str(tmp_path / "nowhere"))
    with pytest.raises(CheckpointError, match=r"train\.init_from: .*nowhere"):
        Engine(Registry.from_toml(write(tmp_path, "missing", run))).fit()


def test_init_from_a_lora_run_starts_from_its_merged_weights(pretrained, tmp_path):
    source, data = pretrained
    lora_out = tmp_path / "lora"
    Engine(Registry.from_toml(write(tmp_path, "lora", tiny_run(data, lora_out, steps=2, init_from=str(source)) + LORA))).fit()
    merged = Tokenizer.from_checkpoint(lora_out, device="cpu").model.state_dict()
    # a plain run (no adapters) continues from the LoRA run: its branches are folded into the weights first
    out = tmp_path / "plain"
    engine = Engine(Registry.from_toml(write(tmp_path, "plain", tiny_run(data, out, steps=1, init_from=str(lora_out),
                                                                          lr=1e-12, warmup_steps=1, ema_decay=0.0))))
    engine.fit()
    tuned = load_tensors(latest_checkpoint(out) / "model.safetensors")
    assert set(tuned) == set(merged)
    for k in merged:
        if merged[k].is_floating_point():  # (integer usage counters move with the one training step)
            torch.testing.assert_close(tuned[k].float(), merged[k].float(), atol=1e-6, rtol=1e-5, msg=k)


@pytest.mark.parametrize("adapter", [LORA, '\n[[adapters]]\nuse = "frozen"\nparts = ["decoder"]\n'])
def test_adversarial_fine_tuning_with_a_frozen_last_layer(pretrained, tmp_path, adapter):
    """The adaptive GAN weight needs a gradient at the decoder's last layer, which both adapters freeze."""
    source, data = pretrained
    out = tmp_path / "ft"
    run = tiny_run(data, out, steps=3, init_from=str(source)).replace("disc_start = 3", "disc_start = 0") + adapter
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Engine(Registry.from_toml(write(tmp_path, "gan", run))).fit()
    rows = records(out)
    assert all("adv" in r and "adv_weight" in r and math.isfinite(r["adv_weight"]) for r in rows)
    frozen_decoder = "frozen" in adapter
    assert all((r["adv_weight"] == 1.0) == frozen_decoder for r in rows)  # LoRA: a real gradient-norm ratio
    assert any("adaptive GAN weight is off" in str(w.message) for w in caught) == frozen_decoder
