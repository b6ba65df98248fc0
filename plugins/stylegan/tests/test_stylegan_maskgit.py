"""``variant = "maskgit"``: the contract kit, the reference's layout and parameter count, and the reference's own logits
on recipe weights (bundle ``tests/parity/reference-stylegan-maskgit``, made by ``scripts/make_parity_bundle.py``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from xqgan_core import build
from xqgan_core.testing import DiscriminatorContract
from xqgan_core.testing.recipe_weights import recipe_state_dict
from xqgan_plugin_stylegan.maskgit import MaskGITDownBlock, ReflectBlur, from_reference_state_dict

BUNDLE = Path(__file__).resolve().parents[3] / "tests" / "parity" / "reference-stylegan-maskgit"

#: parameters of the reference's ``discriminator_stylegan.Discriminator(image_size=256)``, counted by instantiating
#: it (also recorded in the bundle's manifest as ``parameters_at_256``)
REFERENCE_PARAMETERS_256 = 36_500_225
STYLEGAN2_PARAMETERS_256 = 24_001_089


class TestStyleGANMaskGIT(DiscriminatorContract):
    name = "stylegan"
    options = {"variant": "maskgit", "input_size": 32, "channels": 8, "max_channels": 16}


class TestStyleGANMaskGITEqualized(DiscriminatorContract):
    name = "stylegan"
    image_size = 16
    options = {"variant": "maskgit", "input_size": 16, "channels": 8, "max_channels": 16, "mbstd_group": 2,
               "equalized_lr": True}


def count_parameters(**options) -> int:
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        d = build("discriminator", {"use": "stylegan", **options})
    return sum(p.numel() for p in d.parameters())


def test_parameter_counts_at_256_px_match_the_reference_and_stylegan2():
    assert count_parameters(variant="maskgit") == REFERENCE_PARAMETERS_256  # 36.5 M
    assert count_parameters() == STYLEGAN2_PARAMETERS_256  # 24.0 M


def test_maskgit_layout_plain_layers_and_no_minibatch_std():
    torch.manual_seed(0)
    d = build("discriminator", {"use": "stylegan", "variant": "maskgit", "input_size": 32, "channels": 8,
                                "max_channels": 16})
    assert isinstance(d.from_rgb, torch.nn.Conv2d) and d.from_rgb.kernel_size == (3, 3)
    assert all(isinstance(b, MaskGITDownBlock) for b in d.blocks) and len(d.blocks) == 3  # 32 -> 4
    assert d.blocks[0].skip.kernel_size == (1, 1) and d.blocks[0].skip.stride == (2, 2)
    assert d.mbstd_group == 0 and d.final_conv.in_channels == 16
    assert d(torch.zeros(3, 3, 32, 32)).shape == (3, 1)


def test_reflect_blur_keeps_constants_at_the_border_and_averages_1_2_1():
    assert torch.equal(ReflectBlur()(torch.full((1, 2, 5, 5), 0.5)), torch.full((1, 2, 5, 5), 0.5))
    impulse = torch.zeros(1, 1, 5, 5)
    impulse[0, 0, 2, 2] = 16.0
    expected = torch.tensor([[1.0, 2, 1], [2, 4, 2], [1, 2, 1]])
    assert torch.equal(ReflectBlur()(impulse)[0, 0, 1:4, 1:4], expected)


def test_unknown_reference_keys_are_named():
    with pytest.raises(KeyError, match="blocks.2.attention.weight"):
        from_reference_state_dict({"blocks.2.attention.weight": torch.zeros(1)})


def test_gives_the_reference_discriminators_logits_on_recipe_weights():
    manifest = json.loads((BUNDLE / "manifest.json").read_text(encoding="utf-8"))
    expected = load_file(str(BUNDLE / "expected.safetensors"))
    assert manifest["model"]["parameters_at_256"] == REFERENCE_PARAMETERS_256
    size = manifest["model"]["args"]["image_size"]
    reference = recipe_state_dict(manifest["keys"], manifest["seed"])
    constants = manifest["constants"]  # its [1,2,1] blur taps, as the constructor sets them
    reference.update({k: torch.tensor(v, dtype=getattr(torch, constants["dtypes"][k]))
                      for k, v in constants["values"].items()})
    # the reference's widths at 16 px: 512 channels throughout
    d = build("discriminator", {"use": "stylegan", "variant": "maskgit", "input_size": size, "channels": 512}).eval()
    d.load_state_dict(from_reference_state_dict(reference))
    assert sum(p.numel() for p in d.parameters()) == manifest["model"]["parameters"]
    with torch.no_grad():
        logits = d(expected["images"].float() / 127.5 - 1)
    tol = manifest["tolerances"]["logits_max_abs"]
    torch.testing.assert_close(logits, expected["logits"], atol=tol, rtol=0)
    assert expected["logits"].std() > 0  # the photos get different logits: the check can fail
