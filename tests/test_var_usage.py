"""VAR's codebook usage (hits >= 8 % of a uniform spread of the full-resolution positions), as an evaluation metric."""

from __future__ import annotations

import pytest
import torch

from xqgan_core.metrics import CodebookUsage, VarCodebookUsage
from xqgan_core.token_layout import BRANCH, TokenLayout


def _sequence(values: list[int], images: int) -> torch.Tensor:
    """``images`` token sequences of one column holding ``values`` in turn: (images, L, 1)."""
    flat = torch.tensor(values, dtype=torch.long)
    return flat.view(images, -1, 1)


def test_margin_on_a_single_map() -> None:
    # 25 images of a 2x2 grid, V = 4: 100 positions -> margin 0.08 * 100 / 4 = 2 hits
    layout = TokenLayout.single((2, 2), 4)
    values = [0] * 97 + [1, 1] + [2]  # code 1 reaches the margin, code 2 (1 hit) does not, code 3 is never hit
    usage = VarCodebookUsage(layout)
    usage.update(_sequence(values, 25))
    assert usage.compute() == {"var_usage": 50.0}
    plain = CodebookUsage(4)
    plain.update(torch.tensor(values))
    assert plain.compute()["utilization"] == 75.0  # the other definition: hit at least once


def test_batches_and_margin_scale_with_the_images() -> None:
    layout = TokenLayout.single((2, 2), 4)
    values = [0] * 97 + [1, 1] + [2]
    split = VarCodebookUsage(layout)
    seq = _sequence(values, 25)
    for part in seq.split(7):
        split.update(part)
    assert split.compute() == {"var_usage": 50.0}
    doubled = VarCodebookUsage(layout)  # twice the images, same hits: code 1 falls under the doubled margin
    doubled.update(torch.cat([seq, torch.zeros_like(seq)]))
    assert doubled.compute() == {"var_usage": 25.0}


def test_coarse_scales_read_low_and_branches_are_averaged() -> None:
    # scales (1, 2) on a 2x2 grid: L = 1 + 4; 10 images -> 40 full-res positions -> margin 0.08 * 40 / 4 = 0.8
    layout = TokenLayout.single((2, 2), 4).over_scales([1, 2])
    coarse = torch.zeros(10, 1, dtype=torch.long)  # every image: code 0 on the 1x1 scale
    fine = torch.arange(4).repeat(10, 1)  # every code once per image on the 2x2 scale
    branch0 = torch.cat([coarse, fine], dim=1)
    usage = VarCodebookUsage(layout)
    usage.update(branch0.unsqueeze(-1))
    assert usage.compute() == {"var_usage": 62.5, "var_usage/scale0": 25.0, "var_usage/scale1": 100.0}

    two = TokenLayout.stack(BRANCH, [layout, layout], ["branch0", "branch1"])
    branch1 = torch.zeros(10, 5, dtype=torch.long)  # one code everywhere: 25 % on both scales
    usage = VarCodebookUsage(two)
    usage.update(torch.stack([branch0, branch1], dim=-1))
    assert usage.compute() == pytest.approx({
        "var_usage": (25 + 100 + 25 + 25) / 4, "var_usage/branch0": 62.5, "var_usage/branch1": 25.0,
        "var_usage/scale0": 25.0, "var_usage/scale1": 62.5,
    })


def test_refuses_other_layouts_and_out_of_range_codes() -> None:
    usage = VarCodebookUsage(TokenLayout.single((2, 2), 4))
    with pytest.raises(ValueError, match=r"expected token sequences \(B, 4, 1\)"):
        usage.update(torch.zeros(1, 5, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="index 4 out of range"):
        usage.update(torch.full((1, 4, 1), 4))
    assert VarCodebookUsage(TokenLayout.single((2, 2), 4)).compute() == {}
