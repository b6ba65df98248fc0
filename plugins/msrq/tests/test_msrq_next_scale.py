"""msrq's next-scale inputs (``xqgan_core.interfaces.NextScaleInputs``) follow its own reconstruction path."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from xqgan_core import build
from xqgan_core.interfaces import NextScaleInputs

SCALES = [1, 2, 4]
CODES: dict[str, dict[str, Any]] = {
    "vq": {"use": "vq", "dim": 8, "codebook_size": 32},
    "lfq": {"use": "lfq", "bits": 8},
    "bsq": {"use": "bsq", "bits": 8},
}


def make(code: str, **options: Any) -> Any:
    torch.manual_seed(0)
    q = build("quantizer", {"use": "msrq", "scales": SCALES, "phi_count": 0, "code": CODES[code], **options})
    return q.eval()


@pytest.mark.parametrize("code", sorted(CODES))
def test_accumulated_codes_equal_the_quantizers_reconstruction(code: str) -> None:
    q = make(code)
    assert isinstance(q, NextScaleInputs) and q.next_scale_dim() == 8
    z = torch.randn(3, 8, 4, 4, generator=torch.Generator().manual_seed(1))
    out = q(z)
    f_hat, inputs = None, []
    for k, idx in enumerate(out.indices):
        f_hat, nxt = q.accumulate_scale(f_hat, k, idx)
        inputs.append(nxt)
    assert inputs[-1] is None and f_hat.dtype == torch.float32 and f_hat.shape == (3, 8, 4, 4)
    # after the last scale: exactly the z_q of an eval-mode forward on the same latents
    torch.testing.assert_close(f_hat, out.z_q, rtol=0, atol=1e-6)
    # each input: the codes of the earlier scales (indices_to_codes keeping k scales), area-resampled to scale k
    teacher = q.next_scale_inputs(out.indices)
    assert len(teacher) == len(SCALES) - 1
    for k in range(1, len(SCALES)):
        s = SCALES[k]
        expected = F.interpolate(q.indices_to_codes(out.indices, keep=k), size=(s, s), mode="area")
        assert teacher[k - 1].shape == (3, 8, s, s)
        torch.testing.assert_close(teacher[k - 1], expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(inputs[k - 1], teacher[k - 1], rtol=0, atol=0)


def test_phi_refinement_and_raw_rows_are_on_the_path() -> None:
    """With phi convs and raw codebook rows, the inputs still match the forward's path (and differ without phi)."""
    q = make("vq", phi_count=1)
    z = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(2))
    out = q(z)
    teacher = q.next_scale_inputs(out.indices)
    expected = F.interpolate(q.indices_to_codes(out.indices, keep=2), size=(4, 4), mode="area")
    torch.testing.assert_close(teacher[1], expected, rtol=0, atol=1e-6)
    plain = make("vq", phi_gamma=0.0).next_scale_inputs(out.indices)
    assert not torch.allclose(plain[1], teacher[1])


def test_wrong_index_maps_are_refused() -> None:
    q = make("vq")
    with pytest.raises(ValueError, match=r"\(B, 2, 2\)"):
        q.accumulate_scale(None, 1, torch.zeros(2, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="scale 3 does not exist"):
        q.accumulate_scale(None, 3, torch.zeros(2, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="list of 3 index maps"):
        q.next_scale_inputs([torch.zeros(2, 1, 1, dtype=torch.long)])
