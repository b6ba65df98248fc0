"""The worker of tests/test_alignment.py's 2-rank gloo check, in a module of its own so that spawned ranks import
only torch and xqgan_core.alignment."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from xqgan_core.alignment import gather_with_grad, info_nce

VALID = (True, True, False, True, True, True, True, False)


def features(n: int = 8, d: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)


def gathered_rank(rank: int, port: int, out: str) -> None:
    """Rank ``rank`` of 2 holds rows 4r..4r+3; saves the gathered InfoNCE and its rows' gradients."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        a, b = features()
        rows = slice(4 * rank, 4 * rank + 4)
        local_a = a[rows].clone().requires_grad_(True)
        local_b = b[rows].clone().requires_grad_(True)
        kept = gather_with_grad(torch.tensor(VALID[rows]).to(torch.uint8)).bool()
        loss = info_nce(gather_with_grad(local_a), gather_with_grad(local_b), 2.5, kept)
        loss.backward()
        torch.save({"loss": loss.detach(), "grad_a": local_a.grad, "grad_b": local_b.grad}, f"{out}/rank{rank}.pt")
        # both ranks leave together: a rank that tears gloo down while its peer is still finishing the last
        # collective aborts the peer ("terminate called without an active exception", seen once in CI)
        dist.barrier()
    finally:
        dist.destroy_process_group()
