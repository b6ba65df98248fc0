"""Tokenizer: loading a real checkpoint (trained here in a few steps), encode/decode, and the CLI commands."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from xqgan_core import Registry
from xqgan_core import checkpoint as ckpt
from xqgan_core.engine import Engine
from xqgan_core.errors import CheckpointError, ConfigError, ImageReadError, XQGanError
from xqgan_core.tokenizer import Tokenizer, evaluate_folder, reconstruct_files
from xqgan_core.tomlwrite import dumps as toml_dumps

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CNN = {"use": "cnn", "channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1, "z_channels": 16,
       "level_attention": False, "mid_attention": True}  # fmt: skip


def _smooth_image(rng: np.random.Generator, size: int = 40) -> Image.Image:
    coarse = Image.fromarray(rng.integers(0, 256, (5, 5, 3), dtype=np.uint8), "RGB")
    return coarse.resize((size, size), Image.Resampling.BICUBIC)


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(12):
        _smooth_image(rng).save(root / f"img{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, images_dir: Path) -> Path:
    """A real run: 4 engine steps, checkpoints at steps 2 and 4 (EMA on)."""
    out = tmp_path_factory.mktemp("run")
    registry = Registry.from_dict({
        "run": {"name": "tok-test", "out_dir": str(out), "seed": 0},
        "device": "cpu",
        "data": {"use": "folder", "root": str(images_dir), "resolution": 32},
        "encoder": {**CNN, "out_dim": 8},
        "quantizer": {"use": "vq", "codebook_size": 64, "dim": 8},
        "decoder": {**CNN, "in_dim": 8},
        "train": {"steps": 4, "batch_size": 4, "checkpoint_every": 2, "eval_every": 4, "warmup_steps": 1, "lr": 1e-3},
        "loss": {"perceptual": 0.0},
        "eval": {"lpips": False},
    })  # fmt: skip
    Engine(registry).fit()
    return out


@pytest.fixture(scope="module")
def ckpt_dir(run_dir: Path) -> Path:
    found = ckpt.latest_checkpoint(run_dir)
    assert found is not None and found.name == "step-00000004"
    return found


@pytest.fixture(scope="module")
def tok(ckpt_dir: Path) -> Tokenizer:
    return Tokenizer.from_checkpoint(ckpt_dir, device="cpu")


def _batch(images_dir: Path, tok: Tokenizer, n: int = 3) -> torch.Tensor:
    return torch.stack([tok.preprocess(p) for p in sorted(images_dir.glob("*.png"))[:n]])


def _edited_checkpoint(src: Path, dst: Path, edit) -> Path:  # noqa: ANN001
    shutil.copytree(src, dst)
    data = tomllib.loads((dst / ckpt.RUN).read_text(encoding="utf-8"))
    edit(data)
    (dst / ckpt.RUN).write_text(toml_dumps(data), encoding="utf-8")
    return dst


# ----------------------------------------------------------------------------------------------------------------


def test_properties(tok: Tokenizer, ckpt_dir: Path) -> None:
    assert (tok.resolution, tok.downsample, tok.codebook_size) == (32, 2, 64)
    assert tok.checkpoint == ckpt_dir and tok.weights == ckpt_dir / ckpt.EMA
    assert not tok.model.training
    assert tok.torch_device == torch.device("cpu")


def test_encode_indices(tok: Tokenizer, images_dir: Path) -> None:
    x = _batch(images_dir, tok)
    assert x.shape == (3, 3, 32, 32)
    idx = tok.encode(x)
    assert idx.shape == (3, 16, 16) and idx.dtype == torch.int64
    assert int(idx.min()) >= 0 and int(idx.max()) < tok.codebook_size


def test_decode_encode_equals_reconstruct(tok: Tokenizer, images_dir: Path) -> None:
    x = _batch(images_dir, tok)
    recon = tok.reconstruct(x)
    assert recon.shape == x.shape and recon.dtype == torch.float32
    assert float(recon.min()) >= -1.0 and float(recon.max()) <= 1.0
    torch.testing.assert_close(tok.decode(tok.encode(x)), recon, rtol=0, atol=0)
    assert not recon.requires_grad


def test_encode_as_sequence_and_decode_it(tok: Tokenizer, images_dir: Path) -> None:
    x = _batch(images_dir, tok)
    idx, seq = tok.encode(x), tok.encode(x, as_sequence=True)
    layout = tok.token_layout
    assert (layout.length, layout.tokens_per_step, layout.grid) == (256, 1, (16, 16))
    assert seq.shape == (3, 256, 1) and torch.equal(seq[:, :, 0], idx.flatten(1))
    torch.testing.assert_close(tok.decode(seq, as_sequence=True), tok.decode(idx), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"\(B, 256, 1\)"):
        tok.decode(seq[:, :-1], as_sequence=True)


def test_a_product_of_residual_quantizers_speaks_sequences() -> None:
    # (B, P, N, h, w) indices: the sequence has P * N tokens per position, branch-major, and decodes the same
    from xqgan_core import build
    from xqgan_core.model import TokenizerModel

    torch.manual_seed(0)
    quantizer = build("quantizer", {"use": "pq", "branches": 2, "branch": {
        "use": "rq", "levels": 2, "code": {"use": "vq", "codebook_size": 16, "dim": 4}}})
    model = TokenizerModel(build("encoder", {**CNN, "out_dim": 8}), quantizer, build("decoder", {**CNN, "in_dim": 8}))
    tok = Tokenizer(model, build("device", "cpu"))  # no run resolution
    x = torch.rand(2, 3, 16, 24) * 2 - 1
    idx, seq = tok.encode(x), tok.encode(x, as_sequence=True)
    assert idx.shape == (2, 2, 2, 8, 12) and seq.shape == (2, 96, 4)
    assert torch.equal(seq[1, 13], idx[1, :, :, 1, 1].flatten())
    layout = tok.layout_for(16, 24)
    assert layout.codebooks == ("branch0/level0", "branch0/level1", "branch1/level0", "branch1/level1")
    torch.testing.assert_close(tok.decode(seq, layout=layout), tok.decode(idx), rtol=0, atol=0)
    with pytest.raises(ValueError, match="layout_for"):
        tok.token_layout  # noqa: B018 - the property needs the run's resolution


def test_non_divisible_size_names_the_factor(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match=r"33x32 .*downsampling factor 2"):
        tok.encode(torch.zeros(1, 3, 33, 32))
    with pytest.raises(ValueError, match=r"33x32 .*downsampling factor 2.*e\.g\. 32x32"):
        tok.layout_for(33, 32)
    # a convolutional encoder's grid is the image size over its downsampling factor, any aspect ratio
    assert tok.latent_grid(16, 24) == tok.model.encoder.latent_grid(16, 24) == (8, 12)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        tok.encode(torch.zeros(3, 32, 32))


def test_preprocess(tok: Tokenizer, images_dir: Path, tmp_path: Path) -> None:
    wide = Image.new("RGB", (60, 30), (255, 0, 0))
    wide.paste((0, 0, 255), (0, 0, 15, 30))  # a blue strip outside the centre square
    t = tok.preprocess(wide)
    assert t.shape == (3, 32, 32)
    torch.testing.assert_close(t[:, 16, 16], torch.tensor([1.0, -1.0, -1.0]))  # centre crop: red only
    assert tok.preprocess(wide, resolution=16).shape == (3, 16, 16)
    from_path = tok.preprocess(images_dir / "img00.png")
    assert from_path.shape == (3, 32, 32) and float(from_path.min()) >= -1 and float(from_path.max()) <= 1
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(ImageReadError, match="bad.jpg: "):
        tok.preprocess(bad)


def test_preprocess_refuses_images_above_the_runs_pixel_cap(ckpt_dir: Path, images_dir: Path, tmp_path: Path) -> None:
    capped = _edited_checkpoint(ckpt_dir, tmp_path / "capped", lambda d: d["data"].update(max_pixels=1000))
    tok = Tokenizer.from_checkpoint(capped, device="cpu")
    with pytest.raises(ImageReadError, match=r"img00\.png: image too large: 40 x 40 = 1,600 pixels.*data\.max_pixels = 1,000"):
        tok.preprocess(images_dir / "img00.png")


def test_from_checkpoint_accepts_out_dir_folder_and_file(run_dir: Path, ckpt_dir: Path, tok: Tokenizer) -> None:
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    expected = tok.encode(x)
    for where in (run_dir, ckpt_dir, ckpt_dir / ckpt.MODEL, ckpt_dir / ckpt.RUN):
        other = Tokenizer.from_checkpoint(where, device="cpu")
        assert other.checkpoint == ckpt_dir
        assert torch.equal(other.encode(x), expected)


def test_use_ema_false_loads_model_weights(ckpt_dir: Path, tok: Tokenizer) -> None:
    raw = Tokenizer.from_checkpoint(ckpt_dir, device="cpu", use_ema=False)
    assert raw.weights == ckpt_dir / ckpt.MODEL
    model_sd, ema_sd = load_file(str(ckpt_dir / ckpt.MODEL)), load_file(str(ckpt_dir / ckpt.EMA))
    key = next(k for k, v in model_sd.items() if v.dtype.is_floating_point and not torch.equal(v, ema_sd[k]))
    assert torch.equal(raw.model.state_dict()[key], model_sd[key])
    assert torch.equal(tok.model.state_dict()[key], ema_sd[key])


def test_without_ema_file_model_weights_are_used(ckpt_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    shutil.copytree(ckpt_dir, folder)
    (folder / ckpt.EMA).unlink()  # as written by a run without EMA: meta.json does not list it either
    meta = json.loads((folder / ckpt.META).read_text(encoding="utf-8"))
    meta["files"] = [stem for stem in meta.get("files", ["model"]) if stem != "ema"]
    (folder / ckpt.META).write_text(json.dumps(meta), encoding="utf-8")
    assert Tokenizer.from_checkpoint(folder, device="cpu", use_ema=True).weights == folder / ckpt.MODEL


def test_changed_architecture_names_mismatched_keys(ckpt_dir: Path, tmp_path: Path) -> None:
    def widen(data: dict) -> None:
        data["encoder"]["channels"] = 24

    folder = _edited_checkpoint(ckpt_dir, tmp_path / "ckpt", widen)
    with pytest.raises(CheckpointError, match=r"shape mismatch: encoder\.\S+ \(checkpoint") as info:
        Tokenizer.from_checkpoint(folder, device="cpu")
    assert "architecture changed" in str(info.value)


def test_missing_tokenizer_plugin_is_named(ckpt_dir: Path, tmp_path: Path) -> None:
    def rename(data: dict) -> None:
        data["encoder"]["use"] = "no-such-encoder"
        data["encoder"].pop("package", None)

    folder = _edited_checkpoint(ckpt_dir, tmp_path / "ckpt", rename)
    with pytest.raises(ConfigError, match=r"encoder\.use: no encoder named 'no-such-encoder'"):
        Tokenizer.from_checkpoint(folder, device="cpu")


def test_training_only_plugins_are_not_needed(ckpt_dir: Path, tmp_path: Path) -> None:
    def add_gone(data: dict) -> None:
        data["device"] = {"use": "gone-device"}
        data["discriminators"] = [{"use": "gone-disc", "package": "xqgan-plugin-gone"}]
        data["data"]["use"] = "gone-data"

    folder = _edited_checkpoint(ckpt_dir, tmp_path / "ckpt", add_gone)
    assert Tokenizer.from_checkpoint(folder, device="cpu").resolution == 32


def test_reconstruct_files_in_process(ckpt_dir: Path, images_dir: Path, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(images_dir / "img00.png", other / "img01.png")  # same stem as an input from images_dir
    inputs = [images_dir / "img01.png", other / "img01.png", tmp_path / "missing.png"]
    written = reconstruct_files(ckpt_dir, inputs, tmp_path / "out")
    names = [p.name for p in written]
    assert names == ["img01.png", "img01_recon.png", "img01-2.png", "img01-2_recon.png"]
    assert "missing.png: file not found" in capsys.readouterr().err
    with Image.open(written[0]) as pair, Image.open(written[1]) as recon:
        assert pair.size == (64, 32) and recon.size == (32, 32)
        # the right half of the side-by-side image is the reconstruction
        assert np.array_equal(np.asarray(pair)[:, 32:], np.asarray(recon))
    with pytest.raises(XQGanError, match="none of the 1 image"):
        reconstruct_files(ckpt_dir, [tmp_path / "missing.png"], tmp_path / "out2")


@pytest.mark.filterwarnings("ignore:LPIPS backbone weights not found")
def test_evaluate_folder_in_process(ckpt_dir: Path, images_dir: Path, tmp_path: Path) -> None:
    metrics = evaluate_folder(ckpt_dir, images_dir, max_images=5, batch_size=4, progress=False)
    assert metrics["images"] == 5.0
    assert 0 < metrics["utilization"] <= 100 and metrics["perplexity"] >= 1
    with pytest.raises(XQGanError, match="cannot evaluate on .*does not exist"):
        evaluate_folder(ckpt_dir, tmp_path / "nowhere")


# ----------------------------------------------------------------------------------------------------------------
# the CLI, as a user runs it


def _cli(*args: str | Path, torch_home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TORCH_HOME": str(torch_home)}  # empty TORCH_HOME: no LPIPS weights
    return subprocess.run(
        [sys.executable, "-m", "xqgan_core.cli", *map(str, args)], capture_output=True, text=True, env=env, timeout=120
    )


def test_cli_reconstruct(ckpt_dir: Path, images_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    out = tmp_path / "out"
    proc = _cli("reconstruct", ckpt_dir, images_dir / "img02.png", images_dir / "img03.png", bad, "--out", out,
                torch_home=tmp_path / "th")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert f"{bad}: " in proc.stderr
    expected = [out / n for n in ("img02.png", "img02_recon.png", "img03.png", "img03_recon.png")]
    assert proc.stdout.split() == [str(p) for p in expected]
    assert all(p.is_file() for p in expected) and not (out / "bad.png").exists()


def test_cli_eval_json(ckpt_dir: Path, images_dir: Path, tmp_path: Path) -> None:
    proc = _cli("eval", ckpt_dir, "--data", images_dir, "--json", "--batch-size", "6", torch_home=tmp_path / "th")
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads(proc.stdout)
    assert {"psnr", "ssim", "utilization", "perplexity", "images"} <= set(metrics)
    assert metrics["images"] == 12.0  # every image of the folder, not a held-out split
    assert "lpips" not in metrics and "LPIPS backbone weights not found" in proc.stderr
    assert all(np.isfinite(v) for v in metrics.values())
