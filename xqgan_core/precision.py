"""Mixed precision as one object: the autocast dtype a device picks for ``train.precision`` and the gradient scaler
that fp16 needs (a no-op for bf16 and fp32)."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor

from .interfaces import Device


class Precision:
    """``with precision.autocast(): ...`` for forwards; ``backward`` / ``unscale_`` / ``step`` / ``update`` route
    through the scaler, which is enabled only for fp16 autocast."""

    def __init__(self, device: Device, precision: str) -> None:
        self.device = device
        self.dtype: torch.dtype | None = device.autocast_dtype(precision)
        self.scaler = torch.amp.GradScaler(device.torch_device.type, enabled=self.dtype == torch.float16)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        return self.device.autocast(self.dtype)

    def backward(self, loss: Tensor) -> None:
        self.scaler.scale(loss).backward()

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        self.scaler.step(optimizer)

    def update(self) -> None:
        self.scaler.update()

    def describe(self) -> str:
        return str(self.dtype or torch.float32)

    def state_dict(self) -> dict[str, Any]:
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scaler.load_state_dict(state)
