"""Learning-rate schedules (linear warm-up, cosine or linear decay), an EMA of model weights and gradient clipping."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def warmup_cosine(warmup: int, total: int, min_ratio: float):  # noqa: ANN201 - a LambdaLR factor
    """LR factor for step s: linear 0->1 over ``warmup`` steps, then cosine 1->``min_ratio`` until ``total``."""

    def factor(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def warmup_linear(warmup: int, total: int, min_ratio: float):  # noqa: ANN201 - a LambdaLR factor
    """LR factor for step s: linear 0->1 over ``warmup`` steps, then linear 1->``min_ratio`` until ``total``."""

    def factor(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 1.0 - (1.0 - min_ratio) * progress

    return factor


def warmup_schedule(kind: str, warmup: int, total: int, min_ratio: float):  # noqa: ANN201 - a LambdaLR factor
    """The LR factor of ``train.lr_schedule``: ``"cosine"`` (``warmup_cosine``) or ``"linear"`` (``warmup_linear``)."""
    schedules = {"cosine": warmup_cosine, "linear": warmup_linear}
    if kind not in schedules:
        raise ValueError(f"train.lr_schedule: unknown schedule {kind!r}; choose one of {sorted(schedules)}")
    return schedules[kind](warmup, total, min_ratio)


class EMA:
    """Exponential moving average of a module's floating-point parameters and buffers (kept in fp32)."""

    def __init__(self, module: nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        for k, v in module.state_dict().items():
            s = self.shadow[k]
            if v.dtype.is_floating_point:
                s.lerp_(v.detach().float(), 1 - self.decay)
            else:
                s.copy_(v)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        for k, v in sd.items():
            self.shadow[k].copy_(v)

    def copy_to(self, module: nn.Module) -> None:
        own = module.state_dict()
        module.load_state_dict({k: v.to(own[k].dtype) for k, v in self.shadow.items()})


def clip_gradients(params: Any, max_norm: float) -> torch.Tensor:
    """Clip to ``max_norm`` (when > 0) and return the total gradient norm before clipping, as a 0-d tensor (no host
    sync: the caller reads it back with the step's other values)."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return torch.zeros(())
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm).float()
    return torch.linalg.vector_norm(torch.stack([p.grad.detach().float().norm() for p in params]))
