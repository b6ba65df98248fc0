"""configs/xqgan-sc-tiny-aligned.toml: the tiny ViT MSVR run with the paper's aligned recipe at toy size (DINOv2 on
the semantic branch, CLIP on the detail branch, the DINO discriminator behind DiffAugment), its teachers written by
``xqgan-run make-tiny-teachers`` exactly as the preset's header says. It trains end to end through ``xqgan-run``
(a few steps here), its aligner heads are saved, and ``Tokenizer.from_checkpoint`` reloads it without any teacher."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from xqgan_core import Registry, Tokenizer
from xqgan_core.checkpoint import latest_checkpoint
from xqgan_core.cli import main

for plugin in ("xqgan_plugin_vit", "xqgan_plugin_dinov2", "xqgan_plugin_clip", "xqgan_plugin_dino"):
    pytest.importorskip(plugin)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PRESET = CONFIGS / "xqgan-sc-tiny-aligned.toml"
BASE = CONFIGS / "xqgan-sc-tiny-msvr.toml"
TEACHERS = "runs/tiny-teachers"  # the folder the preset's header writes them to (relative to the run's folder)
STEPS = 3


def test_the_preset_is_the_tiny_sc_preset_plus_the_aligned_recipe() -> None:
    preset, base = (tomllib.loads(p.read_text(encoding="utf-8")) for p in (PRESET, BASE))
    for section in ("data", "encoder", "quantizer", "decoder", "train"):
        assert preset[section] == base[section], f"[{section}] differs from {BASE.name}"
    cfg = Registry.from_toml(PRESET).config
    assert [(a.use, a.config.branch, a.config.mode) for a in cfg.aligners] == [("dinov2", -1, "global"),
                                                                               ("clip", 0, "global")]
    assert all(a.config.weights.startswith(TEACHERS + "/") for a in cfg.aligners)
    assert [d.use for d in cfg.discriminators] == ["dino"] and cfg.discriminators[0].config.init == ""
    assert cfg.loss.diffaug == "translation,color,cutout"


def test_make_tiny_teachers_prints_the_tables_the_preset_uses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["make-tiny-teachers", TEACHERS, "--only", "dinov2", "--only", "clip"]) == 0
    printed = tomllib.loads(capsys.readouterr().out)["aligners"]
    preset = tomllib.loads(PRESET.read_text(encoding="utf-8"))["aligners"]
    for table in printed:
        (mine,) = [a for a in preset if a["use"] == table["use"]]
        assert {k: mine.get(k) for k in table} == table  # every printed option, as printed
        assert (tmp_path / table["weights"]).is_file()


def test_make_tiny_teachers_refuses_an_unknown_aligner(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as info:
        main(["make-tiny-teachers", str(tmp_path), "--only", "no-such-aligner"])
    assert info.value.code == 2 and not any(tmp_path.iterdir())


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The README's two commands, from a fresh folder, with a few steps and the discriminator on from step 2."""
    here = tmp_path_factory.mktemp("tiny-aligned")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(here)
        assert main(["make-tiny-teachers", TEACHERS, "--only", "dinov2", "--only", "clip"]) == 0
        overrides = [f"train.steps={STEPS}", f"train.checkpoint_every={STEPS}", f"train.eval_every={STEPS}",
                     "train.warmup_steps=1", "train.batch_size=8", "loss.disc_start=2", "eval.max_images=4",
                     "eval.grid_images=2"]
        assert main([str(PRESET), *[arg for o in overrides for arg in ("--set", o)]]) == 0
    return here / "runs" / "xqgan-sc-tiny-aligned"


def test_it_trains_end_to_end_with_both_aligners_and_the_dino_discriminator(trained: Path) -> None:
    rows = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r.get("split") == "train"]
    assert train_rows and all(torch.isfinite(torch.tensor(r["loss"])) for r in train_rows)
    assert all(r["align/0/global"] > 0 and r["align/1/global"] > 0 for r in train_rows)
    assert any("adv" in r and "d_loss" in r for r in train_rows)  # the DINO discriminator joined in


def test_heads_are_saved_and_teachers_are_not(trained: Path) -> None:
    ckpt = latest_checkpoint(trained)
    assert ckpt.name == f"step-{STEPS:08d}"
    heads = load_file(str(ckpt / "aligner_heads.safetensors"))
    assert sorted(heads) == ["0.proj.bias", "0.proj.weight", "1.proj.bias", "1.proj.weight"]
    everything = [k for f in ckpt.glob("*.safetensors") for k in load_file(str(f))]
    assert not any("teacher" in k for k in everything)
    disc = load_file(str(ckpt / "discriminators.safetensors"))
    assert disc and all(k.startswith("0.heads.") for k in disc)  # the DINO trunk is frozen: never saved


def test_it_reloads_through_from_checkpoint_without_any_teacher(trained: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the teachers' relative paths lead nowhere from here
    tok = Tokenizer.from_checkpoint(trained, device="cpu")
    size = tok.resolution
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    images = tok.decode(tok.encode(x))
    assert images.shape == x.shape and torch.isfinite(images).all()
