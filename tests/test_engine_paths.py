"""Training paths no other test exercises, through the public API only (``Engine(Registry...).fit()``):

* the perceptual loss and the LPIPS metric inside the engine, with a saved random VGG16 of the real architecture;
* bf16 autocast training on the CPU;
* DataLoader workers (``train.num_workers = 2``).

Tiny images and 2 steps each; the 138 M-parameter VGG16 file is written once per module.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine_fixtures import make_images, tiny_run
from xqgan_core import Engine, Registry

STEPS = 2


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("images")
    make_images(root, n=8, size=32)
    return root


@pytest.fixture(scope="module")
def random_vgg16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """torchvision's VGG16 with random weights, saved as torchvision's own file is (whole-model state dict)."""
    import torchvision

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vgg") / "random-vgg16.pth"
    torch.save(torchvision.models.vgg16(weights=None).state_dict(), path)
    return path


def _fit(tmp_path: Path, data: Path, name: str, *overrides: str, resolution: int = 16) -> tuple[dict[str, float], Path]:
    out = tmp_path / name
    run_file = tmp_path / f"{name}.toml"
    run_file.write_text(tiny_run(data, out, steps=STEPS, checkpoint_every=STEPS, eval_every=STEPS))
    registry = Registry.from_toml(run_file, overrides=[f"data.resolution={resolution}", *overrides])
    return Engine(registry).fit(), out


def _records(out: Path, split: str) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("split") == split]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "checkpoints" / f"step-{STEPS:08d}" / "model.safetensors"))


def _differ(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    assert a.keys() == b.keys()
    return any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.filterwarnings("error:LPIPS backbone weights not found")  # the configured file must be used
def test_perceptual_loss_and_lpips_metric_in_the_engine(tmp_path: Path, data: Path, random_vgg16: Path) -> None:
    lpips = [f"loss.lpips_weights={random_vgg16}", "eval.lpips=true", "loss.require_perceptual=true"]
    # 32 px: VGG16's four poolings leave a 2x2 map for LPIPS' last layer
    metrics, with_out = _fit(tmp_path, data, "with", "loss.perceptual=1.0", *lpips, resolution=32)
    train = _records(with_out, "train")
    assert len(train) == STEPS
    for record in train:
        assert math.isfinite(record["perceptual"]) and record["perceptual"] > 0, record
    assert math.isfinite(metrics["lpips"]) and metrics["lpips"] > 0
    assert _records(with_out, "eval")[-1]["lpips"] == pytest.approx(metrics["lpips"])

    # the same run without the perceptual term (LPIPS still measured): no such term, and other weights
    metrics_off, without_out = _fit(tmp_path, data, "without", "loss.perceptual=0.0", *lpips, resolution=32)
    assert all("perceptual" not in r for r in _records(without_out, "train"))
    assert math.isfinite(metrics_off["lpips"])
    assert _differ(_weights(with_out), _weights(without_out)), "the perceptual loss did not change training"


def test_bf16_autocast_training_on_cpu(tmp_path: Path, data: Path) -> None:
    metrics, bf16_out = _fit(tmp_path, data, "bf16", "train.precision=bf16")
    for record in _records(bf16_out, "train"):
        assert math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"]), record
    assert math.isfinite(metrics["psnr"])
    bf16 = _weights(bf16_out)
    assert all(t.dtype == torch.float32 for t in bf16.values() if t.is_floating_point()), "autocast cast the weights"
    _, fp32_out = _fit(tmp_path, data, "fp32", "train.precision=fp32")
    assert _differ(bf16, _weights(fp32_out)), "bf16 training gave bitwise fp32 results: autocast was not active"


def test_dataloader_workers_give_the_same_run(tmp_path: Path, data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every item is a function of its (index, seed) key, so worker processes change nothing in the result."""
    from PIL import Image

    opened_by = tmp_path / "pids.txt"
    real_open = Image.open

    def recording_open(*args: object, **kwargs: object) -> Image.Image:
        with open(opened_by, "a") as fh:  # a file, since the workers are other processes
            fh.write(f"{os.getpid()}\n")
        return real_open(*args, **kwargs)

    monkeypatch.setattr(Image, "open", recording_open)
    metrics, workers_out = _fit(tmp_path, data, "workers", "train.num_workers=2")
    assert math.isfinite(metrics["psnr"])
    assert set(opened_by.read_text().split()) - {str(os.getpid())}, "no image was read in a worker process"
    _, inline_out = _fit(tmp_path, data, "inline", "train.num_workers=0")
    a, b = _weights(workers_out), _weights(inline_out)
    assert not _differ(a, b), "train.num_workers=2 trained different weights than loading in the main process"


def test_required_perceptual_without_weights_stops_before_anything_is_written(
    tmp_path: Path, data: Path, offline_env: Path
) -> None:
    """What the GPU presets set: offline and without the VGG16 file, the run stops instead of training without it."""
    from xqgan_core.errors import CheckpointError

    run_file = tmp_path / "run.toml"
    run_file.write_text(tiny_run(data, tmp_path / "out", steps=STEPS))
    registry = Registry.from_toml(run_file, overrides=["loss.perceptual=1.0", "loss.require_perceptual=true"])
    with pytest.raises(CheckpointError, match="require_perceptual") as err:
        Engine(registry).fit()
    assert "vgg16-397923af.pth" in str(err.value) and "lpips_weights" in str(err.value)
    assert not (tmp_path / "out").exists(), "the run folder was touched before the check"
