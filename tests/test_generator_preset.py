"""The CPU generator run of the README ("Generate images"), command by command from an empty folder: the tiny
multi-scale tokenizer (configs/xqgan-v-tiny-msvr.toml), ``xqgan-run tokenize --built-in-samples``, the VAR run
(configs/var-tiny.toml) stopped by SIGTERM and resumed by the same command, then ``xqgan-run sample``. Each command
runs as written, with only the step counts and sizes made small through ``--set``."""

from __future__ import annotations

import json
import os
import signal
import tomllib
from pathlib import Path

import pytest
from PIL import Image

from xqgan_core import Registry, Tokenizer
from xqgan_core.checkpoint import latest_checkpoint
from xqgan_core.cli import main
from xqgan_core.token_shards import TokenShards, read_index
from xqgan_core.trainer import Trainer

for plugin in ("xqgan_plugin_var", "xqgan_plugin_msrq", "xqgan_plugin_pq", "xqgan_plugin_cnn"):
    pytest.importorskip(plugin)

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_PRESET = ROOT / "configs" / "xqgan-v-tiny-msvr.toml"
GENERATOR_PRESET = ROOT / "configs" / "var-tiny.toml"
README = ROOT / "README.md"
TOKENS = "tokens/sample-msvr"
CROPS = 2  # per photograph


def _sets(*overrides: str) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


def test_the_readme_gives_the_presets_commands() -> None:
    readme = README.read_text(encoding="utf-8")
    for command in (f"xqgan-run configs/{TOKENIZER_PRESET.name}",
                    "xqgan-run tokenize runs/xqgan-v-tiny-msvr --built-in-samples --crops-per-image 96 --flip --out " + TOKENS,
                    f"xqgan-run configs/{GENERATOR_PRESET.name}", "xqgan-run sample runs/var-tiny"):
        assert command in readme, command
        assert command in GENERATOR_PRESET.read_text(encoding="utf-8"), command


def test_the_presets_fit_together() -> None:
    tok = tomllib.loads(TOKENIZER_PRESET.read_text(encoding="utf-8"))
    gen = Registry.from_toml(GENERATOR_PRESET).config
    assert gen.kind == "generator" and gen.generator.use == "var"
    assert gen.tokenizer.run == "runs/" + tok["run"]["name"] and gen.data.config.path == TOKENS
    assert tok["quantizer"]["branch"]["use"] == "msrq"  # next-scale tokens: what var needs
    assert gen.eval.grid_images == 4 * 17  # a row of four samples for each built-in photograph


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The README's commands in a fresh folder; the generator run gets a SIGTERM during its step 3, stops after it
    with a checkpoint of it, and is resumed with the same command."""
    here = tmp_path_factory.mktemp("generator-preset")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(here)
        small = ["train.steps=2", "train.checkpoint_every=2", "train.eval_every=2", "train.warmup_steps=1",
                 "train.batch_size=4", "eval.max_images=4", "eval.grid_images=2"]
        assert main([str(TOKENIZER_PRESET), *_sets(*small, "loss.disc_start=1")]) == 0
        assert main(["tokenize", "runs/xqgan-v-tiny-msvr", "--built-in-samples", "--flip", "--out", TOKENS,
                     "--crops-per-image", str(CROPS), "--no-progress", "--workers", "0"]) == 0
        generator = [str(GENERATOR_PRESET), *_sets("train.steps=4", "train.checkpoint_every=2",
                                                   "train.eval_every=4", "train.warmup_steps=1",
                                                   "train.batch_size=4", "eval.max_images=4", "eval.grid_images=17",
                                                   "data.holdout=0.1", "train.log_every=1")]
        original = Trainer._step

        def sigterm_in_step_3(self: Trainer, micro: object) -> object:
            if self.state.step == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            return original(self, micro)

        mp.setattr(Trainer, "_step", sigterm_in_step_3)
        assert main(generator) == 128 + signal.SIGTERM
        assert latest_checkpoint(here / "runs" / "var-tiny").name == "step-00000003"
        mp.setattr(Trainer, "_step", original)
        assert main(generator) == 0  # the same command again: resumes
        assert main(["sample", "runs/var-tiny", "--classes", "0,3", "--n", "2", "--out", "samples"]) == 0
    return here


def test_tokenize_wrote_one_class_per_photograph(pipeline: Path) -> None:
    index = read_index(pipeline / TOKENS)
    assert len(index.classes) == 17 and index.count == 17 * CROPS and index.flip
    tok = Tokenizer.from_pretrained(str(pipeline / "runs" / "xqgan-v-tiny-msvr"))
    index.check_tokenizer(tok)
    item = TokenShards(index, flip=False)[0]
    assert tuple(item["tokens"].shape) == (130, 2)  # scales 1..8 of 2 product branches


def test_the_generator_run_resumed_and_finished(pipeline: Path) -> None:
    out = pipeline / "runs" / "var-tiny"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if r.get("split") == "train"]
    assert steps == [1, 2, 3, 4]  # no step trained twice, none lost
    assert latest_checkpoint(out).name == "step-00000004"
    evals = [r for r in rows if r.get("split") == "eval"]
    assert evals and evals[-1]["step"] == 4 and 0 <= evals[-1]["acc"] <= 1
    with Image.open(out / "samples.png") as grid:  # one labelled row per photograph, one sample each
        assert grid.size[1] >= 17 * 64 and grid.size[0] > 64 + 20


def test_sample_wrote_pngs_and_a_labelled_grid(pipeline: Path) -> None:
    written = sorted(p.name for p in (pipeline / "samples").iterdir())
    assert written == ["class0000_000.png", "class0000_001.png", "class0003_000.png", "class0003_001.png", "grid.png"]
    with Image.open(pipeline / "samples" / "class0003_001.png") as one:
        assert one.size == (64, 64)
    with Image.open(pipeline / "samples" / "grid.png") as grid:
        assert grid.size[0] > 2 * 64 and grid.size[1] > 2 * 64  # 2 rows x 2 samples, class names on the left
