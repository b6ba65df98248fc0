"""Parity with LlamaGen's own VQ-16 code: same random weights, converted into our format, same codes and images.

The bundle ``tests/parity/llamagen-vq16/`` was made by running LlamaGen's ``tokenizer/tokenizer_image/vq_model.py``
(``VQ_models["VQ-16"]()``, the architecture of the released ``vq_ds16_c2i.pt``) on recipe weights
(``scripts/make_parity_bundle.py llamagen-vq16``; its ``manifest.json`` says from which commit). Here the same
weights are regenerated from the manifest, written as a LlamaGen checkpoint file, converted by ``xqgan-run convert
llamagen`` into a run folder and loaded as our Tokenizer: its encoder must pick exactly LlamaGen's codes and its
decoder must make LlamaGen's images within the manifest's tolerances.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from test_convert import llamagen_shapes

from xqgan_core.cli import main
from xqgan_core.convert import DEFAULT_PRESET
from xqgan_core.testing.recipe_weights import recipe_state_dict
from xqgan_core.tokenizer import Tokenizer

BUNDLE = Path(__file__).parent / "parity" / "llamagen-vq16"
CLI_RESOLUTION = 32  # the converted run's data.resolution: what `xqgan-run reconstruct` resizes images to


@pytest.fixture(scope="module")
def manifest() -> dict[str, Any]:
    return json.loads((BUNDLE / "manifest.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def expected() -> dict[str, torch.Tensor]:
    return load_file(str(BUNDLE / "expected.safetensors"))


@pytest.fixture(scope="module")
def llamagen_file(tmp_path_factory: pytest.TempPathFactory, manifest: dict[str, Any]) -> Path:
    """The bundle's recipe weights as a LlamaGen checkpoint file (``{"model": state_dict}``, as ``vq_ds16_c2i.pt``)."""
    dtypes = {k: getattr(torch, v) for k, v in manifest["dtypes"].items()}
    state = recipe_state_dict(manifest["keys"], manifest["seed"], dtypes)
    path = tmp_path_factory.mktemp("llamagen") / "vq_ds16_recipe.pt"
    torch.save({"model": state}, path)
    return path


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory, llamagen_file: Path) -> Path:
    """``xqgan-run convert llamagen FILE --out DIR`` with the VQ-16 preset; only ``data.resolution`` is lowered (the
    size `reconstruct` resizes to; the CNN itself is size-agnostic) to keep the CLI check small."""
    tmp = tmp_path_factory.mktemp("converted")
    text = DEFAULT_PRESET.read_text(encoding="utf-8")
    assert text.count("\nresolution = 256\n") == 1, "the preset's [data] resolution moved; update this fixture"
    preset = tmp / DEFAULT_PRESET.name
    preset.write_text(text.replace("\nresolution = 256\n", f"\nresolution = {CLI_RESOLUTION}\n"), encoding="utf-8")
    out = tmp / "run"
    assert main(["convert", "llamagen", str(llamagen_file), "--out", str(out), "--preset", str(preset)]) == 0
    return out


def test_the_bundle_exercises_many_codes(manifest: dict[str, Any], expected: dict[str, torch.Tensor]) -> None:
    # a bundle whose tokens all pick the same code (or one made at another codebook size) would prove nothing
    assert manifest["model"]["args"]["codebook_size"] == 16384 and manifest["model"]["args"]["codebook_l2_norm"]
    indices = expected["indices"]
    assert indices.dtype == torch.int64 and indices.numel() == manifest["notes"]["tokens"]
    assert indices.unique().numel() >= 0.9 * indices.numel()
    assert expected["images"].dtype == torch.uint8 and expected["images"].float().std() > 20


def test_llamagens_own_state_dict_has_the_layout_our_tests_assume(manifest: dict[str, Any]) -> None:
    # the bundle's keys come from LlamaGen's code itself; test_convert's table was written out by hand from it
    shapes = {k: tuple(v) for k, v in manifest["keys"].items()}
    assert shapes == llamagen_shapes(128, [1, 1, 2, 2, 4], 2, 3, 256, 8, 16384)


def test_our_converted_vq16_gives_llamagens_codes_and_images(
    converted: Path, manifest: dict[str, Any], expected: dict[str, torch.Tensor]
) -> None:
    tok = Tokenizer.from_checkpoint(converted, device="cpu")
    x = expected["images"].float() / 127.5 - 1
    n, _, h, w = expected["latents"].shape
    tol = manifest["tolerances"]
    latents_tol = {"atol": tol["latents_max_abs"], "rtol": 0.0}
    images_tol = {"atol": tol["images_max_abs"], "rtol": 0.0}

    with _outputs_of(tok.model.encoder) as latents:
        indices = tok.encode(x)
    torch.testing.assert_close(latents[0], expected["latents"], **latents_tol)
    assert indices.shape == (n, h, w)
    mismatches = int((indices.reshape(-1) != expected["indices"]).sum())  # LlamaGen's flat (n, y, x) order
    assert mismatches == 0, f"{mismatches} of {indices.numel()} codes differ from LlamaGen's"

    # decoding starts from LlamaGen's codes, so a decoder difference cannot hide behind an encoder one
    with _outputs_of(tok.model.decoder) as raw:
        images = tok.decode(expected["indices"].reshape(n, h, w))
    torch.testing.assert_close(raw[0], expected["decoded"], **images_tol)  # LlamaGen's decoder does not clamp
    torch.testing.assert_close(images, expected["decoded"].clamp(-1, 1), **images_tol)


@contextmanager
def _outputs_of(module: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect what ``module`` returns while the block runs (the public calls run it once each)."""
    outputs: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _m, _args, out: outputs.append(out.detach()))
    try:
        yield outputs
    finally:
        handle.remove()


def test_cli_reconstructs_images_with_the_converted_vq16(
    converted: Path, expected: dict[str, torch.Tensor], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    photo = tmp_path / "astronaut.png"
    Image.fromarray(expected["images"][0].permute(1, 2, 0).numpy()).save(photo)
    capsys.readouterr()
    assert main(["reconstruct", str(converted), str(photo), "--out", str(tmp_path / "recon")]) == 0
    written = capsys.readouterr().out.split()
    assert written == [str(tmp_path / "recon" / "astronaut.png"), str(tmp_path / "recon" / "astronaut_recon.png")]

    recon = np.asarray(Image.open(tmp_path / "recon" / "astronaut_recon.png").convert("RGB")).astype(np.int16)
    assert recon.shape == (CLI_RESOLUTION, CLI_RESOLUTION, 3)
    assert Image.open(written[0]).size == (2 * CLI_RESOLUTION, CLI_RESOLUTION)  # original | reconstruction
    tok = Tokenizer.from_checkpoint(converted, device="cpu")  # the same weights the parity test checked
    ours = tok.reconstruct(tok.preprocess(photo).unsqueeze(0))[0]
    ours_u8 = ((ours + 1) * 127.5).round().permute(1, 2, 0).numpy()
    assert np.abs(recon - ours_u8).max() <= 1
    assert recon.std() > 1  # not a blank image
