"""The reference's own DINO discriminator (``DinoDisc``) on recipe weights gives the logits of ``dino`` built from the
same weights: the trunk through the real loader (a local file), the heads as a state dict (their key layout is the
reference's). Bundle ``tests/parity/reference-dino-disc``, made by ``scripts/make_parity_bundle.py``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from xqgan_core import build
from xqgan_core.testing.recipe_weights import recipe_state_dict

BUNDLE = Path(__file__).resolve().parents[3] / "tests" / "parity" / "reference-dino-disc"


@pytest.fixture(scope="module")
def bundle() -> tuple[dict, dict[str, torch.Tensor]]:
    manifest = json.loads((BUNDLE / "manifest.json").read_text(encoding="utf-8"))
    return manifest, load_file(str(BUNDLE / "expected.safetensors"))


@pytest.fixture(scope="module")
def ours(bundle, tmp_path_factory) -> nn.Module:
    manifest, _ = bundle
    weights = recipe_state_dict(manifest["keys"], manifest["seed"])
    trunk_file = tmp_path_factory.mktemp("dino") / "dino-recipe.safetensors"
    save_file({k.removeprefix("trunk."): v for k, v in weights.items() if k.startswith("trunk.")}, str(trunk_file))
    torch.manual_seed(0)
    d = build("discriminator", {"use": "dino", "init": str(trunk_file)}).eval()  # DINO ViT-S/16's defaults
    d.load_state_dict({k: v for k, v in weights.items() if k.startswith("heads.")})
    return d


def test_heads_have_the_references_parameter_count(bundle, ours):
    manifest, _ = bundle
    assert sum(p.numel() for p in ours.parameters()) == manifest["model"]["head_parameters"]  # 7.39 M


def test_gives_the_reference_logits_with_its_tanh_gelu(bundle, ours):
    manifest, expected = bundle
    x = expected["images"].float() / 127.5 - 1
    exact_gelu = [block.mlp.act for block in ours.trunk.blocks]
    try:
        for block in ours.trunk.blocks:  # the reference's re-implementation approximates GELU (see the manifest)
            block.mlp.act = nn.GELU(approximate="tanh")
        with torch.no_grad():
            logits = ours(x)
    finally:
        for block, act in zip(ours.trunk.blocks, exact_gelu):
            block.mlp.act = act
    tol = manifest["tolerances"]["logits_max_abs"]
    torch.testing.assert_close(logits, expected["logits"], atol=tol, rtol=0)
    assert expected["logits"].shape == (2, 5 * 196) and expected["logits"].std() > 0.1
    with torch.no_grad():  # DINO's own exact GELU: the same discriminator up to that approximation
        close = (ours(x) - expected["logits"]).abs().max() / expected["logits"].abs().mean()
    assert close < 0.05
