"""torch.distributed helpers: the process group, the rank-sharded step sampler, agreed read-backs and hand-made
gradient averaging. Everything here also runs unchanged in a single process (world size 1)."""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .errors import TrainingError
from .interfaces import Device

__all__ = [
    "DistEnv",
    "StepSampler",
    "all_reduce_mean_grads",
    "broadcast_buffers",
    "broadcast_module_state",
    "broadcast_object",
    "gather_objects",
    "init_process_group",
    "item_seed",
    "mean_over_ranks",
    "rank",
    "read_back",
    "world_size",
    "wrap_ddp",
]


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


# ----------------------------------------------------------------------------------------------------------------
# the process group


@dataclass(frozen=True)
class DistEnv:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_environ(cls) -> DistEnv:
        env = os.environ
        return cls(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def init_process_group(device: Device, env: DistEnv, timeout_s: float) -> None:
    """Create the default process group on ``device``'s backend. A rank that waits longer than ``timeout_s`` in a
    collective (a peer died or hangs) fails with an error instead of blocking the job forever."""
    device.init_distributed()
    if device.torch_device.type == "cuda":
        visible = torch.cuda.device_count()
        if env.local_rank >= visible:
            raise TrainingError(
                f"process with LOCAL_RANK={env.local_rank} has no GPU of its own: {visible} CUDA device(s) are "
                f"visible on this node. Start at most {visible} process(es) per node "
                f"(torchrun --nproc_per_node={visible}), or select another device ([device] use = \"cpu\")."
            )
        torch.cuda.set_device(env.local_rank)
    dist.init_process_group(backend=device.dist_backend, timeout=datetime.timedelta(seconds=timeout_s))


@contextlib.contextmanager
def process_group(device: Device, env: DistEnv, timeout_s: float) -> Iterator[None]:
    """The default process group for the block when ``env`` is distributed (``init_process_group``); nothing in a
    single process. A block that ends normally waits for every rank before tearing the group down: a rank that
    destroys its gloo group and exits while a peer is still working (rank 0's evaluation, index or grid) can abort
    at exit ("terminate called without an active exception", SIGABRT; seen once in CI). A block that raises does not
    wait, since a failed peer may never arrive."""
    if not env.distributed:
        yield
        return
    init_process_group(device, env, timeout_s)
    try:
        yield
    except BaseException:
        if dist.is_initialized():
            dist.destroy_process_group()
        raise
    dist.barrier()
    dist.destroy_process_group()


def wrap_ddp(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` in DistributedDataParallel when the process group is up (gradients all-reduced in backward);
    ``module`` itself in a single process."""
    if world_size() == 1:
        return module
    kwargs = {"device_ids": [device.index]} if device.type == "cuda" else {}
    return nn.parallel.DistributedDataParallel(module, **kwargs)


def broadcast_object(value: Any, src: int = 0) -> Any:
    """``value`` of rank ``src`` on every rank (picklable objects; between live ranks only, never from a file)."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(value: Any, dst: int = 0) -> list[Any] | None:
    """Every rank's ``value`` as a list on rank ``dst`` (None elsewhere); ``[value]`` in a single process."""
    world = world_size()
    if world == 1:
        return [value]
    out: list[Any] | None = [None] * world if rank() == dst else None
    dist.gather_object(value, out, dst=dst)
    return out


def broadcast_module_state(module: nn.Module, src: int = 0) -> None:
    """Overwrite every rank's parameters and buffers of ``module`` with rank ``src``'s (no-op in one process)."""
    if world_size() == 1:
        return
    for tensor in module.state_dict().values():
        dist.broadcast(tensor, src=src)


def broadcast_buffers(module: nn.Module, src: int = 0) -> None:
    """Rank ``src``'s buffers (e.g. BatchNorm running statistics) on every rank, as DDP does for the modules it
    wraps: modules trained without DDP would otherwise drift apart rank by rank."""
    if world_size() == 1:
        return
    for buffer in module.buffers():
        dist.broadcast(buffer, src=src)


# ----------------------------------------------------------------------------------------------------------------
# reading values back and averaging gradients


def read_back(values: dict[str, Tensor]) -> dict[str, float]:
    """0-d tensors -> Python floats in one device-to-host copy (the step's single host sync). Under
    torch.distributed a value that is not finite on any rank is made non-finite on every rank, so that all ranks
    take the same skip decision."""
    names = list(values)
    device = next(iter(values.values())).device
    packed = torch.stack([values[n].detach().float().reshape(()).to(device) for n in names])
    if world_size() > 1:
        bad = (~torch.isfinite(packed)).float()
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        packed = torch.where(bad > 0, torch.full_like(packed, float("nan")), packed)
    return dict(zip(names, packed.tolist()))


def all_reduce_mean_grads(params: Iterable[nn.Parameter]) -> None:
    """Average the gradients of ``params`` over ranks in one flat all-reduce (for modules not wrapped in DDP)."""
    world = world_size()
    grads = [p.grad for p in params if p.grad is not None]
    if world == 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


# ----------------------------------------------------------------------------------------------------------------
# the data order


def item_seed(run_seed: int, position: int) -> int:
    """The seed of the random choices (crop, flip) of the sample at global ``position`` of a run: the same item
    key on every rank, in every worker, before and after a resume."""
    return (run_seed * 0x9E3779B97F4A7C15 + position * 0xBF58476D1CE4E5B9 + 1) % (1 << 63)


class StepSampler(torch.utils.data.Sampler[list[tuple[int, int]]]):
    """Yields micro-batches of ``(index, seed)`` item keys forever, reshuffled each epoch with a seeded permutation.

    The batch at position k depends only on (seed, k), so a resumed run continues with exactly the batches (and the
    augmentations: ``seed`` is derived from the sample's global position) the interrupted one would have seen.
    Each rank of a distributed run takes its own slice of the global batch.
    """

    def __init__(self, size: int, batch_size: int, seed: int, start: int = 0, rank: int = 0, world: int = 1) -> None:
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.start, self.rank, self.world = start, rank, world
        self._epoch: int | None = None
        self._perm: list[int] = []

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        k = self.start
        per_global = self.batch_size * self.world
        while True:
            first = k * per_global + self.rank * self.batch_size
            out = []
            for pos in range(first, first + self.batch_size):
                epoch, offset = divmod(pos, self.size)
                out.append((self._permutation(epoch)[offset], item_seed(self.seed, pos)))
            yield out
            k += 1

    def _permutation(self, epoch: int) -> list[int]:
        if self._epoch != epoch:  # a Python list: indexed once per item, in the loader's main process
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perm, self._epoch = torch.randperm(self.size, generator=g).tolist(), epoch
        return self._perm
