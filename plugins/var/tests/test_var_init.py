"""VAR's AdaLN initialisation: the gate rows of each block's modulation start at ``adaln_gate_init`` times the
weight init, the scale / shift rows (and the head norm's) at ``adaln_init`` times it (VAR's --alng / --aln)."""

from __future__ import annotations

import pytest
import torch

from xqgan_core.registry import build


def _generator(**options: float):
    q = build("quantizer", {"use": "msrq", "scales": [1, 2, 4], "phi_count": 1,
                            "code": {"use": "vq", "codebook_size": 16, "dim": 4}})  # fmt: skip
    torch.manual_seed(0)
    g = build("generator", {"use": "var", "depth": 2, "width": 64, "heads": 2, **options})
    g.bind(q.token_layout(4, 4), q, 3)
    return g


@pytest.mark.parametrize("gate, adaln", [(1e-5, 0.5), (1e-4, 0.5), (1e-3, 0.01)])
def test_gate_and_modulation_rows_start_at_their_multipliers(gate: float, adaln: float) -> None:
    g = _generator(adaln_gate_init=gate, adaln_init=adaln)
    std = (1 / (3 * 64)) ** 0.5  # VAR's automatic init std at width 64
    for block in g.blocks:
        w = block.modulation[1].weight
        assert w[:128].std().item() == pytest.approx(gate * std, rel=0.1)  # gate1, gate2
        assert w[128:].std().item() == pytest.approx(adaln * std, rel=0.1)  # scale1, scale2, shift1, shift2
    assert g.head_norm.modulation[1].weight.std().item() == pytest.approx(adaln * std, rel=0.1)


def test_the_defaults_are_vars() -> None:
    c = _generator().config
    assert (c.adaln_gate_init, c.adaln_init) == (1e-5, 0.5)
