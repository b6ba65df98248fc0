"""Differentiable augmentation (DiffAugment, Zhao et al. 2020) of the images a discriminator sees.

The same random, differentiable transformations are applied to real images and to reconstructions in the
discriminator's step, and to reconstructions in the tokenizer's adversarial term, so the discriminator cannot
memorise the training images and its gradient still reaches the reconstruction. As in StyleGAN-T and the paper's
reference code (DINO discriminator), the operations are, on images in [-1, 1]:

* ``translation``: shift by up to ``translation`` of the side (1/8) in each direction, zero-filled;
* ``color``: brightness (+ U(-0.5, 0.5)), saturation (x U(0, 2) around the channel mean), contrast (x U(0.5, 1.5)
  around the image mean);
* ``cutout``: zero a square of ``cutout`` of the side (0.2) at a random centre.

Each operation is applied to each sample independently with probability ``prob``, with its own random parameters
(the reference flips one coin per operation for the whole batch; at its ``prob = 1`` the two agree). Draws come from
``generator`` or, by default, the global RNG of the images' device, which checkpoints save and restore per rank:
a resumed run draws exactly what the uninterrupted one would have. Nothing is read back to the host.

Run files: ``[loss] diffaug = "translation,color,cutout"`` (applied in the order written), ``diffaug_prob = 1.0``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

#: the operations a policy may name
OPERATIONS = ("translation", "color", "cutout")


def parse_policy(policy: str) -> tuple[str, ...]:
    """``"translation, color"`` -> ``("translation", "color")``; ValueError naming unknown or repeated names."""
    names = tuple(name.strip() for name in policy.split(",") if name.strip())
    unknown = [name for name in names if name not in OPERATIONS]
    if unknown:
        raise ValueError(
            f"unknown DiffAug operation(s) {', '.join(map(repr, unknown))}: a comma-separated list of "
            f"{', '.join(OPERATIONS)} (e.g. \"translation,color,cutout\"), or \"\" for none"
        )
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"DiffAug operation(s) {', '.join(map(repr, repeated))} named more than once")
    return names


@dataclass(frozen=True)
class DiffAug:
    """``aug(images, generator=None)``: the operations of ``ops`` in order, each per sample with probability
    ``prob``; differentiable with respect to ``images`` (B, C, H, W)."""

    ops: tuple[str, ...]
    prob: float = 1.0
    translation: float = 0.125
    cutout: float = 0.2

    def __post_init__(self) -> None:
        parse_policy(",".join(self.ops))
        if not 0.0 <= self.prob <= 1.0:
            raise ValueError(f"DiffAug prob must be in [0, 1], got {self.prob}")

    @classmethod
    def from_loss_section(cls, loss: Any) -> DiffAug | None:
        """The augmentation a run's ``[loss]`` table asks for (``diffaug``, ``diffaug_prob``, ...); None when off."""
        ops = parse_policy(loss.diffaug)
        if not ops or loss.diffaug_prob == 0:
            return None
        return cls(ops, loss.diffaug_prob, loss.diffaug_translation, loss.diffaug_cutout)

    def __call__(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        for name in self.ops:
            images = _OPERATIONS[name](self, images, generator)
        return images

    # -- the operations -----------------------------------------------------------------------------------------
    def _coin(self, images: Tensor, generator: torch.Generator | None) -> Tensor:
        """(B,) bool: which samples this operation changes."""
        return _uniform(images.shape[0], images, generator) < self.prob

    def _translate(self, images: Tensor, generator: torch.Generator | None) -> Tensor:
        b, c, h, w = images.shape
        on = self._coin(images, generator)
        dy, dx = round(h * self.translation), round(w * self.translation)
        shift_y = _randint(-dy, dy + 1, b, images, generator) * on
        shift_x = _randint(-dx, dx + 1, b, images, generator) * on
        # out[y, x] = in[y + shift_y, x + shift_x], 0 outside: gather from a 1-pixel zero border (index 0 or h+1)
        padded = F.pad(images, (1, 1, 1, 1))
        rows = (torch.arange(h, device=images.device) + 1 + shift_y[:, None]).clamp(0, h + 1)  # (B, H)
        cols = (torch.arange(w, device=images.device) + 1 + shift_x[:, None]).clamp(0, w + 1)  # (B, W)
        out = padded.gather(2, rows[:, None, :, None].expand(b, c, h, w + 2))
        return out.gather(3, cols[:, None, None, :].expand(b, c, h, w))

    def _color(self, images: Tensor, generator: torch.Generator | None) -> Tensor:
        b = images.shape[0]
        on = self._coin(images, generator)
        brightness = _uniform(b, images, generator) - 0.5
        saturation = _uniform(b, images, generator) * 2.0
        contrast = _uniform(b, images, generator) + 0.5
        x = images + _per_sample(brightness, images)
        mean = x.mean(dim=1, keepdim=True)
        x = (x - mean) * _per_sample(saturation, images) + mean
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * _per_sample(contrast, images) + mean
        return torch.where(on.view(-1, *([1] * (images.ndim - 1))), x, images)  # samples left alone stay exact

    def _cutout(self, images: Tensor, generator: torch.Generator | None) -> Tensor:
        b, _, h, w = images.shape
        on = self._coin(images, generator)
        ch, cw = round(h * self.cutout), round(w * self.cutout)
        # centres as in StyleGAN-T: odd sizes centre on a pixel, even ones may also straddle the far edge
        top = _randint(0, h + 1 - ch % 2, b, images, generator) - ch // 2
        left = _randint(0, w + 1 - cw % 2, b, images, generator) - cw // 2
        ys, xs = torch.arange(h, device=images.device), torch.arange(w, device=images.device)
        in_rows = (ys >= top[:, None]) & (ys < top[:, None] + ch)  # (B, H)
        in_cols = (xs >= left[:, None]) & (xs < left[:, None] + cw)  # (B, W)
        hole = in_rows[:, :, None] & in_cols[:, None, :] & on[:, None, None]
        return images * (~hole).to(images.dtype)[:, None]


_OPERATIONS: dict[str, Callable[[DiffAug, Tensor, torch.Generator | None], Tensor]] = {
    "translation": DiffAug._translate,
    "color": DiffAug._color,
    "cutout": DiffAug._cutout,
}
assert tuple(_OPERATIONS) == OPERATIONS


def _uniform(n: int, like: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.rand(n, device=like.device, generator=generator)


def _randint(low: int, high: int, n: int, like: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randint(low, high, (n,), device=like.device, generator=generator)


def _per_sample(values: Tensor, like: Tensor) -> Tensor:
    return values.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))
