"""Behaviour of the ``lfq`` quantizer beyond the generic contract."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from xqgan_core import build
from xqgan_core.binary_codes import binary_usage, entropy_terms


def make(**options: Any) -> Any:
    return build("quantizer", {"use": "lfq", "bits": 6, **options})


def latents(b: int = 2, c: int = 6, h: int = 4, w: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(seed))


def test_defaults() -> None:
    q = build("quantizer", {"use": "lfq"})
    assert (q.dim, q.codebook_size, q.num_levels) == (14, 2**14, 1)
    c = q.config
    assert (c.entropy_weight, c.sample_entropy_weight, c.codebook_entropy_weight) == (0.1, 1.0, 1.0)
    assert (c.commitment_weight, c.group_size, c.temperature) == (0.25, 1, 1.0)
    assert list(q.state_dict()) == []  # nothing learned, nothing stored


def test_codes_are_signs_and_indices_their_bits() -> None:
    q = make().eval()
    z = torch.tensor([0.3, -2.0, 0.0, 5.0, -0.1, 1e-6]).view(1, 6, 1, 1)
    out = q(z)
    assert out.z_q.flatten().tolist() == [1.0, -1.0, -1.0, 1.0, -1.0, 1.0]
    assert out.indices.tolist() == [[[1 + 8 + 32]]]
    assert out.indices.dtype == torch.int64


@pytest.mark.parametrize("bits", [6, 40])
def test_index_code_index_round_trip(bits: int) -> None:
    q = make(bits=bits).eval()
    idx = torch.randint(0, 2**bits, (3, 5, 4), generator=torch.Generator().manual_seed(bits))
    codes = q.indices_to_codes(idx)
    assert codes.shape == (3, bits, 5, 4) and set(codes.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(q.codes_to_indices(codes), idx)
    with torch.no_grad():
        out = q(codes)
    assert torch.equal(out.indices, idx) and torch.equal(out.z_q, codes)


def test_losses_equal_their_formulas() -> None:
    q = make(entropy_weight=0.5, sample_entropy_weight=0.3, codebook_entropy_weight=2.0, commitment_weight=0.7,
             group_size=2, temperature=0.4).train()
    z = latents(seed=1)
    out = q(z)
    tokens = z.permute(0, 2, 3, 1).reshape(-1, 6)
    terms = entropy_terms(tokens, scale=1.0, temperature=0.4, group_size=2)
    torch.testing.assert_close(out.losses["entropy"], 0.5 * (0.3 * terms.sample - 2.0 * terms.codebook))
    torch.testing.assert_close(out.losses["commitment"], 0.7 * (torch.sign(z) - z).pow(2).mean())
    assert out.stats["sample_entropy"] == pytest.approx(terms.sample.item())
    assert out.stats["codebook_entropy"] == pytest.approx(terms.codebook.item())


def test_exact_group_changes_only_the_codebook_term() -> None:
    z = latents(seed=2)
    per_bit, exact = make(group_size=1)(z), make(group_size=6)(z)
    assert per_bit.stats["sample_entropy"] == pytest.approx(exact.stats["sample_entropy"])
    # per-bit entropies sum to at least the joint entropy (subadditivity)
    assert per_bit.stats["codebook_entropy"] > exact.stats["codebook_entropy"]


def test_entropy_loss_makes_bits_confident_and_spreads_tokens_over_codes() -> None:
    q = make(group_size=6, commitment_weight=0.0, temperature=0.5, entropy_weight=1.0).train()
    z = (latents(seed=3) * 0.05).requires_grad_(True)  # 32 tokens near the origin: every bit uncertain
    opt = torch.optim.SGD([z], lr=0.5)
    start = q(z)
    for _ in range(40):
        opt.zero_grad()
        q(z).losses["entropy"].backward()
        opt.step()
    out = q(z)
    assert out.losses["entropy"].item() < start.losses["entropy"].item() - 2.0
    assert out.stats["sample_entropy"] < 0.2 * start.stats["sample_entropy"]  # bits became confident ...
    assert out.stats["codebook_entropy"] > 0.85 * math.log(32)  # ... without collapsing onto few codes
    assert out.stats["perplexity"] > start.stats["perplexity"]


def test_stats_describe_the_batch() -> None:
    q = make()
    out = q(latents())
    usage = binary_usage(out.indices, 6)
    assert out.stats["perplexity"] == pytest.approx(usage["perplexity"])
    assert out.stats["utilization"] == pytest.approx(usage["utilization"])
    assert 0 < out.stats["utilization"] <= 100 * 32 / 64


def test_large_codebooks_report_usage_without_a_histogram() -> None:
    q = make(bits=24)
    out = q(latents(c=24))
    assert out.stats["utilization"] == pytest.approx(100.0 * out.indices.unique().numel() / 2**24)


def test_14_bits_forward_backward() -> None:
    q = make(bits=14, group_size=7).train()
    z = torch.randn(4, 14, 8, 8, requires_grad=True)
    out = q(z)
    (out.z_q.square().mean() + out.loss).backward()
    assert out.indices.shape == (4, 8, 8) and int(out.indices.max()) < 2**14
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    assert all(torch.isfinite(v) for v in out.losses.values())


def test_bf16_input_and_autocast() -> None:
    q = make().eval()
    z = latents()
    with torch.no_grad():
        ref = q(z)
        half = q(z.bfloat16())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = q(z)
    assert half.z_q.dtype == torch.bfloat16 and torch.equal(half.z_q.float(), ref.z_q)
    assert torch.equal(auto.indices, ref.indices) and auto.z_q.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in half.losses.values())


def test_wrong_shapes_are_rejected() -> None:
    q = make()
    with pytest.raises(ValueError, match=r"\(B, 6, H, W\)"):
        q(torch.zeros(2, 4, 4, 4))
    with pytest.raises(ValueError):
        q.indices_to_codes(torch.zeros(2, 4, dtype=torch.long))
