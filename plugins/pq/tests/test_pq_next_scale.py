"""pq's next-scale inputs: each msrq branch's inputs, concatenated along the channels."""

from __future__ import annotations

import pytest
import torch

from xqgan_core import build, catalog

pytestmark = pytest.mark.skipif("msrq" not in catalog().names("quantizer"), reason="needs the msrq plugin")

MSRQ = {"use": "msrq", "scales": [1, 2, 4], "phi_count": 0, "code": {"use": "vq", "dim": 4, "codebook_size": 16}}


def test_branches_concatenated_and_equal_to_the_reconstruction() -> None:
    torch.manual_seed(0)
    q = build("quantizer", {"use": "pq", "branches": 2, "branch": MSRQ}).eval()
    assert q.next_scale_dim() == 8
    z = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(0))
    out = q(z)
    teacher = q.next_scale_inputs(out.indices)
    for p, branch in enumerate(q.branches):
        own = branch.next_scale_inputs([scale[:, p] for scale in out.indices])
        for mine, theirs in zip(teacher, own):
            torch.testing.assert_close(mine[:, 4 * p:4 * (p + 1)], theirs, rtol=0, atol=0)
    f_hat = None
    for k, idx in enumerate(out.indices):  # (B, P, s, s) per scale
        f_hat, nxt = q.accumulate_scale(f_hat, k, idx)
        if nxt is not None:
            torch.testing.assert_close(nxt, teacher[k], rtol=0, atol=0)
    torch.testing.assert_close(f_hat, out.z_q, rtol=0, atol=1e-6)


def test_single_scale_branches_are_refused() -> None:
    q = build("quantizer", {"use": "pq", "branches": 2, "branch": {"use": "vq", "dim": 4, "codebook_size": 16}})
    with pytest.raises(ValueError, match="branch use = 'msrq'"):
        q.next_scale_dim()
