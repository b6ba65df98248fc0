"""Frozen parts (``xqgan_core.frozen``): held outside registration, so optimizers, checkpoints, DDP and gradient
averaging never see them, while moves and eval mode still reach them and gradients pass through them."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

from xqgan_core.distributed import all_reduce_mean_grads
from xqgan_core.frozen import FrozenParts, all_frozen_parts, seeded


class WithTrunk(FrozenParts):
    def __init__(self) -> None:
        super().__init__()
        self.hold_frozen("trunk", nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)))
        self.head = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


def test_a_frozen_part_is_usable_but_not_a_parameter_buffer_or_child():
    m = WithTrunk()
    assert isinstance(m.trunk, nn.Sequential)
    trunk_ids = {id(p) for p in m.trunk.parameters()}
    assert trunk_ids and not trunk_ids & {id(p) for p in m.parameters()}
    assert set(m.state_dict()) == {"head.weight", "head.bias"}
    assert [name for name, _ in m.named_modules()] == ["", "head"]
    assert all_frozen_parts(nn.ModuleList([m])) == {"0.trunk": m.trunk}
    m.requires_grad_(True)  # what the tokenizer task does to its discriminators before their step
    assert not any(p.requires_grad for p in m.trunk.parameters())


def test_moves_reach_the_frozen_part_and_it_stays_in_eval_mode():
    m = WithTrunk().train()
    assert not m.trunk.training and m.head.training
    m.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in m.trunk.parameters())
    x = torch.randn(3, 4, dtype=torch.float64)
    assert torch.equal(m(x), m(x))  # dropout off: the trunk is in eval mode
    twin = copy.deepcopy(m)
    assert twin.trunk is not m.trunk and torch.equal(twin(x), m(x))


def test_gradient_passes_through_to_the_input_not_into_the_frozen_part():
    m = WithTrunk()
    x = torch.randn(3, 4, requires_grad=True)
    m(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in m.trunk.parameters()) and m.head.weight.grad is not None


def test_a_registered_name_cannot_be_frozen():
    m = WithTrunk()
    with pytest.raises(ValueError, match="WithTrunk.head is already a registered"):
        m.hold_frozen("head", nn.Linear(1, 1))


def test_seeded_builds_agree_and_leave_the_global_rng_alone():
    torch.manual_seed(5)
    before = torch.get_rng_state()
    a = seeded(lambda: nn.Linear(8, 8))
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(99)  # another rank, another seed: the same frozen weights
    b = seeded(lambda: nn.Linear(8, 8))
    assert torch.equal(a.weight, b.weight)


def test_ddp_buckets_and_gradient_averaging_leave_the_frozen_part_out(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        m = WithTrunk()
        ddp = nn.parallel.DistributedDataParallel(m)
        assert {id(p) for p in ddp._module_parameters} == {id(p) for p in m.head.parameters()}
        ddp(torch.randn(2, 4)).sum().backward()  # no "unused parameter" complaint, no trunk gradient
        assert all(p.grad is None for p in m.trunk.parameters())
        all_reduce_mean_grads(m.parameters())
    finally:
        dist.destroy_process_group()
