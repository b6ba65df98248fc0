"""Converting foreign checkpoints: the safe reader and LlamaGen VQ -> xqgan run folder (`xqgan-run convert`)."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from xqgan_core import checkpoint as ckpt
from xqgan_core.cli import main
from xqgan_core.convert import (
    DEFAULT_PRESET,
    convert_llamagen,
    from_llamagen_keys,
    read_foreign_checkpoint,
    to_llamagen_keys,
)
from xqgan_core.errors import CheckpointError
from xqgan_core.model import TokenizerModel
from xqgan_core.registry import Registry
from xqgan_core.tokenizer import Tokenizer

# A tiny run file with the XQ-GAN-V layout (level attention at the lowest resolution, 32-group norms).
TINY_PRESET = """
[run]
name = "tiny"

[data]
use = "folder"
root = "unused"
resolution = 16

[encoder]
use = "cnn"
channels = 32
channel_mult = [1, 2]
num_res_blocks = 1
z_channels = 32
out_dim = 4

[quantizer]
use = "vq"
codebook_size = {codebook_size}
dim = 4

[decoder]
use = "cnn"
channels = 32
channel_mult = [1, 2]
num_res_blocks = 2
z_channels = 32
in_dim = 4
"""


def _preset(tmp_path: Path, codebook_size: int = 16) -> Path:
    path = tmp_path / f"tiny-{codebook_size}.toml"
    path.write_text(TINY_PRESET.replace("{codebook_size}", str(codebook_size)), encoding="utf-8")
    return path


def _model(preset: Path) -> TokenizerModel:
    cfg = Registry.from_toml(preset).config
    torch.manual_seed(0)
    model = TokenizerModel(cfg.encoder.build(), cfg.quantizer.build(), cfg.decoder.build()).eval()
    with torch.no_grad():  # random values everywhere, norms included, so a swapped tensor cannot go unnoticed
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model


def llamagen_shapes(ch: int, mult: list[int], enc_blocks: int, dec_blocks: int, z: int, dim: int, codes: int
                    ) -> dict[str, tuple[int, ...]]:  # fmt: skip
    """Every key of LlamaGen's VQModel state dict with its shape, written out from the structure of its
    tokenizer/tokenizer_image/vq_model.py (independently of the converter's rename table).
    ``dec_blocks`` is the decoder's ResBlocks per level (LlamaGen's num_res_blocks + 1)."""
    out: dict[str, tuple[int, ...]] = {}

    def conv(name: str, cin: int, cout: int, k: int) -> None:
        out[f"{name}.weight"], out[f"{name}.bias"] = (cout, cin, k, k), (cout,)

    def norm(name: str, c: int) -> None:
        out[f"{name}.weight"], out[f"{name}.bias"] = (c,), (c,)

    def res(name: str, cin: int, cout: int) -> None:
        norm(f"{name}.norm1", cin), conv(f"{name}.conv1", cin, cout, 3)
        norm(f"{name}.norm2", cout), conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cin, cout, 1)

    def attn(name: str, c: int) -> None:
        norm(f"{name}.norm", c)
        for part in ("q", "k", "v", "proj_out"):
            conv(f"{name}.{part}", c, c, 1)

    def mid(name: str, c: int) -> None:
        res(f"{name}.mid.0", c, c), attn(f"{name}.mid.1", c), res(f"{name}.mid.2", c, c)

    n = len(mult)
    conv("encoder.conv_in", 3, ch, 3)
    c = ch
    for i in range(n):
        for j in range(enc_blocks):
            res(f"encoder.conv_blocks.{i}.res.{j}", c, ch * mult[i])
            c = ch * mult[i]
            if i == n - 1:
                attn(f"encoder.conv_blocks.{i}.attn.{j}", c)
        if i != n - 1:
            conv(f"encoder.conv_blocks.{i}.downsample.conv", c, c, 3)
    mid("encoder", c)
    norm("encoder.norm_out", c), conv("encoder.conv_out", c, z, 3)
    conv("quant_conv", z, dim, 1)
    out["quantize.embedding.weight"] = (codes, dim)
    out["quantize.codebook_used"] = (65536,)
    conv("post_quant_conv", dim, z, 1)
    c = ch * mult[-1]
    conv("decoder.conv_in", z, c, 3)
    mid("decoder", c)
    for idx, level in enumerate(reversed(range(n))):
        for j in range(dec_blocks):
            res(f"decoder.conv_blocks.{idx}.res.{j}", c, ch * mult[level])
            c = ch * mult[level]
            if level == n - 1:
                attn(f"decoder.conv_blocks.{idx}.attn.{j}", c)
        if level != 0:
            conv(f"decoder.conv_blocks.{idx}.upsample.conv", c, c, 3)
    norm("decoder.norm_out", c), conv("decoder.conv_out", c, 3, 3)
    return out


def _llamagen_file(tmp_path: Path, model: TokenizerModel, **extra: object) -> Path:
    state = to_llamagen_keys(model.state_dict())
    state["quantize.codebook_used"] = torch.arange(65536.0)  # LlamaGen's usage window: dropped on conversion
    path = tmp_path / "vq_tiny.pt"
    torch.save({"model": state, **extra}, path)
    return path


# ----------------------------------------------------------------------------------------------------------------
# the safe reader


class _RunsCodeWhenUnpickled:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.makedirs, (str(self.marker),)


def test_a_pickle_that_would_run_code_is_refused_and_nothing_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "payload": _RunsCodeWhenUnpickled(marker)}, evil)
    with pytest.raises(CheckpointError, match=r"refusing to load .*evil\.pt.*os\.makedirs"):
        read_foreign_checkpoint(evil)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="os.makedirs"):
        convert_llamagen(evil, tmp_path / "out", preset=_preset(tmp_path))
    assert not marker.exists() and not (tmp_path / "out").exists()
    legacy = tmp_path / "legacy.pt"  # the pre-zip torch format: the same refusal
    torch.save({"payload": _RunsCodeWhenUnpickled(marker)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match=r"refusing to load .*legacy\.pt.*os\.makedirs"):
        read_foreign_checkpoint(legacy)
    assert not marker.exists()


def test_an_argparse_namespace_is_accepted_only_inside_the_call(tmp_path: Path) -> None:
    path = tmp_path / "with-args.pt"
    torch.save({"model": {"w": torch.ones(2)}, "args": argparse.Namespace(image_size=256, codebook_size=16384)}, path)
    data = read_foreign_checkpoint(path)
    assert data["args"] == argparse.Namespace(image_size=256, codebook_size=16384)
    assert torch.equal(data["model"]["w"], torch.ones(2))
    with pytest.raises(Exception, match="argparse.Namespace"):  # the allow-list did not leak into torch's global one
        torch.load(path, weights_only=True)


def test_a_file_that_is_not_a_torch_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read .*junk.pt as a torch checkpoint"):
        read_foreign_checkpoint(junk)
    with pytest.raises(CheckpointError, match="no such file"):
        read_foreign_checkpoint(tmp_path / "missing.pt")


# ----------------------------------------------------------------------------------------------------------------
# the key mapping


def test_the_rename_table_covers_llamagen_vq16_and_our_preset_exactly() -> None:
    # LlamaGen VQ-16 (ch 128, mult 1,1,2,2,4, 2 encoder / 3 decoder blocks, z 256, codes 16384 x 8) vs our preset,
    # built on the meta device: every key maps, every shape agrees, and only our vq's usage statistics are extra
    lg = llamagen_shapes(128, [1, 1, 2, 2, 4], 2, 3, 256, 8, 16384)
    converted = from_llamagen_keys({k: torch.empty(s, device="meta") for k, s in lg.items()})
    cfg = Registry.from_toml(DEFAULT_PRESET).config
    with torch.device("meta"):
        ours = TokenizerModel(cfg.encoder.build(), cfg.quantizer.build(), cfg.decoder.build()).state_dict()
    assert set(ours) - set(converted) == {"quantizer.last_hit", "quantizer.train_batches"}
    assert {k: tuple(v.shape) for k, v in converted.items()} == {
        k: tuple(v.shape) for k, v in ours.items() if k in converted
    }
    assert len(converted) == len(lg) - 1  # all but quantize.codebook_used


def test_our_keys_go_to_llamagen_names(tmp_path: Path) -> None:
    model = _model(_preset(tmp_path))
    names = set(to_llamagen_keys(model.state_dict()))
    assert names == set(llamagen_shapes(32, [1, 2], 1, 2, 32, 4, 16)) - {"quantize.codebook_used"}


def test_an_unknown_key_is_refused_not_dropped() -> None:
    with pytest.raises(CheckpointError, match=r"1 key\(s\).*encoder\.extra_head\.weight"):
        from_llamagen_keys({"quant_conv.weight": torch.zeros(1), "encoder.extra_head.weight": torch.zeros(1)})


# ----------------------------------------------------------------------------------------------------------------
# conversion into a run folder


def test_llamagen_file_converts_to_a_loadable_run_folder(tmp_path: Path) -> None:
    preset = _preset(tmp_path)
    model = _model(preset)
    src = _llamagen_file(tmp_path, model, args=argparse.Namespace(vq_model="VQ-16"), steps=10)
    folder = convert_llamagen(src, tmp_path / "run", preset=preset)
    assert folder == tmp_path / "run" / "checkpoints" / "step-00000000"
    assert sorted(p.name for p in folder.iterdir()) == ["meta.json", "model.safetensors", "run.toml", "state.pt"]
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["converted_from"] == {
        "format": "llamagen", "file": str(src.resolve()), "sha256": hashlib.sha256(src.read_bytes()).hexdigest()
    }
    assert 'name = "llamagen-vq_tiny"' in (folder / "run.toml").read_text()

    tok = Tokenizer.from_checkpoint(tmp_path / "run", device="cpu")
    assert tok.resolution == 16 and tok.weights == folder / "model.safetensors"
    loaded, source = tok.model.state_dict(), model.state_dict()
    assert set(loaded) == set(source)
    for key, value in source.items():
        assert torch.equal(loaded[key], value), key
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    indices = tok.encode(x)
    assert torch.equal(indices, model.encode(x))
    torch.testing.assert_close(tok.decode(indices), model.decode(indices).clamp(-1, 1), rtol=0, atol=0)


def test_an_ema_entry_is_kept_and_preferred(tmp_path: Path) -> None:
    preset = _preset(tmp_path)
    model, ema = _model(preset), _model(preset)
    with torch.no_grad():
        ema.quantizer.embedding.weight.add_(1.0)
    src = _llamagen_file(tmp_path, model, ema=to_llamagen_keys(ema.state_dict()))
    folder = convert_llamagen(src, tmp_path / "run", preset=preset)
    assert (folder / "ema.safetensors").is_file()
    tok = Tokenizer.from_checkpoint(folder, device="cpu")
    assert torch.equal(tok.model.quantizer.embedding.weight, ema.quantizer.embedding.weight)
    raw = Tokenizer.from_checkpoint(folder, device="cpu", use_ema=False)
    assert torch.equal(raw.model.quantizer.embedding.weight, model.quantizer.embedding.weight)


def test_a_checkpoint_of_another_architecture_is_refused_before_writing(tmp_path: Path) -> None:
    src = _llamagen_file(tmp_path, _model(_preset(tmp_path, codebook_size=16)))
    expected = r"does not fit .*quantizer\.embedding\.weight \(\(16, 4\) vs \(32, 4\)\)"
    with pytest.raises(CheckpointError, match=expected):
        convert_llamagen(src, tmp_path / "run", preset=_preset(tmp_path, codebook_size=32))
    assert not (tmp_path / "run").exists()


def test_a_missing_tensor_or_foreign_entry_is_refused(tmp_path: Path) -> None:
    preset = _preset(tmp_path)
    state = to_llamagen_keys(_model(preset).state_dict())
    del state["decoder.conv_out.bias"]
    torch.save({"model": state}, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match=r"missing: decoder\.conv_out\.bias"):
        convert_llamagen(tmp_path / "partial.pt", tmp_path / "run", preset=preset)
    torch.save({"state_dict": state}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a LlamaGen checkpoint"):
        convert_llamagen(tmp_path / "other.pt", tmp_path / "run", preset=preset)


def test_the_codebook_metric_must_match_llamagens(tmp_path: Path) -> None:
    preset = _preset(tmp_path)
    model = _model(preset)
    unnormalised = tmp_path / "cosine-off.toml"
    unnormalised.write_text(preset.read_text().replace("\ndim = 4\n", "\ndim = 4\nl2_norm = false\n"))
    with pytest.raises(CheckpointError, match=r"codebook_l2_norm=True.*quantizer\.l2_norm = false"):
        convert_llamagen(_llamagen_file(tmp_path, model), tmp_path / "a", preset=unnormalised)
    src = _llamagen_file(tmp_path, model, args=argparse.Namespace(codebook_l2_norm=False))
    with pytest.raises(CheckpointError, match=r"codebook_l2_norm=False.*set quantizer\.l2_norm = false"):
        convert_llamagen(src, tmp_path / "b", preset=preset)
    assert convert_llamagen(src, tmp_path / "c", preset=unnormalised).is_dir()
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_an_existing_run_folder_is_not_overwritten(tmp_path: Path) -> None:
    preset = _preset(tmp_path)
    src = _llamagen_file(tmp_path, _model(preset))
    first = convert_llamagen(src, tmp_path / "run", preset=preset)
    before = (first / "model.safetensors").read_bytes()
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        convert_llamagen(src, tmp_path / "run", preset=preset)
    assert (first / "model.safetensors").read_bytes() == before
    assert ckpt.complete_checkpoints(tmp_path / "run") == [first]


# ----------------------------------------------------------------------------------------------------------------
# the CLI


def _cli(*args: str | Path) -> int:
    try:
        return main([str(a) for a in args])
    except SystemExit as exc:  # argparse usage errors
        return int(exc.code)


def test_cli_convert_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    preset = _preset(tmp_path)
    src = _llamagen_file(tmp_path, _model(preset))

    assert _cli("convert", "llamagen", src, "--out", tmp_path / "run", "--preset", preset, "--name", "lg16") == 0
    out = capsys.readouterr().out.strip()
    assert out == str(tmp_path / "run" / "checkpoints" / "step-00000000")
    assert 'name = "lg16"' in (Path(out) / "run.toml").read_text()
    image = tmp_path / "photo.png"  # the converted run serves the other commands like a trained one
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(image)
    assert _cli("reconstruct", tmp_path / "run", image, "--out", tmp_path / "recon") == 0
    assert Image.open(tmp_path / "recon" / "photo_recon.png").size == (16, 16)
    capsys.readouterr()

    assert _cli("convert", "taming", src, "--out", tmp_path / "r2", "--preset", preset) == 2
    assert "invalid choice: 'taming'" in capsys.readouterr().err
    assert _cli("convert", "reference", src, "--out", tmp_path / "r2", "--preset", preset) == 2  # not its layout
    assert "has no 'args'" in capsys.readouterr().err
    assert _cli("convert", "llamagen", src, "--preset", preset) == 2
    assert "--out" in capsys.readouterr().err
    assert _cli("convert", "llamagen", src, "--out", tmp_path / "r3", "--preset", tmp_path / "nope.toml") == 2
    assert "nope.toml: no such run file" in capsys.readouterr().err
    assert _cli("convert", "llamagen", src, "--out", tmp_path / "r4", "--preset", preset, "--name", "../up") == 2
    assert "run.name" in capsys.readouterr().err

    evil = tmp_path / "evil.pt"
    torch.save({"model": _RunsCodeWhenUnpickled(tmp_path / "pwned")}, evil)
    assert _cli("convert", "llamagen", evil, "--out", tmp_path / "r5", "--preset", preset) == 2
    assert "refusing to load" in capsys.readouterr().err and not (tmp_path / "pwned").exists()
    assert not any((tmp_path / d).exists() for d in ("r2", "r3", "r4", "r5"))
