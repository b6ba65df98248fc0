"""Learning-rate schedules (linear warm-up, cosine or linear decay), an EMA of model weights and gradient clipping."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def _decay_progress(step: int, warmup: int, total: int, hold: float) -> float | None:
    """Where ``step`` is in the decay after the warm-up, 0 -> 1; None while warming up or holding the peak (the
    first ``hold`` fraction of the post-warm-up steps)."""
    if warmup > 0 and step < warmup:
        return None
    passed = min(1.0, (step - warmup) / max(1, total - warmup))
    if passed < hold:
        return None
    return (passed - hold) / (1.0 - hold)


def warmup_cosine(warmup: int, total: int, min_ratio: float, hold: float = 0.0):  # noqa: ANN201 - a LambdaLR factor
    """LR factor for step s: linear 0->1 over ``warmup`` steps, 1 for the next ``hold`` fraction of the rest, then
    cosine 1->``min_ratio`` until ``total``."""

    def factor(step: int) -> float:
        progress = _decay_progress(step, warmup, total, hold)
        if progress is None:
            return (step + 1) / warmup if step < warmup else 1.0
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def warmup_linear(warmup: int, total: int, min_ratio: float, hold: float = 0.0):  # noqa: ANN201 - a LambdaLR factor
    """LR factor for step s: linear 0->1 over ``warmup`` steps, 1 for the next ``hold`` fraction of the rest, then
    linear 1->``min_ratio`` until ``total`` (VAR's ``lin0`` is ``hold = 0.05``, its ``lin`` 0.15)."""

    def factor(step: int) -> float:
        progress = _decay_progress(step, warmup, total, hold)
        if progress is None:
            return (step + 1) / warmup if step < warmup else 1.0
        return 1.0 - (1.0 - min_ratio) * progress

    return factor


def warmup_schedule(kind: str, warmup: int, total: int, min_ratio: float, hold: float = 0.0):  # noqa: ANN201
    """The LR factor of ``train.lr_schedule``: ``"cosine"`` (``warmup_cosine``) or ``"linear"`` (``warmup_linear``),
    with ``train.lr_hold``."""
    schedules = {"cosine": warmup_cosine, "linear": warmup_linear}
    if kind not in schedules:
        raise ValueError(f"train.lr_schedule: unknown schedule {kind!r}; choose one of {sorted(schedules)}")
    return schedules[kind](warmup, total, min_ratio, hold)


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
