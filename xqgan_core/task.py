"""What the Trainer trains: the ``Task`` interface, and the ``Runtime`` a task is built for.

The Trainer (``trainer.py``) owns the loop: data order, micro-batches, the step's single host sync, the agreed skip
of non-finite steps, stop signals, the log / checkpoint / evaluation cadence and the run summary. A Task owns
everything about *what* is trained: its modules, optimizers, losses and evaluation. ``TokenizerTask``
(``tokenizer_task.py``) is the tokenizer recipe; ``docs/training-loop.md`` shows a minimal Task.

A step goes: ``training_step(micro, step)`` computes gradients and returns 0-d tensors; the Trainer reads them all
back at once (agreeing across ranks on which are finite) and calls ``apply_step(values, step)``, which steps the
optimizers, or returns None to skip the step.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from .distributed import DistEnv
from .interfaces import Device
from .precision import Precision

Batch = dict[str, Any]


@runtime_checkable
class TensorState(Protocol):
    """Something checkpointed as one safetensors file that is not an ``nn.Module`` (e.g. an EMA of weights)."""

    def state_dict(self) -> Mapping[str, Tensor]: ...

    def load_state_dict(self, state: Mapping[str, Tensor]) -> Any: ...


@dataclass(frozen=True)
class Runtime:
    """Where and how a task runs: the device, mixed precision, this process's rank, the run folder and seed."""

    device: Device
    precision: Precision
    dist: DistEnv
    out_dir: Path
    seed: int

    @property
    def torch_device(self) -> torch.device:
        return self.device.torch_device


class Task(abc.ABC):
    """One kind of training. Subclasses build their modules and optimizers in ``__init__`` (on ``runtime``'s
    device, before the run folder is touched: bad input fails there) and implement the abstract methods."""

    #: metric keys shown on the progress bar (the first one must always be present)
    progress_keys: tuple[str, ...] = ("loss",)

    @abc.abstractmethod
    def train_set(self) -> torch.utils.data.Dataset:
        """The training dataset. Items are looked up by ``(index, seed)`` keys; random augmentation must come from
        a generator seeded with ``seed`` so that resumed runs see the same items."""

    @abc.abstractmethod
    def modules(self) -> dict[str, nn.Module | TensorState]:
        """Every part that holds weights, by name; each is checkpointed as ``<name>.safetensors``."""

    @abc.abstractmethod
    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """Optimizers by name (checkpointed with the names of the parameters they train)."""

    def schedulers(self) -> dict[str, Any]:
        """Learning-rate schedulers by name (anything with ``state_dict`` / ``load_state_dict``)."""
        return {}

    @abc.abstractmethod
    def training_step(self, micro: list[Batch], step: int) -> dict[str, Tensor]:
        """Forward and backward over the micro-batches of one optimizer step (``step`` counts from 0); returns 0-d
        tensors (losses, gradient norms, statistics), read back by the Trainer in one host sync. Must run the same
        collectives on every rank whatever the values are."""

    @abc.abstractmethod
    def apply_step(self, values: dict[str, float], step: int) -> dict[str, float] | None:
        """Step the optimizers given the read-back ``values`` (a value that is not finite on one rank is NaN on
        every rank); return extra scalars to log (e.g. the learning rate), or None to skip the whole step."""

    def evaluate(self, step: int, log: Any) -> dict[str, float]:
        """Held-out metrics at ``step`` (main process only); ``log`` is the run's ``RunLog`` for images."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Extra plain state for the checkpoint (tensors, numbers, strings, lists, dicts only)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""

    def checkpoint_meta(self) -> dict[str, Any]:
        """Plain JSON facts written into every checkpoint's ``meta.json``: what a loader needs without reading the
        optimizer state (a generator run records its token layout, classes and tokenizer)."""
        return {}

    def header_lines(self) -> list[str]:
        """Lines for the run header (what is trained, with how many parameters)."""
        return []

    def summary_rows(self, metrics: dict[str, float]) -> list[tuple[str, str]]:
        """(label, value) rows of the run summary for the final metrics."""
        return [(k, f"{v:.4f}") for k, v in metrics.items()]

    def problems(self) -> list[str]:
        """Inputs found unusable during the run (e.g. unreadable images), listed in the summary."""
        return []
