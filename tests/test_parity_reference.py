"""Released XQ-GAN (reference code, ViT / SC) checkpoints: `xqgan-run convert reference`, parity with the reference
code itself (``tests/parity/reference-*``), ``Tokenizer.from_pretrained`` on such a file, and the refusals.

The parity bundles were made with ``scripts/make_parity_bundle.py reference-msvr --reference-repo PATH`` (and
``reference-msbr`` / ``reference-vp2``): the reference's own modules, recipe weights, two sample photos. Here the
same weights are regenerated from the manifest, saved as a reference-format checkpoint, converted by the real CLI
and loaded as an ordinary run; indices must agree exactly, images and latents within the manifest's tolerance.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from xqgan_core import checkpoint as ckpt
from xqgan_core.cli import main
from xqgan_core.convert import _expected_shapes
from xqgan_core.convert_reference import (
    _nest_codes,
    convert_reference,
    from_reference_keys,
    reference_run_config,
    to_reference_keys,
)
from xqgan_core.errors import CheckpointError
from xqgan_core.registry import Registry
from xqgan_core.testing.recipe_weights import recipe_state_dict, recipe_tensor
from xqgan_core.tokenizer import Tokenizer

PARITY = Path(__file__).parent / "parity"
# the reference tokenizer layouts scripts/make_parity_bundle.py writes (reference-msvr is committed at ViT-B)
BUNDLES = [n for n in ("reference-msvr", "reference-msbr", "reference-vp2") if (PARITY / n / "manifest.json").is_file()]

# MSVR10P2-4096 args as the reference's training script stores them, at ViT-S (cheap: 2 x 22 M parameters)
SMALL_ARGS: dict[str, Any] = {
    "enc_type": "dinov2", "dec_type": "dinov2", "encoder_model": "vit_small_patch14_dinov2.lvd142m",
    "decoder_model": "vit_small_patch14_dinov2.lvd142m", "codebook_size": 4096, "codebook_embed_dim": 32,
    "codebook_l2_norm": True, "product_quant": 2, "num_latent_tokens": 121,
    "v_patch_nums": [1, 1, 2, 3, 3, 4, 5, 6, 8, 11], "share_quant_resi": 4, "abs_pos_embed": True,
    "codebook_drop": 0.1, "start_drop": 3, "lfq": False, "semantic_guide": "dinov2", "image_size": 256,
}  # fmt: skip


def _bundle(name: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    folder = PARITY / name
    return json.loads((folder / "manifest.json").read_text()), load_file(str(folder / "expected.safetensors"))


def _reference_weights(manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The bundle's foreign state dict: recipe weights plus the constant buffers the manifest lists as they are."""
    dtypes = {k: getattr(torch, d) for k, d in manifest["dtypes"].items()}
    constants = manifest.get("constants", {})
    fixed = {k: torch.tensor(v, dtype=getattr(torch, constants["dtypes"][k]))
             for k, v in constants.get("values", {}).items()}
    return {**recipe_state_dict(manifest["keys"], manifest["seed"], dtypes), **fixed}


def _small_reference_file(path: Path, args: dict[str, Any] = SMALL_ARGS, entries: tuple[str, ...] = ("model",)
                          ) -> dict[str, dict[str, torch.Tensor]]:  # fmt: skip
    """A reference-format checkpoint for ``args`` with recipe weights (entry i drawn with seed i); returns the
    weights in OUR layout per entry."""
    run, _ = reference_run_config(argparse.Namespace(**args), path)
    shapes, optional = _expected_shapes(Registry.from_dict(run))
    ours = {e: {k: recipe_tensor(k, s, seed=i) for k, s in shapes.items() if k not in optional}
            for i, e in enumerate(entries)}
    torch.save({**{e: to_reference_keys(w) for e, w in ours.items()}, "args": argparse.Namespace(**args),
                "steps": 0}, path)
    return ours


def _write_file(path: Path, state: dict[str, torch.Tensor], args: Any) -> Path:
    torch.save({"model": state, **({"args": args} if args is not None else {})}, path)
    return path


# ----------------------------------------------------------------------------------------------------------------
# parity with the reference code


@pytest.mark.parametrize("name", BUNDLES)
def test_a_converted_reference_checkpoint_gives_the_reference_codes_and_images(name: str, tmp_path: Path,
                                                                               capsys: pytest.CaptureFixture) -> None:
    manifest, expected = _bundle(name)
    source = _write_file(tmp_path / "reference.pt", _reference_weights(manifest),
                         argparse.Namespace(**manifest["model"]["checkpoint_args"]))
    assert main(["convert", "reference", str(source), "--out", str(tmp_path / "run")]) == 0  # the real CLI path
    folder = Path(capsys.readouterr().out.strip().splitlines()[-1])
    source.unlink()  # (a few hundred MB at ViT-B)

    tok = Tokenizer.from_checkpoint(folder, device="cpu")
    images = expected["images"].float() / 127.5 - 1  # the manifest's input scaling
    tol = manifest["tolerances"]
    with torch.no_grad():
        latents = tok.model.encoder(images)
        indices = tok.model.quantizer.codes_to_indices(latents)  # what Tokenizer.encode returns
    assert (latents - expected["latents"]).abs().max().item() <= tol["latents_max_abs"]
    per_scale = indices if isinstance(indices, list) else [indices]
    for s, idx in enumerate(per_scale):  # ours (B, P, s, s) per scale; the reference's (B, s*s) per branch
        for b in range(idx.shape[1]):
            theirs = expected[f"indices.branch{b}.scale{s}"]
            assert torch.equal(idx[:, b].reshape(theirs.shape), theirs), f"branch {b}, scale {s}"
    assert sum(1 for k in expected if k.startswith("indices.")) == sum(i.shape[1] for i in per_scale)
    reconstructions = tok.decode(indices)
    assert (reconstructions - expected["reconstructions"]).abs().max().item() <= tol["images_max_abs"]


# ----------------------------------------------------------------------------------------------------------------
# the CLI, the converted run folder, from_pretrained


def test_convert_reference_takes_the_ema_weights_and_the_folder_reconstructs_through_the_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    source = tmp_path / "MSVR10P2-small.pt"
    ours = _small_reference_file(source, entries=("model", "ema"))
    assert main(["convert", "reference", str(source), "--out", str(tmp_path / "run")]) == 0
    folder = Path(capsys.readouterr().out.strip().splitlines()[-1])
    saved = load_file(str(folder / "model.safetensors"))
    assert torch.equal(saved["decoder.to_pixels.weight"], ours["ema"]["decoder.to_pixels.weight"])  # EMA preferred
    meta = json.loads((folder / ckpt.META).read_text())
    assert meta["converted_from"]["format"] == "reference" and meta["converted_from"]["weights"] == "ema"
    run = (folder / ckpt.RUN).read_text()
    assert 'name = "reference-MSVR10P2-small"' in run and 'init = ""' in run  # no DINOv2 download on load

    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(photo)
    assert main(["reconstruct", str(folder), str(photo), "--out", str(tmp_path / "out")]) == 0
    written = Path(capsys.readouterr().out.strip().splitlines()[-1])
    out = np.asarray(Image.open(written).convert("RGB"), dtype=np.float32)
    tok = Tokenizer.from_checkpoint(folder, device="cpu")
    direct = tok.reconstruct(tok.preprocess(photo).unsqueeze(0))[0].permute(1, 2, 0).numpy()
    assert out.shape == (256, 256, 3) and np.abs(out - (direct + 1) * 127.5).max() <= 1.0

    model_dir = tmp_path / "model-weights"
    convert_reference(source, model_dir, weights="model")
    saved = load_file(str(ckpt.latest_checkpoint(model_dir) / "model.safetensors"))
    assert torch.equal(saved["decoder.to_pixels.weight"], ours["model"]["decoder.to_pixels.weight"])


def test_from_pretrained_recognises_and_converts_a_reference_file_once(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XQGAN_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "MSVR10P2-small.pt"
    _small_reference_file(source)
    tok = Tokenizer.from_pretrained(source, device="cpu")  # format sniffed from the file, nothing unpickled
    converted = sorted((tmp_path / "cache" / "converted").iterdir())
    assert len(converted) == 1 and converted[0].name.startswith("reference-")
    indices = tok.encode(torch.zeros(1, 3, 256, 256))
    assert [tuple(i.shape) for i in indices] == [(1, 2, s, s) for s in SMALL_ARGS["v_patch_nums"]]
    again = Tokenizer.from_pretrained(source, device="cpu")
    assert again.checkpoint == tok.checkpoint and len(list((tmp_path / "cache" / "converted").iterdir())) == 1


# ----------------------------------------------------------------------------------------------------------------
# refusals


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"abs_pos_embed": False}, "abs_pos_embed = False"),
        ({"enc_type": "cnn"}, "enc_type = 'cnn'"),
        ({"encoder_model": "vit_base_patch14_reg4_dinov2.lvd142m"}, "encoder_model = 'vit_base_patch14_reg4"),
        ({"decoder_model": "vit_giant_patch14_dinov2.lvd142m"}, "decoder_model = 'vit_giant"),
        ({"image_size": 512}, "image_size = 512"),
        ({"num_latent_tokens": 120}, "num_latent_tokens = 120 is not a square"),
        ({"v_patch_nums": [1, 2, 4, 8]}, "must end at sqrt"),
    ],
)
def test_unsupported_reference_args_are_refused_naming_the_arg(tmp_path: Path, change: dict, message: str) -> None:
    source = _write_file(tmp_path / "r.pt", {"decoder.mask_token": torch.zeros(1, 1, 384)},
                         argparse.Namespace(**{**SMALL_ARGS, **change}))
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(")):
        convert_reference(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_lfq_codes_scaled_per_scale_are_refused(tmp_path: Path) -> None:
    args = {**SMALL_ARGS, "lfq": True, "codebook_size": 16384, "codebook_embed_dim": 14}
    source = _write_file(tmp_path / "r.pt", {"quantizes.0.scaler": 0.9 ** torch.arange(10.0) / 14**0.5},
                         argparse.Namespace(**args))
    with pytest.raises(CheckpointError, match=r"quantizes\.0\.scaler.*args\.scale != 1"):
        convert_reference(source, tmp_path / "out")


@pytest.mark.parametrize(
    ("state", "args", "message"),
    [
        ({"encoder.model.base_model.model.blocks.0.mlp.fc1.lora_A.default.weight": torch.zeros(8, 384)},
         SMALL_ARGS, "LoRA-wrapped .peft. weights .*merge_and_unload"),
        ({"decoder.mlp1.fc1.weight": torch.zeros(2, 2)}, SMALL_ARGS, "does not have: decoder.mlp1.fc1.weight"),
        ({"decoder.mask_token": torch.zeros(1, 1, 384)}, None, "no 'args'"),
    ],
)
def test_lora_unknown_keys_and_missing_args_are_refused(tmp_path: Path, state: dict, args: Any, message: str
                                                        ) -> None:  # fmt: skip
    source = _write_file(tmp_path / "r.pt", state, argparse.Namespace(**args) if args else None)
    with pytest.raises(CheckpointError, match=message):
        convert_reference(source, tmp_path / "out")


class _NotAllowed:
    """A class the reader's allow-list does not know: unpickling it would import this module."""

    def __init__(self) -> None:
        self.lr = 1e-4


def test_a_file_needing_a_class_off_the_allow_list_is_refused_by_the_cli(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture) -> None:
    source = tmp_path / "r.pt"
    torch.save({"model": {}, "args": _NotAllowed()}, source)
    assert main(["convert", "reference", str(source), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "refusing to load" in err and "_NotAllowed" in err and "argparse.Namespace" in err


def test_weights_option_is_for_reference_checkpoints_only(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["convert", "llamagen", str(tmp_path / "x.pt"), "--out", str(tmp_path / "o"), "--weights", "ema"])
    assert exc.value.code == 2


def test_the_key_tables_are_inverse() -> None:
    run, _ = reference_run_config(argparse.Namespace(**SMALL_ARGS), "t")
    registry = Registry.from_dict(run)
    shapes, optional = _expected_shapes(registry)
    ours = {k: torch.zeros(s) for k, s in shapes.items() if k not in optional}
    back = _nest_codes(from_reference_keys(to_reference_keys(ours), product_quant=2), registry)
    assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in ours.items()}
