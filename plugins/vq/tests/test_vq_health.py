"""Codebook health options of ``vq``: k-means init, dead-code restarts, EMA codebook, usage statistics."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from xqgan_core import build


def make(**options: Any) -> Any:
    torch.manual_seed(0)
    return build("quantizer", {"use": "vq", **options}).train()


def as_latent(points: torch.Tensor) -> torch.Tensor:
    """``(N, D)`` tokens -> a ``(1, D, 1, N)`` latent whose flattened tokens are ``points`` in order."""
    return points.t().reshape(1, points.shape[1], 1, points.shape[0]).contiguous()


def tokens_of(z: torch.Tensor) -> torch.Tensor:
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])


def set_codebook(vq: Any, rows: torch.Tensor) -> None:
    with torch.no_grad():
        vq.embedding.weight.copy_(rows)
        if vq.config.ema_update:  # keep the EMA state consistent with the hand-made codebook
            vq.ema_sum.copy_(rows * vq.ema_count.unsqueeze(1))


def clusters(centres: torch.Tensor, per: int, spread: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    points = centres.repeat_interleave(per, dim=0)
    points = points + spread * torch.randn(points.shape, generator=g)
    return points[torch.randperm(points.shape[0], generator=g)]


def nearest_distance(targets: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    return torch.cdist(targets, codes).min(dim=1).values


def snapshot(vq: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in vq.state_dict().items()}


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---- k-means init -------------------------------------------------------------------------------------------


def test_kmeans_init_places_a_code_at_every_cluster() -> None:
    centres = torch.tensor([[5.0, 5.0], [-5.0, 5.0], [5.0, -5.0], [-5.0, -5.0], [0.0, 0.0]])
    points = clusters(centres, per=80, spread=0.1)
    vq = make(codebook_size=5, dim=2, l2_norm=False, kmeans_init=10)
    assert not bool(vq.initialised)
    out = vq(as_latent(points))
    assert bool(vq.initialised)
    assert nearest_distance(centres, vq.embedding.weight.detach()).max() < 0.05
    # the forward that initialised already quantizes with the new codebook: one code per cluster
    labels = torch.cdist(points, centres).argmin(dim=1)
    idx = out.indices.flatten()
    for c in range(5):
        assert idx[labels == c].unique().numel() == 1
    assert idx.unique().numel() == 5


def test_spherical_kmeans_init_with_l2_norm() -> None:
    raw = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [-1.0, -1.0, 0], [1.0, -1.0, -1.0]])
    directions = F.normalize(raw, dim=1)
    g = torch.Generator().manual_seed(1)
    points = clusters(directions, per=60, spread=0.03)
    points = points * (0.5 + 3 * torch.rand(points.shape[0], 1, generator=g))  # lengths do not matter
    vq = make(codebook_size=5, dim=3, kmeans_init=10)
    vq(as_latent(points))
    rows = vq.embedding.weight.detach()
    torch.testing.assert_close(rows.norm(dim=1), torch.ones(5))
    assert nearest_distance(directions, rows).max() < 0.03


def test_kmeans_gathers_batches_until_it_has_enough_tokens() -> None:
    vq = make(codebook_size=16, dim=2, l2_norm=False, kmeans_init=3, init_scale=1.0)
    before = vq.embedding.weight.detach().clone()
    g = torch.Generator().manual_seed(2)
    first, second = torch.randn(8, 2, generator=g), torch.randn(8, 2, generator=g)
    out = vq(as_latent(first))  # 8 tokens < 16 codes: not yet, and the current codebook quantizes
    assert not bool(vq.initialised)
    assert torch.equal(vq.embedding.weight, before)
    assert torch.equal(out.indices.flatten(), torch.cdist(first, before).argmin(dim=1))
    vq.eval()(as_latent(torch.randn(8, 2, generator=g)))  # eval batches are not gathered
    vq.train()(as_latent(second))
    assert bool(vq.initialised)
    # 16 distinct tokens for 16 codes: k-means puts one code on each gathered token
    gathered = torch.cat([first, second])
    assert nearest_distance(gathered, vq.embedding.weight.detach()).max() < 1e-6


def test_kmeans_batches_waits_for_that_many_training_batches() -> None:
    vq = make(codebook_size=4, dim=2, l2_norm=False, kmeans_init=2, kmeans_batches=3)
    before = vq.embedding.weight.detach().clone()
    for step in range(3):
        assert torch.equal(vq.embedding.weight, before) and not bool(vq.initialised)
        vq(torch.randn(1, 2, 4, 4))  # 16 tokens: enough tokens from the first batch on
    assert bool(vq.initialised) and not torch.equal(vq.embedding.weight, before)


def test_resumed_state_does_not_initialise_again() -> None:
    options = {"codebook_size": 8, "dim": 2, "l2_norm": False, "kmeans_init": 3}
    a = make(**options)
    a(torch.randn(2, 2, 4, 4))
    assert bool(a.initialised)
    torch.manual_seed(5)
    b = build("quantizer", {"use": "vq", **options}).train()
    b.load_state_dict(a.state_dict())
    b(torch.randn(2, 2, 4, 4) * 10)  # a fresh module would re-initialise on this batch
    assert torch.equal(b.embedding.weight, a.embedding.weight)
    fresh = make(**options)
    before = fresh.embedding.weight.detach().clone()
    fresh(torch.randn(2, 2, 4, 4))
    assert not torch.equal(fresh.embedding.weight, before)


# ---- dead-code restarts -------------------------------------------------------------------------------------


@pytest.mark.parametrize("l2_norm", [False, True])
def test_dead_codes_are_restarted_from_tokens_of_the_batch(l2_norm: bool) -> None:
    vq = make(codebook_size=8, dim=4, l2_norm=l2_norm, dead_code_threshold=1.0, usage_decay=0.9)
    near = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]])
    far = -100.0 * torch.ones(6, 4)  # never nearest: the data lies in the positive orthant
    set_codebook(vq, torch.cat([near, far]))
    g = torch.Generator().manual_seed(3)
    batch1, batch2 = torch.rand(64, 4, generator=g) + 0.1, torch.rand(64, 4, generator=g) + 0.1

    out1 = vq(as_latent(batch1))
    assert set(out1.indices.unique().tolist()) <= {0, 1}
    assert out1.stats["restarted"] == 0 and out1.stats["dead_codes"] == 6
    torch.testing.assert_close(vq.usage[2:], torch.full((6,), 0.9))

    out2 = vq(as_latent(batch2))
    assert out2.stats["restarted"] == 6
    rows = vq.embedding.weight.detach()
    assert torch.equal(rows[:2], near)  # live codes untouched
    candidates = F.normalize(batch2, dim=1) if l2_norm else batch2
    match = torch.cdist(rows[2:], candidates).min(dim=1)
    assert match.values.max() < 1e-6  # every restarted code is a token of the incoming batch ...
    assert match.indices.unique().numel() == 6  # ... and no two the same token
    # revived: every restarted code quantizes part of the batch, and got enough tokens to stay alive
    assert set(range(2, 8)) <= set(out2.indices.unique().tolist())
    assert bool((vq.usage[2:] >= 1.0).all())


def test_restart_resets_the_ema_state_of_the_code() -> None:
    # ema_decay 1 freezes the EMA, so what the restart wrote is what the forward leaves
    vq = make(codebook_size=4, dim=2, l2_norm=False, dead_code_threshold=0.5, ema_update=True, ema_decay=1.0)
    set_codebook(vq, torch.tensor([[0.0, 0.0], [50.0, 50.0], [60.0, 60.0], [70.0, 70.0]]))
    vq(torch.rand(1, 2, 4, 4))  # only code 0 is hit
    z = torch.rand(1, 2, 4, 4) + 1
    out = vq(z)
    assert out.stats["restarted"] == 3
    torch.testing.assert_close(vq.ema_count, torch.tensor([1.0, 0.5, 0.5, 0.5]))
    rows = vq.embedding.weight.detach()
    assert nearest_distance(rows[1:], tokens_of(z)).max() < 1e-4  # the codes are (smoothed) tokens of the batch
    torch.testing.assert_close(vq.ema_sum[1:], 0.5 * rows[1:], rtol=1e-4, atol=1e-4)


# ---- EMA codebook -------------------------------------------------------------------------------------------


def test_ema_update_moves_codes_to_assigned_means_without_gradient() -> None:
    vq = make(codebook_size=3, dim=2, l2_norm=False, ema_update=True, ema_decay=0.5, eps=1e-9)
    assert not vq.embedding.weight.requires_grad
    assert [p for p in vq.parameters() if p.requires_grad] == []  # an optimizer gets nothing to step
    old = torch.tensor([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0]])
    set_codebook(vq, old)
    z = as_latent(torch.tensor([[1.0, 0.0], [0.0, 1.0], [4.0, 1.0]])).requires_grad_(True)
    out = vq(z)
    assert out.indices.flatten().tolist() == [0, 0, 1]
    assert torch.equal(out.z_q.detach(), as_latent(old[[0, 0, 1]]))  # this batch used the codebook it found
    assert set(out.losses) == {"commitment"}
    # counts 0.5*1 + 0.5*[2, 1, 0]; sums 0.5*rows + 0.5*[(1, 1), (4, 1), (0, 0)]
    expected = torch.tensor([[0.5, 0.5], [4.0, 0.5], [0.0, 2.0]]) / torch.tensor([[1.5], [1.0], [0.5]])
    torch.testing.assert_close(vq.embedding.weight.detach(), expected)
    (out.losses["commitment"] + out.z_q.sum()).backward()
    assert vq.embedding.weight.grad is None
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_ema_update_with_l2_norm_keeps_unit_codes_and_approaches_the_mean_direction() -> None:
    vq = make(codebook_size=4, dim=3, ema_update=True, ema_decay=0.8)
    g = torch.Generator().manual_seed(4)
    target = F.normalize(torch.tensor([1.0, 2.0, 3.0]), dim=0)
    cosines = []
    for _ in range(5):
        points = target + 0.1 * torch.randn(32, 3, generator=g)
        vq(as_latent(points))
        rows = vq.embedding.weight.detach()
        torch.testing.assert_close(rows.norm(dim=1), torch.ones(4))
        cosines.append(float((rows @ target).max()))
    assert cosines == sorted(cosines) and cosines[-1] > 0.99


# ---- usage statistics ---------------------------------------------------------------------------------------


def test_window_utilization_over_a_hand_made_sequence() -> None:
    codes = 10.0 * torch.eye(4)
    hits = [[0], [1], [1, 2], [3], [3]]
    expected_window = [25.0, 50.0, 50.0, 75.0, 25.0]  # codes hit in this batch or the one before
    for window, expect in ((2, expected_window), (1, [25.0, 25.0, 50.0, 25.0, 25.0]), (100, [25, 50, 75, 100, 100])):
        vq = make(codebook_size=4, dim=4, l2_norm=False, usage_window=window)
        set_codebook(vq, codes)
        for step, (hit, want) in enumerate(zip(hits, expect)):
            out = vq(as_latent(codes[hit]))
            assert out.stats["window_utilization"] == want, (window, step)
            assert out.stats["dead_codes"] == 4 - want * 4 / 100
            vq.eval()(as_latent(codes))  # eval forwards neither count nor move the window
            vq.train()
        assert vq.last_hit.tolist() == [0, 2, 2, 4] and int(vq.train_batches) == 5


def test_dead_codes_stat_follows_the_usage_ema_when_restarts_are_on() -> None:
    vq = make(codebook_size=4, dim=4, l2_norm=False, dead_code_threshold=2.0, usage_decay=0.5)
    codes = 10.0 * torch.eye(4)
    set_codebook(vq, codes)
    out = vq(as_latent(codes[[0, 0, 0, 0, 1, 1, 2]]))
    # usage 0.5*2 + 0.5*[4, 2, 1, 0] = [3, 2, 1.5, 1]: codes 2 and 3 are below 2
    torch.testing.assert_close(vq.usage, torch.tensor([3.0, 2.0, 1.5, 1.0]))
    assert out.stats["dead_codes"] == 2 and out.stats["window_utilization"] == 75.0


# ---- modes and state ----------------------------------------------------------------------------------------

ALL_ON = {"codebook_size": 16, "dim": 4, "kmeans_init": 2, "dead_code_threshold": 1.0, "ema_update": True,
          "usage_window": 3}


@pytest.mark.parametrize("l2_norm", [True, False])
def test_eval_mode_and_codes_to_indices_change_nothing(l2_norm: bool) -> None:
    vq = make(**ALL_ON, l2_norm=l2_norm)
    for _ in range(3):
        vq(torch.randn(2, 4, 4, 4))
    state = snapshot(vq)
    vq.eval()
    for seed in range(3):
        z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(seed)).requires_grad_(True)
        out = vq(z)
        out.loss.backward()
        assert set(out.stats) == {"perplexity", "utilization"}
    vq.train().codes_to_indices(torch.randn(2, 4, 4, 4))
    assert_same_state(state, snapshot(vq))


def test_eval_forwards_do_not_gather_for_kmeans() -> None:
    vq = make(codebook_size=64, dim=4, kmeans_init=2)
    vq.eval()
    for _ in range(3):
        vq(torch.randn(2, 4, 4, 4))  # 3 x 32 tokens would be enough if they counted
    vq.train()(torch.randn(2, 4, 4, 4))
    assert not bool(vq.initialised)
    vq(torch.randn(2, 4, 4, 4))
    assert bool(vq.initialised)


def test_buffers_round_trip_and_a_resumed_module_continues_identically() -> None:
    a = make(**ALL_ON, l2_norm=False)
    for _ in range(3):
        a(torch.randn(2, 4, 4, 4))
    assert sorted(a.state_dict()) == sorted(
        ["embedding.weight", "last_hit", "train_batches", "initialised", "usage", "ema_count", "ema_sum"]
    )
    torch.manual_seed(7)
    b = build("quantizer", {"use": "vq", **ALL_ON, "l2_norm": False}).train()
    b.load_state_dict(a.state_dict())
    assert_same_state(snapshot(a), snapshot(b))
    z = torch.randn(2, 4, 4, 4) * 3
    torch.manual_seed(11)
    out_a = a(z)
    torch.manual_seed(11)
    out_b = b(z)
    assert torch.equal(out_a.indices, out_b.indices)
    assert {k: float(v) for k, v in out_a.stats.items()} == {k: float(v) for k, v in out_b.stats.items()}
    assert_same_state(snapshot(a), snapshot(b))


def test_defaults_train_like_plain_vq() -> None:
    vq = make(codebook_size=64, dim=8)
    before = vq.embedding.weight.detach().clone()
    out = vq(torch.randn(2, 8, 4, 4))
    assert torch.equal(vq.embedding.weight, before)
    assert set(out.losses) == {"codebook", "commitment"}
    assert vq.embedding.weight.requires_grad


# ---- torch.distributed --------------------------------------------------------------------------------------

_WORKER = textwrap.dedent(
    """
    import sys, torch, torch.distributed as dist
    from xqgan_core import build
    rank, world, rendezvous, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    torch.manual_seed(0)  # same initial parameters on every rank, as DDP would broadcast them
    vq = build("quantizer", {"use": "vq", "codebook_size": 16, "dim": 2, "l2_norm": False, "kmeans_init": 3,
                             "dead_code_threshold": 1.0, "ema_update": True}).train()
    torch.manual_seed(100 + rank)  # different data and different RNG streams per rank
    restarted = 0.0
    for step in range(4):
        out = vq(torch.randn(1, 2, 4, 4) * (1 + step) + rank)
        restarted += out.stats["restarted"]
    torch.save({"state": vq.state_dict(), "restarted": restarted}, path)
    dist.destroy_process_group()
    """
)


def test_ranks_keep_identical_codebooks_under_torch_distributed(tmp_path: Path) -> None:
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.fail("this torch build has no gloo backend for torch.distributed")
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    procs = [
        subprocess.Popen([sys.executable, str(script), str(r), "2", str(tmp_path / "rdv"), str(tmp_path / f"{r}.pt")],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for r in range(2)
    ]
    for p in procs:
        output, _ = p.communicate(timeout=120)
        assert p.returncode == 0, output.decode()
    results = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    assert bool(results[0]["state"]["initialised"])
    assert results[0]["restarted"] > 0  # the restart path was exercised, not only the EMA
    assert results[0]["restarted"] == results[1]["restarted"]
    assert_same_state(results[0]["state"], results[1]["state"])
