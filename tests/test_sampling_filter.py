"""xqgan_core.sampling.filter_logits: top-k, the nucleus (top-p) as a logit threshold, and the fast path that finds
the nucleus among the top-k values instead of sorting the whole vocabulary."""

from __future__ import annotations

import math

import pytest
import torch

from xqgan_core.sampling import filter_logits, sample_logits


def nucleus_by_hand(row: list[float], top_k: int, top_p: float) -> set[int]:
    """Indices kept in one row, written out plainly: the top-k (ties with the k-th kept), then the most likely
    tokens while the mass before them is below top_p, then every token tied with the last one kept."""
    order = sorted(range(len(row)), key=lambda i: -row[i])
    if 0 < top_k < len(row):
        kth = row[order[top_k - 1]]
        order = [i for i in order if row[i] >= kth]
    z = sum(math.exp(row[i] - row[order[0]]) for i in order)
    mass, floor = 0.0, row[order[0]]
    for i in order:
        if mass >= top_p:
            break
        floor = row[i]
        mass += math.exp(row[i] - row[order[0]]) / z
    return {i for i in order if row[i] >= floor}


def kept(logits: torch.Tensor) -> list[set[int]]:
    return [set(torch.nonzero(torch.isfinite(r)).flatten().tolist()) for r in logits]


@pytest.mark.parametrize("top_k, top_p", [(0, 0.5), (7, 1.0), (7, 0.8), (40, 0.95), (64, 0.3)])
def test_filter_matches_a_plain_reference(top_k: int, top_p: float) -> None:
    logits = torch.randn(32, 64, generator=torch.Generator().manual_seed(top_k)) * 3
    out = filter_logits(logits, top_k, top_p)
    assert kept(out) == [nucleus_by_hand(r, top_k, top_p) for r in logits.double().tolist()]
    finite = torch.isfinite(out)
    assert torch.equal(out[finite], logits[finite]), "kept logits must be unchanged"


def test_the_top_k_fast_path_equals_sorting_the_whole_vocabulary() -> None:
    # top-k then top-p in one call (nucleus among the k sorted values) vs the same in two calls (the second call
    # has no top-k, so it sorts the whole, already top-k-filtered, vocabulary)
    logits = torch.randn(512, 4096, generator=torch.Generator().manual_seed(0)) * 2
    for top_k, top_p in ((900, 0.96), (50, 0.5), (2, 0.99)):
        fast = filter_logits(logits, top_k, top_p)
        full = filter_logits(filter_logits(logits, top_k), 0, top_p)
        assert torch.equal(fast, full)
    # already masked entries (-inf), more of them than the k asks to drop: the k-th is -inf, nothing finite is lost
    logits[:, ::3] = float("-inf")
    for top_k, top_p in ((3000, 0.9), (3000, 1.0)):
        fast = filter_logits(logits, top_k, top_p)
        assert torch.equal(fast, filter_logits(logits, 0, top_p))


def test_ties_are_kept_together_on_every_path() -> None:
    # small integer logits: many ties at the k-th value (the fast path must fall back) and at the nucleus's edge
    logits = torch.randint(0, 4, (200, 24), generator=torch.Generator().manual_seed(1)).float()
    for top_k, top_p in ((5, 0.6), (5, 1.0), (0, 0.6), (12, 0.3)):
        out = filter_logits(logits, top_k, top_p)
        assert kept(out) == [nucleus_by_hand(r, top_k, top_p) for r in logits.double().tolist()]
        assert torch.equal(out, filter_logits(filter_logits(logits, top_k), 0, top_p))
    # by hand: the nucleus ends on a logit of 1 (mass before the first 1 is below 0.7), so both 1s survive
    row = torch.tensor([[3.0, 1.0, 1.0, 0.0]])
    assert kept(filter_logits(row, 0, 0.9)) == [{0, 1, 2}]
    assert kept(filter_logits(row, 3, 0.9)) == [{0, 1, 2}]
    assert kept(filter_logits(row, 0, 0.5)) == [{0}]


def test_the_most_likely_token_always_survives_and_draws_stay_inside() -> None:
    logits = torch.randn(64, 100, generator=torch.Generator().manual_seed(2)) * 5
    out = filter_logits(logits, 10, 1e-6)
    assert torch.equal(torch.isfinite(out).sum(-1), torch.ones(64, dtype=torch.long))
    assert torch.equal(out.argmax(-1), logits.argmax(-1))
    drawn = sample_logits(logits, top_k=10, top_p=0.5, generator=torch.Generator().manual_seed(3))
    allowed = torch.isfinite(filter_logits(logits, 10, 0.5))
    assert bool(allowed.gather(-1, drawn[:, None]).all())


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="top_p"):
        filter_logits(torch.zeros(2, 3), 0, 0.0)
    with pytest.raises(ValueError, match="top_k"):
        filter_logits(torch.zeros(2, 3), -1, 1.0)
