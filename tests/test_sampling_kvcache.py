"""xqgan_core.sampling.KVCache: the preallocated mode (``capacity``) returns what concatenation returns."""

from __future__ import annotations

import pytest
import torch

from xqgan_core.sampling import KVCache


def test_preallocated_cache_matches_concatenation() -> None:
    grown, preallocated = KVCache(), KVCache(capacity=6)
    g = torch.Generator().manual_seed(0)
    for t in (2, 1, 3):  # a prefill, then single steps and a block
        k, v = torch.randn(2, 3, t, 4, generator=g), torch.randn(2, 3, t, 4, generator=g)
        for a, b in zip(grown.append(k, v), preallocated.append(k, v)):
            assert torch.equal(a, b)
    assert grown.length == preallocated.length == 6
    with pytest.raises(ValueError, match="capacity 6"):
        preallocated.append(k[..., :1, :], v[..., :1, :])
    preallocated.reset()
    assert preallocated.length == 0
    k, v = torch.randn(2, 3, 1, 4), torch.randn(2, 3, 1, 4)
    assert torch.equal(preallocated.append(k, v)[0], k)
