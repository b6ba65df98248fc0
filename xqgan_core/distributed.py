"""Small helpers for code that runs the same way with and without torch.distributed (components under DDP)."""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor

__all__ = ["world_size", "rank", "mean_over_ranks"]


def world_size() -> int:
    """Processes in the default group; 1 when torch.distributed is not initialised."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


def mean_over_ranks(x: Tensor) -> Tensor:
    """The average of ``x`` over all ranks, differentiable; ``x`` itself in a single process.

    Every rank must call it the same number of times (it is a collective). Backward sums the incoming gradients over
    ranks, so a loss computed from the result on every rank, with DDP then averaging parameter gradients, gets
    exactly the gradient of that loss on the global batch.
    """
    world = world_size()
    if world == 1:
        return x
    from torch.distributed.nn.functional import all_reduce  # autograd-aware collective

    return all_reduce(x.contiguous(), op=dist.ReduceOp.SUM) / world
