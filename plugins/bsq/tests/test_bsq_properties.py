"""Behaviour of the ``bsq`` quantizer beyond the generic contract."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from xqgan_core import build
from xqgan_core.binary_codes import entropy_terms


def make(**options: Any) -> Any:
    return build("quantizer", {"use": "bsq", "bits": 6, **options})


def latents(b: int = 2, c: int = 6, h: int = 4, w: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(seed))


def test_defaults() -> None:
    q = build("quantizer", {"use": "bsq"})
    assert (q.dim, q.codebook_size, q.num_levels) == (14, 2**14, 1)
    c = q.config
    assert (c.entropy_weight, c.commitment_weight, c.group_size, c.temperature) == (0.1, 0.25, 1, 1.0)
    assert list(q.state_dict()) == []


@pytest.mark.parametrize("bits", [6, 14])
def test_codes_have_unit_norm_and_magnitude_one_over_sqrt_bits(bits: int) -> None:
    q = make(bits=bits)
    for mode in (q.train, q.eval):
        mode()
        z_q = q(latents(c=bits) * 7).z_q
        torch.testing.assert_close(z_q.norm(dim=1), torch.ones(2, 4, 4))
        torch.testing.assert_close(z_q.abs(), torch.full_like(z_q, 1 / math.sqrt(bits)))


def test_indices_ignore_the_input_scale_and_follow_the_signs() -> None:
    q = make().eval()
    z = latents(seed=1)
    a, b = q(z), q(z * 0.01)
    assert torch.equal(a.indices, b.indices)
    expected = ((z > 0).long() * (2 ** torch.arange(6)).view(1, 6, 1, 1)).sum(dim=1)
    assert torch.equal(a.indices, expected)


@pytest.mark.parametrize("bits", [6, 40])
def test_index_code_index_round_trip(bits: int) -> None:
    q = make(bits=bits).eval()
    idx = torch.randint(0, 2**bits, (3, 5, 4), generator=torch.Generator().manual_seed(bits))
    codes = q.indices_to_codes(idx)
    assert codes.shape == (3, bits, 5, 4)
    torch.testing.assert_close(codes.norm(dim=1), torch.ones(3, 5, 4))
    assert torch.equal(q.codes_to_indices(codes), idx)
    with torch.no_grad():
        out = q(codes)
    assert torch.equal(out.indices, idx)
    torch.testing.assert_close(out.z_q, codes)


def test_straight_through_gradient_passes_the_normalisation() -> None:
    q = make().train()
    z = latents().requires_grad_(True)
    w = torch.randn(2, 6, 4, 4, generator=torch.Generator().manual_seed(7))
    (q(z).z_q * w).sum().backward()
    z_ref = z.detach().clone().requires_grad_(True)
    (F.normalize(z_ref, dim=1) * w).sum().backward()
    torch.testing.assert_close(z.grad, z_ref.grad)


def test_losses_use_the_normalised_tokens_and_spherical_codes() -> None:
    q = make(commitment_weight=0.5, group_size=3, temperature=0.2).train()
    z = latents(seed=2) * 3
    out = q(z)
    u = F.normalize(z, dim=1)
    tokens = u.permute(0, 2, 3, 1).reshape(-1, 6)
    terms = entropy_terms(tokens, scale=1 / math.sqrt(6), temperature=0.2, group_size=3)
    torch.testing.assert_close(out.losses["entropy"], 0.1 * (terms.sample - terms.codebook))
    torch.testing.assert_close(out.losses["commitment"], 0.5 * (torch.sign(u) / math.sqrt(6) - u).pow(2).mean())
    # BSQ's soft assignment differs from LFQ's on the same latents (codes at 1/sqrt(bits), tokens normalised)
    lfq = build("quantizer", {"use": "lfq", "bits": 6, "group_size": 3, "temperature": 0.2})(z)
    assert float(lfq.stats["sample_entropy"]) != pytest.approx(float(out.stats["sample_entropy"]), rel=1e-3)


def test_quantization_error_is_bounded() -> None:
    # both the normalised token and its code are unit vectors in the same orthant: ||u - q||^2 <= 2 - 2/sqrt(bits)
    q = make(bits=6).eval()
    z = latents(b=8, seed=3) * 10
    with torch.no_grad():
        err = (q(z).z_q - F.normalize(z, dim=1)).pow(2).sum(dim=1)
    assert err.max() <= 2 - 2 / math.sqrt(6) + 1e-5


def test_14_bits_forward_backward() -> None:
    q = make(bits=14, group_size=7).train()
    z = torch.randn(4, 14, 8, 8, requires_grad=True)
    out = q(z)
    (out.z_q.square().mean() + out.loss).backward()
    assert out.indices.shape == (4, 8, 8) and int(out.indices.max()) < 2**14
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_zero_token_maps_to_index_zero() -> None:
    q = make().eval()
    out = q(torch.zeros(1, 6, 1, 1))
    assert out.indices.tolist() == [[[0]]]
    torch.testing.assert_close(out.z_q.flatten(), torch.full((6,), -1 / math.sqrt(6)))
