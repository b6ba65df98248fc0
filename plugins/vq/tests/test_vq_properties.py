"""Behaviour of the ``vq`` quantizer beyond the generic contract."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from xqgan_core import build
from xqgan_core.quant_ops import codebook_usage


def make(**options: Any) -> Any:
    torch.manual_seed(0)
    return build("quantizer", {"use": "vq", "codebook_size": 64, "dim": 8, **options})


def latents(b: int = 2, c: int = 8, h: int = 4, w: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(seed))


def set_codebook(vq: Any, rows: list[list[float]]) -> None:
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.tensor(rows))


def test_defaults_and_codebook_storage() -> None:
    vq = build("quantizer", {"use": "vq"})
    assert (vq.codebook_size, vq.dim) == (4096, 8)
    assert vq.config.beta == 0.25 and vq.config.l2_norm is True and vq.config.chunk_size == 0  # 0 = automatic block size
    assert isinstance(vq.embedding, torch.nn.Embedding)
    # all codebook-health options are off: only the window-usage buffers join the codebook
    assert sorted(vq.state_dict()) == ["embedding.weight", "last_hit", "train_batches"]
    assert vq.embedding.weight.requires_grad
    assert vq.config.kmeans_init == 0 and vq.config.dead_code_threshold == 0 and vq.config.ema_update is False


def test_init_is_uniform_then_normalised() -> None:
    raw = make(l2_norm=False)
    assert raw.embedding.weight.abs().max() <= 1 / 64
    assert raw.embedding.weight.std() > 0
    scaled = make(l2_norm=False, init_scale=0.5)
    assert 1 / 64 < scaled.embedding.weight.abs().max() <= 0.5
    normed = make()
    torch.testing.assert_close(normed.embedding.weight.norm(dim=1), torch.ones(64))


@pytest.mark.parametrize("l2_norm", [True, False])
def test_index_code_index_round_trip(l2_norm: bool) -> None:
    vq = make(l2_norm=l2_norm, init_scale=1.0).eval()
    indices = torch.randint(0, 64, (3, 5, 6), generator=torch.Generator().manual_seed(1))
    codes = vq.indices_to_codes(indices)
    assert codes.shape == (3, 8, 5, 6)
    assert torch.equal(vq.codes_to_indices(codes), indices)


def test_codes_lie_on_the_unit_sphere_with_l2_norm() -> None:
    vq = make()
    for mode in (vq.train, vq.eval):
        mode()
        z_q = vq(latents() * 5).z_q
        torch.testing.assert_close(z_q.norm(dim=1), torch.ones(2, 4, 4))
    with torch.no_grad():
        raw = make(l2_norm=False, init_scale=3.0)(latents() * 5).z_q
    assert not torch.allclose(raw.norm(dim=1), torch.ones(2, 4, 4), atol=1e-2)


def test_large_codebook_with_chunking_matches_brute_force() -> None:
    torch.manual_seed(0)
    vq = build("quantizer", {"use": "vq", "codebook_size": 16384, "dim": 8, "chunk_size": 100}).eval()
    z = latents(2, 8, 16, 16, seed=3)  # 512 tokens: 5 full chunks and a partial one
    with torch.no_grad():
        out = vq(z)
        tokens = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, 8), dim=1)
        expected = (tokens @ F.normalize(vq.embedding.weight, dim=1).T).argmax(dim=1).view(2, 16, 16)
    assert out.indices.shape == (2, 16, 16) and out.indices.dtype == torch.int64
    assert torch.equal(out.indices, expected)
    assert torch.equal(vq.indices_to_codes(out.indices), out.z_q)


def test_losses_equal_hand_computed_values_without_norm() -> None:
    vq = make(codebook_size=3, dim=2, l2_norm=False, beta=0.5)
    set_codebook(vq, [[0.0, 0.0], [1.0, 1.0], [2.0, -1.0]])
    # tokens (0.2, 0.1) -> code 0 and (1.5, 0.5) -> code 1 (distance 0.5 vs 2.5 to code 2)
    z = torch.tensor([[0.2, 1.5], [0.1, 0.5]]).view(1, 2, 1, 2)
    out = vq.train()(z)
    assert out.indices.tolist() == [[[0, 1]]]
    torch.testing.assert_close(out.z_q, torch.tensor([[0.0, 1.0], [0.0, 1.0]]).view(1, 2, 1, 2))
    sq_err = (0.2**2 + 0.1**2 + 0.5**2 + 0.5**2) / 4
    assert out.losses["codebook"].item() == pytest.approx(sq_err)
    assert out.losses["commitment"].item() == pytest.approx(0.5 * sq_err)
    assert out.loss.item() == pytest.approx(1.5 * sq_err)


def test_losses_equal_hand_computed_values_with_norm() -> None:
    vq = make(codebook_size=2, dim=2)
    set_codebook(vq, [[3.0, 0.0], [0.0, 2.0]])  # used as (1, 0) and (0, 1)
    # (3, 4) -> (0.6, 0.8): cosines 0.6 / 0.8 -> code 1, squared error 0.36 + 0.04
    # (-1, 0): cosines -1 / 0 -> code 1, squared error 1 + 1
    z = torch.tensor([[3.0, -1.0], [4.0, 0.0]]).view(1, 2, 1, 2)
    out = vq.train()(z)
    assert out.indices.tolist() == [[[1, 1]]]
    assert out.losses["codebook"].item() == pytest.approx((0.4 + 2.0) / 4)
    assert out.losses["commitment"].item() == pytest.approx(0.25 * (0.4 + 2.0) / 4)


def test_codebook_learns_only_through_the_codebook_loss() -> None:
    vq = make().train()
    z = latents().requires_grad_(True)
    out = vq(z)
    out.losses["codebook"].backward(retain_graph=True)
    grad = vq.embedding.weight.grad
    used = torch.zeros(64, dtype=torch.bool)
    used[out.indices.unique()] = True
    assert grad is not None and grad[used].abs().sum(dim=1).gt(0).all()
    assert grad[~used].abs().sum() == 0
    assert z.grad is None  # the codebook loss stops the gradient to the encoder

    vq.zero_grad()
    (out.losses["commitment"] + out.z_q.sum()).backward()
    assert vq.embedding.weight.grad is None or vq.embedding.weight.grad.abs().sum() == 0
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_straight_through_gradient_passes_the_normalisation() -> None:
    vq = make().train()
    z = latents().requires_grad_(True)
    w = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(7))
    (vq(z).z_q * w).sum().backward()
    z_ref = z.detach().clone().requires_grad_(True)
    (F.normalize(z_ref, dim=1) * w).sum().backward()
    torch.testing.assert_close(z.grad, z_ref.grad)


def test_stats_describe_the_batch() -> None:
    vq = make()
    out = vq.eval()(latents())
    stats = {name: float(value) for name, value in out.stats.items()}
    assert stats == pytest.approx({name: float(v) for name, v in codebook_usage(out.indices, 64).items()})
    train = vq.train()(latents())
    assert set(train.stats) == {"perplexity", "utilization", "window_utilization", "dead_codes"}
    # first training batch: the window holds this batch only
    assert train.stats["window_utilization"] == pytest.approx(train.stats["utilization"])
    assert train.stats["dead_codes"] == 64 - round(float(train.stats["utilization"]) * 64 / 100)
    assert 1.0 <= out.stats["perplexity"] <= 32 and 0 < out.stats["utilization"] <= 100 * 32 / 64


def test_bf16_input_gives_bf16_codes_from_an_fp32_search() -> None:
    vq = make().eval()
    z = latents().bfloat16()
    with torch.no_grad():
        out = vq(z)
        ref = vq(z.float())
    assert out.z_q.dtype == torch.bfloat16
    assert torch.equal(out.indices, ref.indices)
    assert torch.equal(out.z_q, ref.z_q.bfloat16())
    assert all(v.dtype == torch.float32 for v in out.losses.values())


def test_autocast_bf16_keeps_fp32_input_dtype_and_indices() -> None:
    vq = make().train()
    z = latents()
    ref = vq(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vq(z)
    assert out.z_q.dtype == torch.float32
    assert torch.equal(out.indices, ref.indices)
    torch.testing.assert_close(out.losses["codebook"], ref.losses["codebook"])


def test_wrong_latent_shape_is_rejected() -> None:
    vq = make()
    with pytest.raises(ValueError, match=r"\(B, 8, H, W\)"):
        vq(torch.zeros(2, 4, 4, 4))
    with pytest.raises(ValueError):
        vq.indices_to_codes(torch.zeros(2, 4, dtype=torch.long))
