"""Frozen parts of a component: a pretrained network it uses but never trains or saves (a discriminator's feature
trunk, an aligner's teacher).

A frozen part is held *outside* ``nn.Module`` registration, so everything that walks a module's parameters, buffers
or children leaves it out without knowing about it: optimizers built from ``parameters()``, ``state_dict()`` (hence
the run's ``<name>.safetensors`` files and ``train.init_from``), ``requires_grad_`` toggles, gradient averaging and
clipping, DDP's gradient buckets, parameter counts, adapters. Moves (``.to(device)``, ``.to(memory_format=...)``,
``.float()``) still reach it: ``FrozenParts._apply`` forwards them. Its weights come from the plugin's own options
(a file or a hub name) every time the component is built, never from a checkpoint.

Gradients still flow *through* a frozen part to its input (a discriminator must pass the adversarial gradient back
to the fake image); its own parameters have ``requires_grad = False`` and never receive one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import nn

M = TypeVar("M", bound=nn.Module)

#: seed of random frozen weights (``init = ""``, tests and tiny presets): the same on every rank and in every build
RANDOM_FROZEN_SEED = 0


class FrozenParts(nn.Module):
    """Base (mixin) for modules that hold frozen parts. ``self.hold_frozen("trunk", module)`` makes ``self.trunk``
    a frozen part: usable as an attribute, in eval mode with ``requires_grad = False``, moved with its owner, and
    absent from ``parameters()``, ``state_dict()`` and ``children()``."""

    def hold_frozen(self, name: str, module: M) -> M:
        if name in self._parameters or name in self._buffers or name in self._modules:
            raise ValueError(f"{type(self).__name__}.{name} is already a registered parameter, buffer or submodule")
        module.requires_grad_(False).eval()
        names: list[str] = self.__dict__.setdefault("_frozen_part_names", [])
        if name not in names:
            names.append(name)
        object.__setattr__(self, name, module)  # bypasses nn.Module.__setattr__, which would register it
        return module

    def frozen_parts(self) -> dict[str, nn.Module]:
        """This module's own frozen parts by name (not those of its submodules; see ``all_frozen_parts``)."""
        return {name: self.__dict__[name] for name in self.__dict__.get("_frozen_part_names", [])}

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Any:
        super()._apply(fn, recurse)
        for part in self.frozen_parts().values():
            part._apply(fn, recurse)
        return self

    def train(self, mode: bool = True) -> Any:
        super().train(mode)
        for part in self.frozen_parts().values():  # never leaves eval mode (dropout, batch-norm statistics)
            part.eval()
        return self


def all_frozen_parts(module: nn.Module) -> dict[str, nn.Module]:
    """Every frozen part held by ``module`` or its submodules, by dotted name (``discs.0.trunk``)."""
    found: dict[str, nn.Module] = {}
    for prefix, sub in module.named_modules():
        if isinstance(sub, FrozenParts):
            for name, part in sub.frozen_parts().items():
                found[f"{prefix}.{name}" if prefix else name] = part
    return found


def seeded(build: Callable[[], M], seed: int = RANDOM_FROZEN_SEED) -> M:
    """``build()`` with the global RNG seeded by ``seed`` and restored afterwards: random frozen weights that are the
    same on every rank and in every rebuild (a resumed run, a contract round trip), since they are never saved."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()
