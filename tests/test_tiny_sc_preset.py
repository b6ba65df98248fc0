"""configs/xqgan-sc-tiny-msvr.toml: the tiny ViT MSVR run trains end to end through ``xqgan-run`` (a few steps here),
and Tokenizer.from_checkpoint / from_pretrained reload it with the token layout the run file describes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from xqgan_core import Registry, Tokenizer
from xqgan_core.checkpoint import latest_checkpoint
from xqgan_core.cli import main

pytest.importorskip("xqgan_plugin_vit")

PRESET = Path(__file__).resolve().parents[1] / "configs" / "xqgan-sc-tiny-msvr.toml"
STEPS = 3


def test_the_preset_is_a_tiny_random_init_vit_msvr_product_of_two_branches() -> None:
    cfg = Registry.from_toml(PRESET).config
    assert cfg.encoder.use == cfg.decoder.use == "vit" and cfg.data.use == "sample"
    assert cfg.encoder.config.init == cfg.decoder.config.init == ""  # random: nothing to download
    assert cfg.encoder.config.image_size == cfg.data.config.resolution <= 128
    q = cfg.quantizer
    assert q.use == "pq" and q.config.branches == cfg.encoder.config.branches == 2
    branch = q.config.branch
    assert branch.use == "msrq" and branch.config.code.use == "vq"
    assert branch.config.scales[-1] == cfg.encoder.config.latent_size  # the scales end at the K x K query grid
    assert cfg.device is None and cfg.train.precision == "auto"  # whatever machine it runs on


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny-sc") / "run"
    overrides = [f"run.out_dir={str(out)!r}", f"train.steps={STEPS}", f"train.checkpoint_every={STEPS}",
                 f"train.eval_every={STEPS}", "train.warmup_steps=1", "loss.disc_start=2", "eval.max_images=4",
                 "eval.grid_images=2"]
    assert main([str(PRESET), *[arg for o in overrides for arg in ("--set", o)]]) == 0
    return out


def test_it_trains_end_to_end_through_the_cli(trained: Path) -> None:
    summary = json.loads((trained / "summary.json").read_text())
    assert summary  # the run ended with its evaluation
    rows = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r.get("split") == "train"]
    assert len(train_rows) >= 1 and all(torch.isfinite(torch.tensor(r["loss"])) for r in train_rows)
    assert any("adv" in r for r in train_rows)  # the discriminator joined in the last step
    assert (trained / "reconstructions.png").is_file()
    assert latest_checkpoint(trained).name == f"step-{STEPS:08d}"


def test_it_reloads_with_the_token_layout_of_the_run_file(trained: Path) -> None:
    cfg = Registry.from_toml(PRESET).config
    scales = list(cfg.quantizer.config.branch.config.scales)
    vocab = cfg.quantizer.config.branch.config.code.config.codebook_size
    size = cfg.data.config.resolution

    tok = Tokenizer.from_checkpoint(trained, device="cpu")
    again = Tokenizer.from_pretrained(trained, device="cpu")  # a run folder, as a published one would be
    assert again.checkpoint == tok.checkpoint == latest_checkpoint(trained)
    assert tok.resolution == size and tok.latent_grid(size, size) == (scales[-1], scales[-1])

    x = torch.rand(3, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    indices = tok.encode(x)
    assert [tuple(i.shape) for i in indices] == [(3, 2, s, s) for s in scales]  # per scale (B, branch, s, s)
    assert all(int(i.max()) < vocab for i in indices)
    layout = tok.token_layout
    assert (layout.length, layout.tokens_per_step, layout.branches) == (sum(s * s for s in scales), 2, 2)
    assert set(layout.vocab_sizes) == {vocab}
    sequence = tok.encode(x, as_sequence=True)
    assert sequence.shape == (3, layout.length, 2)
    images = tok.decode(indices)
    assert images.shape == x.shape and images.abs().max() <= 1
    torch.testing.assert_close(tok.decode(sequence, as_sequence=True), images)
    for a, b in zip(again.encode(x), indices):
        assert torch.equal(a, b)
