"""GAN losses (the discriminator's and the adversarial term the tokenizer minimises), the adaptive adversarial
weight, and the discriminator regularisers (LeCam, R1)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .distributed import mean_over_ranks


def discriminator_loss(kind: str, real: Tensor, fake: Tensor) -> Tensor:
    """Loss the discriminator minimises. ``real``/``fake`` are logits."""
    if kind == "hinge":
        return 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())
    if kind in ("vanilla", "non_saturating"):
        # binary cross-entropy: real -> 1, fake -> 0 (softplus(-x) = -log sigmoid(x))
        return 0.5 * (F.softplus(-real).mean() + F.softplus(fake).mean())
    raise ValueError(f"unknown GAN loss {kind!r}")


def adversarial_loss(kind: str, fake: Tensor) -> Tensor:
    """Adversarial loss the tokenizer (its decoder, fooling the discriminator) minimises; ``fake`` are logits."""
    if kind == "hinge":
        return -fake.mean()
    if kind == "vanilla":
        # the original minimax objective: minimise log(1 - D(fake)) = -softplus(fake)
        return -F.softplus(fake).mean()
    if kind == "non_saturating":
        # minimise -log D(fake) = softplus(-fake): strong gradients early, when D rejects fakes easily
        return F.softplus(-fake).mean()
    raise ValueError(f"unknown GAN loss {kind!r}")


def adaptive_weight(rec_loss: Tensor, adv_loss: Tensor, last_layer: Tensor, max_weight: float) -> Tensor:
    """||d rec / d W|| / ||d adv / d W|| at the decoder's last layer, clamped to [0, max_weight], no gradient."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    adv_grad = torch.autograd.grad(adv_loss, last_layer, retain_graph=True)[0]
    weight = rec_grad.norm() / (adv_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


def r1_penalty(discriminator: Callable[[Tensor], Tensor], real: Tensor) -> Tensor:
    """R1 (Mescheder et al. 2018): ``mean_b ||d D(x_b) / d x_b||^2`` on real images; pulls D towards zero gradient
    on the data, which keeps GAN training near equilibrium. Differentiable (create_graph) so it trains D; fp32."""
    x = real.detach().float().requires_grad_(True)
    logits = discriminator(x).float()
    (grad,) = torch.autograd.grad(logits.sum(), x, create_graph=True)
    return grad.pow(2).flatten(1).sum(dim=1).mean()


class LeCam(nn.Module):
    """LeCam regularisation (Tseng et al. 2021): keeps D's outputs near EMA anchors of the opposite class."""

    def __init__(self, decay: float) -> None:
        super().__init__()
        self.decay = decay
        self.register_buffer("ema_real", torch.zeros(()))
        self.register_buffer("ema_fake", torch.zeros(()))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    def forward(self, real: Tensor, fake: Tensor) -> Tensor:
        with torch.no_grad():
            # the anchors follow the global batch: the same on every rank of a distributed run
            r, f = mean_over_ranks(torch.stack([real.float().mean(), fake.float().mean()]))
            # the first call sets the anchors, later ones move them; chosen on the device (no host sync)
            self.ema_real.copy_(torch.where(self.initialised, self.ema_real.lerp(r, 1 - self.decay), r))
            self.ema_fake.copy_(torch.where(self.initialised, self.ema_fake.lerp(f, 1 - self.decay), f))
            self.initialised.fill_(True)
        return F.relu(real - self.ema_fake).pow(2).mean() + F.relu(self.ema_real - fake).pow(2).mean()
