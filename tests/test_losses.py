"""GAN losses, adaptive weight, LeCam and R1 against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from xqgan_core.losses import LeCam, adaptive_weight, adversarial_loss, discriminator_loss, r1_penalty

REAL, FAKE = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.5])


def test_hinge_losses():
    # D: 0.5 * (mean relu(1 - real) + mean relu(1 + fake)) = 0.5 * ((0 + 0.5)/2 + (0 + 1.5)/2)
    assert discriminator_loss("hinge", REAL, FAKE).item() == pytest.approx(0.5)
    assert adversarial_loss("hinge", FAKE).item() == pytest.approx(0.75)


def test_cross_entropy_losses_and_their_adversarial_forms():
    sp = lambda v: math.log1p(math.exp(v))  # noqa: E731 - softplus
    d = 0.5 * ((sp(-2.0) + sp(-0.5)) / 2 + (sp(-2.0) + sp(0.5)) / 2)
    for kind in ("vanilla", "non_saturating"):
        assert discriminator_loss(kind, REAL, FAKE).item() == pytest.approx(d, rel=1e-6)
    assert adversarial_loss("vanilla", FAKE).item() == pytest.approx(-(sp(-2.0) + sp(0.5)) / 2, rel=1e-6)
    assert adversarial_loss("non_saturating", FAKE).item() == pytest.approx((sp(2.0) + sp(-0.5)) / 2, rel=1e-6)
    with pytest.raises(ValueError, match="unknown GAN loss 'wasserstein'"):
        discriminator_loss("wasserstein", REAL, FAKE)


def test_adaptive_weight_is_the_ratio_of_gradient_norms_at_the_last_layer():
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    rec = (3.0 * w).sum()  # gradient (3, 3): norm 3 sqrt 2
    adv = (w * torch.tensor([1.0, 0.0])).sum()  # gradient (1, 0): norm 1
    got = adaptive_weight(rec, adv, w, max_weight=1e4)
    assert got.item() == pytest.approx(3 * math.sqrt(2) / (1 + 1e-4), rel=1e-6) and not got.requires_grad
    assert adaptive_weight(rec, adv, w, max_weight=2.0).item() == 2.0


def test_lecam_pulls_outputs_towards_the_other_classs_anchor():
    reg = LeCam(decay=0.5)
    first = reg(torch.tensor([1.0]), torch.tensor([-1.0]))  # anchors start at the first means
    # ||relu(real - ema_fake)||^2 + ||relu(ema_real - fake)||^2 = (1 - (-1))^2 + (1 - (-1))^2
    assert first.item() == pytest.approx(8.0)
    reg(torch.tensor([3.0]), torch.tensor([-1.0]))
    assert reg.ema_real.item() == pytest.approx(2.0)  # lerp by 1 - decay


def test_r1_of_a_linear_discriminator_is_its_squared_weight_norm_and_trains_it():
    d = nn.Linear(6, 1, bias=False)
    with torch.no_grad():
        d.weight.copy_(torch.tensor([[1.0, -2.0, 0.0, 0.5, 0.0, 1.0]]))
    x = torch.randn(4, 6)
    penalty = r1_penalty(lambda images: d(images), x)
    assert penalty.item() == pytest.approx(1 + 4 + 0.25 + 1)
    penalty.backward()  # d/dw ||w||^2 = 2w: the penalty reaches D's weights
    torch.testing.assert_close(d.weight.grad, 2 * d.weight.detach())
