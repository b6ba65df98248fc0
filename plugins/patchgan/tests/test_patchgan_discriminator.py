"""PatchGAN discriminator: contract, layout, logit map size, receptive field and initialization."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from xqgan_core import build
from xqgan_core.testing import DiscriminatorContract
from xqgan_plugin_patchgan.discriminator import PatchGANDiscriminator

TINY = {"ndf": 8, "n_layers": 2}


class TestPatchGANContract(DiscriminatorContract):
    name = "patchgan"
    options = TINY
    image_size = 32


def _make(**options: Any) -> PatchGANDiscriminator:
    torch.manual_seed(0)
    d = build("discriminator", {"use": "patchgan", **options})
    assert isinstance(d, PatchGANDiscriminator)
    return d


def _convs(d: nn.Module) -> list[nn.Conv2d]:
    return [m for m in d.modules() if isinstance(m, nn.Conv2d)]


NORM_TYPES = {
    "batch": nn.BatchNorm2d,
    "group": nn.GroupNorm,
    "instance": nn.InstanceNorm2d,
}


@pytest.mark.parametrize("norm", ["batch", "group", "instance", "none"])
def test_each_norm_builds_runs_and_trains(norm: str) -> None:
    d = _make(**TINY, norm=norm).train()
    norms = [m for m in d.modules() if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.InstanceNorm2d))]
    if norm == "none":
        assert norms == []
    else:
        # one norm after each inner conv: n_layers of them, all of the chosen kind
        assert len(norms) == TINY["n_layers"] and all(type(m) is NORM_TYPES[norm] for m in norms)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    logits = d(x)
    # 32 -> 16 -> 8 (stride 2, twice) -> 7 -> 6 (two stride-1 4x4 convs)
    assert logits.shape == (2, 1, 6, 6)
    logits.mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in d.parameters())


@pytest.mark.parametrize(("norm", "inner_bias"), [("batch", False), ("instance", False), ("group", True),
                                                  ("none", True)])
def test_conv_bias_only_where_the_norm_does_not_cancel_it(norm: str, inner_bias: bool) -> None:
    convs = _convs(_make(**TINY, norm=norm))
    first, inner, last = convs[0], convs[1:-1], convs[-1]
    assert first.bias is not None and last.bias is not None  # no norm follows these two
    assert all((c.bias is not None) == inner_bias for c in inner)


def test_default_layout_and_logit_map_for_256px() -> None:
    d = _make().eval()
    convs = _convs(d)
    assert [(c.in_channels, c.out_channels, c.stride[0]) for c in convs] == [
        (3, 64, 2), (64, 128, 2), (128, 256, 2), (256, 512, 1), (512, 1, 1),
    ]
    assert all(c.kernel_size == (4, 4) for c in convs)
    with torch.no_grad():
        logits = d(torch.zeros(1, 3, 256, 256))
    assert logits.shape == (1, 1, 30, 30)


def test_channels_cap_at_eight_ndf() -> None:
    convs = _convs(_make(ndf=4, n_layers=5, norm="none"))
    assert [c.out_channels for c in convs] == [4, 8, 16, 32, 32, 32, 1]


def test_in_channels_option() -> None:
    d = _make(**TINY, in_channels=1)
    assert d(torch.zeros(2, 1, 32, 32)).shape == (2, 1, 6, 6)


def test_receptive_field_is_70px_with_three_layers() -> None:
    # The gradient of one central logit is non-zero exactly on the pixels that logit can see.
    d = _make(ndf=4, n_layers=3, norm="none")  # width does not change the receptive field
    x = torch.randn(1, 3, 128, 128, requires_grad=True)
    logits = d(x)
    h = logits.shape[-1] // 2
    logits[0, 0, h, h].backward()
    seen = x.grad[0].abs().sum(0) > 0
    rows = seen.any(1).nonzero().flatten()
    cols = seen.any(0).nonzero().flatten()
    assert rows.max() - rows.min() + 1 == 70 and cols.max() - cols.min() + 1 == 70


def test_init_statistics() -> None:
    d = _make()  # defaults: ndf 64, n_layers 3, batch norm
    conv_w = torch.cat([c.weight.flatten() for c in _convs(d)])
    assert abs(conv_w.mean().item()) < 1e-3
    assert conv_w.std().item() == pytest.approx(0.02, rel=0.02)
    biases = [c.bias for c in _convs(d) if c.bias is not None]
    assert len(biases) == 2 and all(torch.count_nonzero(b) == 0 for b in biases)

    norms = [m for m in d.modules() if isinstance(m, nn.BatchNorm2d)]
    scale = torch.cat([m.weight.flatten() for m in norms])
    assert scale.numel() == 128 + 256 + 512
    assert scale.mean().item() == pytest.approx(1.0, abs=3e-3)
    assert scale.std().item() == pytest.approx(0.02, rel=0.15)
    assert all(torch.count_nonzero(m.bias) == 0 for m in norms)


@pytest.mark.parametrize("norm", ["group", "instance"])
def test_init_applies_to_other_norms(norm: str) -> None:
    d = _make(ndf=64, n_layers=3, norm=norm)
    norms = [m for m in d.modules() if isinstance(m, NORM_TYPES[norm])]
    scale = torch.cat([m.weight.flatten() for m in norms])
    assert scale.mean().item() == pytest.approx(1.0, abs=3e-3)
    assert scale.std().item() == pytest.approx(0.02, rel=0.15)
