"""Tests for the shared quantizer building blocks in ``xqgan_core.quant_ops``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from xqgan_core.quant_ops import (
    codebook_usage,
    commitment_losses,
    flatten_tokens,
    nearest_code,
    straight_through,
    unflatten_tokens,
)


def _random(n: int, v: int, c: int, dtype: torch.dtype = torch.float64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g, dtype=dtype), torch.randn(v, c, generator=g, dtype=dtype)


# ---- nearest_code -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 100, 1000])
def test_chunked_nearest_equals_brute_force_cdist(chunk_size: int) -> None:
    # 100 tokens: 7 and 64 leave a partial last chunk, 1000 is a single chunk larger than the input
    z, codebook = _random(100, 50, 6)
    expected = torch.cdist(z, codebook).argmin(dim=1)
    got = nearest_code(z, codebook, chunk_size)
    assert got.dtype == torch.int64 and got.shape == (100,)
    assert torch.equal(got, expected)


def test_nearest_fp32_picks_a_minimal_distance() -> None:
    # in fp32 near-ties may legitimately resolve either way: check the chosen distance is the minimum
    z, codebook = _random(300, 128, 8, dtype=torch.float32, seed=1)
    got = nearest_code(z, codebook, chunk_size=37)
    d = torch.cdist(z.double(), codebook.double())
    torch.testing.assert_close(d.gather(1, got[:, None]).squeeze(1), d.min(dim=1).values, atol=1e-5, rtol=1e-5)


def test_nearest_normalized_is_argmax_cosine() -> None:
    z, codebook = _random(90, 40, 5, seed=2)
    z, codebook = F.normalize(z, dim=1), F.normalize(codebook, dim=1)
    got = nearest_code(z, codebook, chunk_size=16, normalized=True)
    assert torch.equal(got, (z @ codebook.T).argmax(dim=1))
    # on the sphere, max cosine and min distance are the same code
    assert torch.equal(got, torch.cdist(z, codebook).argmin(dim=1))


@pytest.mark.parametrize("normalized", [False, True])
def test_nearest_never_builds_the_full_distance_matrix(monkeypatch: pytest.MonkeyPatch, normalized: bool) -> None:
    shapes: list[tuple[int, ...]] = []

    def spying(real):  # records the shape of every matrix product's result
        def spy(*args: torch.Tensor, **kwargs: float) -> torch.Tensor:
            out = real(*args, **kwargs)
            shapes.append(tuple(out.shape))
            return out

        return spy

    monkeypatch.setattr(torch, "mm", spying(torch.mm))
    monkeypatch.setattr(torch, "addmm", spying(torch.addmm))
    z, codebook = _random(70, 33, 4, seed=3)
    if normalized:
        z, codebook = F.normalize(z, dim=1), F.normalize(codebook, dim=1)
    got = nearest_code(z, codebook, chunk_size=16, normalized=normalized)
    monkeypatch.undo()
    assert shapes == [(16, 33)] * 4 + [(6, 33)]
    assert torch.equal(got, torch.cdist(z, codebook).argmin(dim=1))


def test_nearest_under_bf16_autocast_matches_fp32() -> None:
    z, codebook = _random(64, 32, 8, dtype=torch.float32, seed=4)
    plain = nearest_code(z, codebook, chunk_size=10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = nearest_code(z, codebook, chunk_size=10)
    assert torch.equal(plain, autocast)


def test_nearest_ties_pick_the_lowest_index_and_shapes_are_checked() -> None:
    codebook = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert nearest_code(torch.tensor([[2.0, 0.0]]), codebook, 4).tolist() == [0]
    with pytest.raises(ValueError, match="codebook"):
        nearest_code(torch.zeros(3, 2), torch.zeros(4, 3), 4)
    with pytest.raises(ValueError, match="chunk_size"):
        nearest_code(torch.zeros(3, 2), torch.zeros(4, 2), 0)


# ---- codebook_usage -----------------------------------------------------------------------------------------


def test_usage_on_a_hand_made_histogram() -> None:
    # codes 0,0,1,3 out of 8: p = (1/2, 1/4, 1/4) -> H = 1.5 ln 2, perplexity 2^1.5; 3 of 8 codes used
    stats = codebook_usage(torch.tensor([[0, 0], [1, 3]]), codebook_size=8)
    for value in stats.values():  # 0-d tensors, not floats: making a float would wait for the device
        assert isinstance(value, torch.Tensor) and value.ndim == 0 and not value.requires_grad
    assert stats["perplexity"] == pytest.approx(2**1.5)
    assert stats["utilization"] == pytest.approx(100 * 3 / 8)


def test_usage_extremes() -> None:
    uniform = codebook_usage(torch.arange(16).repeat(3), codebook_size=16)
    assert uniform["perplexity"] == pytest.approx(16.0)
    assert uniform["utilization"] == 100.0
    single = codebook_usage(torch.full((10,), 5), codebook_size=16)
    assert single["perplexity"] == pytest.approx(1.0)
    assert single["utilization"] == pytest.approx(100 / 16)
    empty = codebook_usage(torch.zeros(0, dtype=torch.long), 16)
    assert (empty["perplexity"], empty["utilization"]) == (0.0, 0.0)
    # codebooks too large for a dense histogram are counted from the indices present (2^36-code LFQ)
    huge = codebook_usage(torch.tensor([5, 5, 2**35, 7]), codebook_size=2**36)
    assert huge["perplexity"] == pytest.approx(2**1.5) and huge["utilization"] == pytest.approx(100 * 3 / 2**36)
    with pytest.raises(ValueError, match="out of range"):
        codebook_usage(torch.tensor([16]), codebook_size=16)


# ---- flatten / unflatten ------------------------------------------------------------------------------------


def test_flatten_unflatten_round_trip_and_layout() -> None:
    z = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    flat = flatten_tokens(z)
    assert flat.shape == (2 * 4 * 5, 3)
    # row (b, h, w) holds the channel vector z[b, :, h, w]
    assert torch.equal(flat[1 * 20 + 2 * 5 + 3], z[1, :, 2, 3])
    assert torch.equal(unflatten_tokens(flat, (2, 4, 5)), z)
    indices = torch.zeros(2, 4, 5, dtype=torch.long)
    assert torch.equal(unflatten_tokens(flat, indices.shape), z)
    with pytest.raises(ValueError):
        unflatten_tokens(flat, (2, 4, 4))
    with pytest.raises(ValueError):
        flatten_tokens(z[0])


# ---- straight_through ---------------------------------------------------------------------------------------


def test_straight_through_forward_value_and_identity_gradient() -> None:
    g = torch.Generator().manual_seed(5)
    z = torch.randn(2, 3, 4, 4, generator=g).requires_grad_(True)
    z_q = torch.randn(2, 3, 4, 4, generator=g).requires_grad_(True)
    w = torch.randn(2, 3, 4, 4, generator=g)
    out = straight_through(z, z_q)
    torch.testing.assert_close(out, z_q.detach())
    (out * w).sum().backward()
    assert torch.equal(z.grad, w)
    assert z_q.grad is None  # the codes learn through the codebook loss, not through z_q


def test_straight_through_without_grad_is_exact_and_keeps_input_dtype() -> None:
    z = torch.randn(1, 2, 3, 3)
    z_q = torch.randn(1, 2, 3, 3) * 1e3  # z + (z_q - z) would round; the inference path must not
    assert torch.equal(straight_through(z, z_q), z_q)
    assert straight_through(z.bfloat16(), z_q).dtype == torch.bfloat16


# ---- commitment_losses --------------------------------------------------------------------------------------


def test_commitment_losses_values_and_gradient_routing() -> None:
    z = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    z_q = torch.tensor([[1.5, 2.0], [2.0, 4.0]], requires_grad=True)
    losses = commitment_losses(z, z_q, beta=0.25)
    # squared errors 0.25, 0, 1, 0 -> mean 0.3125
    assert set(losses) == {"codebook", "commitment"}
    assert losses["codebook"].item() == pytest.approx(0.3125)
    assert losses["commitment"].item() == pytest.approx(0.25 * 0.3125)
    losses["codebook"].backward()
    assert z.grad is None and z_q.grad is not None and z_q.grad.abs().sum() > 0
    z_q.grad = None
    commitment_losses(z, z_q, beta=0.25)["commitment"].backward()
    assert z_q.grad is None and z.grad is not None
    torch.testing.assert_close(z.grad, 0.25 * 2 * (z - z_q).detach() / 4)


def test_commitment_losses_are_fp32_for_bf16_inputs() -> None:
    z = torch.arange(12.0).reshape(4, 3).bfloat16()  # small integers: exact in bf16
    losses = commitment_losses(z, z + 1, beta=0.5)
    assert all(v.dtype == torch.float32 and v.ndim == 0 for v in losses.values())
    assert losses["codebook"].item() == 1.0
    assert losses["commitment"].item() == 0.5



def test_auto_chunk_size_keeps_the_score_block_within_the_device_budget() -> None:
    from xqgan_core.quant_ops import ACCELERATOR_SCORE_BYTES, CPU_SCORE_BYTES, auto_chunk_size

    cpu, gpu = torch.device("cpu"), torch.device("cuda")  # only the type is read: no GPU needed
    assert auto_chunk_size(16384, cpu) == 128 and 128 * 16384 * 4 == CPU_SCORE_BYTES
    assert auto_chunk_size(512, cpu) == 4096
    assert auto_chunk_size(16384, gpu) * 16384 * 4 == ACCELERATOR_SCORE_BYTES
    assert auto_chunk_size(2**30, cpu) == 16  # a floor, so huge codebooks still make progress


def test_nearest_with_automatic_chunks_equals_brute_force() -> None:
    z, codebook = _random(300, 5000, 6, seed=4)  # 5000 codes -> 419 rows per block on CPU: a partial last block
    got = nearest_code(z, codebook)
    assert torch.equal(got, torch.cdist(z.double(), codebook.double()).argmin(dim=1))
