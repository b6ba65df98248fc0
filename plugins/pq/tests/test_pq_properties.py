"""Behaviour of the ``pq`` quantizer beyond the generic contract."""

from __future__ import annotations

import copy
from typing import Any

import attrs
import pytest
import torch
import torch.nn.functional as F

from xqgan_core import build, catalog
from xqgan_core.model import TokenizerModel

TINY_VQ = {"use": "vq", "codebook_size": 16, "dim": 4}
RAW_VQ = {**TINY_VQ, "l2_norm": False, "init_scale": 1.0}
_TINY = {"codebook_size": 16, "dim": 4, "bits": 4, "levels": 2, "branches": 2, "scales": [1, 2, 4], "phi_count": 0,
         "code": TINY_VQ, "branch": TINY_VQ}


def tiny(name: str, **extra: Any) -> dict[str, Any]:
    """Small settings for any installed quantizer, applied only where its Config has the option."""
    fields = attrs.fields_dict(catalog().resolve("quantizer", name).load().Config)
    wanted = {**_TINY, **extra}
    return {"use": name, **{k: copy.deepcopy(v) for k, v in wanted.items() if k in fields}}


def make_pq(branches: int = 2, branch: dict[str, Any] | None = None) -> Any:
    torch.manual_seed(0)
    return build("quantizer", {"use": "pq", "branches": branches, "branch": branch or RAW_VQ})


def latents(b: int = 2, c: int = 8, h: int = 4, w: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(seed))


def flat(indices: Any) -> torch.Tensor:
    return torch.cat([i.flatten() for i in indices]) if isinstance(indices, (list, tuple)) else indices.flatten()


def multi_level_names() -> list[str]:
    return [n for n in catalog().names("quantizer") if build("quantizer", tiny(n)).num_levels > 1]


# ------------------------------------------------------------------------------------------------------------------
# construction


def test_defaults_and_separate_branch_codebooks() -> None:
    pq = build("quantizer", {"use": "pq"})
    assert (pq.config.branches, pq.dim, pq.codebook_size, pq.num_levels) == (2, 16, 4096, 1)
    assert [k for k in pq.state_dict() if k.endswith("embedding.weight")] == [
        "branches.0.embedding.weight", "branches.1.embedding.weight"]
    assert not torch.equal(pq.branches[0].embedding.weight, pq.branches[1].embedding.weight)


def test_num_levels_and_codebook_size_come_from_the_branch() -> None:
    branch = {"use": "rq", "levels": 5, "code": {"use": "vq", "dim": 6, "codebook_size": 10}}
    pq = build("quantizer", {"use": "pq", "branches": 3, "branch": branch})
    assert (pq.dim, pq.codebook_size, pq.num_levels) == (18, 10, 5)
    assert all(len(b.codes) == 5 for b in pq.branches)


def test_wrong_inputs_are_rejected() -> None:
    pq = make_pq()
    with pytest.raises(ValueError, match=r"\(B, 8, H, W\)"):
        pq(latents(c=4))
    with pytest.raises(ValueError, match="keep is only accepted"):
        pq(latents(), keep=torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="branch dim"):
        pq.indices_to_codes(torch.zeros(2, 3, 4, 4, dtype=torch.long))


# ------------------------------------------------------------------------------------------------------------------
# the forward pass


def test_branches_quantize_their_channel_groups_independently() -> None:
    pq = make_pq(branches=3).train()
    z = latents(c=12, seed=1)
    out = pq(z)
    parts = [branch(z[:, 4 * p : 4 * p + 4]) for p, branch in enumerate(pq.branches)]
    torch.testing.assert_close(out.z_q, torch.cat([o.z_q for o in parts], dim=1))
    assert out.indices.shape == (2, 3, 4, 4) and out.indices.dtype == torch.int64
    for p, o in enumerate(parts):
        assert torch.equal(out.indices[:, p], o.indices)
        assert out.stats[f"branch{p}/perplexity"] == o.stats["perplexity"]
    for name in ("codebook", "commitment"):
        torch.testing.assert_close(out.losses[name], torch.stack([o.losses[name] for o in parts]).mean())
    for name in ("perplexity", "utilization"):
        assert out.stats[name] == pytest.approx(sum(o.stats[name] for o in parts) / 3)


def test_gradients_reach_each_group_and_each_codebook() -> None:
    pq = make_pq(branches=2).train()
    z = latents(seed=2).requires_grad_(True)
    out = pq(z)
    w = torch.randn_like(z)
    (out.z_q * w).sum().backward(retain_graph=True)
    torch.testing.assert_close(z.grad, w)  # unnormalised vq branches: identity straight-through per group
    out.losses["codebook"].backward()
    for p, branch in enumerate(pq.branches):
        used = out.indices[:, p].unique()
        assert branch.embedding.weight.grad[used].abs().sum(dim=1).gt(0).all()


@pytest.mark.parametrize("l2_norm", [True, False])
@pytest.mark.parametrize("nested", ["vq", "rq"])
def test_one_branch_of_one_level_is_exactly_plain_vq(l2_norm: bool, nested: str) -> None:
    code = {**TINY_VQ, "l2_norm": l2_norm, "init_scale": 1.0}
    vq = build("quantizer", code).train()
    branch = code if nested == "vq" else {"use": "rq", "levels": 1, "code": code}
    torch.manual_seed(1)  # a different init: the weights must come from the copied state dict
    pq = build("quantizer", {"use": "pq", "branches": 1, "branch": branch}).train()
    (pq.branches[0] if nested == "vq" else pq.branches[0].codes[0]).load_state_dict(vq.state_dict())
    z = latents(c=4, seed=3) * 2
    z_vq, z_pq = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    a, b = vq(z_vq), pq(z_pq)
    assert torch.equal(b.indices.reshape(a.indices.shape), a.indices)
    assert b.indices.shape == ((2, 1, 4, 4) if nested == "vq" else (2, 1, 1, 4, 4))
    # bit-exact, except rq's straight-through on z vs vq's on the normalised input (last-bit rounding)
    exact = nested == "vq" or not l2_norm
    torch.testing.assert_close(b.z_q, a.z_q, rtol=0, atol=0 if exact else 1e-6)
    with torch.no_grad():
        assert torch.equal(pq(z).z_q, vq(z).z_q)
    assert a.losses.keys() == b.losses.keys()
    for name in a.losses:
        torch.testing.assert_close(b.losses[name], a.losses[name], rtol=0, atol=0)
    for name in ("perplexity", "utilization"):
        assert b.stats[name] == a.stats[name]
    if exact:  # the same straight-through estimator: the same gradient
        w = torch.randn_like(z)
        (a.z_q * w + a.loss).sum().backward()
        (b.z_q * w + b.loss).sum().backward()
        torch.testing.assert_close(z_pq.grad, z_vq.grad, rtol=0, atol=0)


def test_nested_stats_are_prefixed_by_branch_then_level() -> None:
    pq = make_pq(branches=2, branch={"use": "rq", "levels": 3, "code": RAW_VQ})
    stats = pq(latents(seed=4)).stats
    for p in range(2):
        for level in range(3):
            value = stats[f"branch{p}/level{level}/utilization"]
            assert isinstance(value, torch.Tensor) and value.ndim == 0
        assert stats[f"branch{p}/perplexity"] == pytest.approx(
            sum(stats[f"branch{p}/level{level}/perplexity"] for level in range(3)) / 3)
    assert stats["perplexity"] == pytest.approx((stats["branch0/perplexity"] + stats["branch1/perplexity"]) / 2)
    assert not any(k.startswith("level") for k in stats)


# ------------------------------------------------------------------------------------------------------------------
# codes <-> indices


def test_index_code_index_round_trip() -> None:
    pq = make_pq(branches=3, branch=TINY_VQ).eval()
    indices = torch.randint(0, 16, (3, 3, 5, 6), generator=torch.Generator().manual_seed(5))
    codes = pq.indices_to_codes(indices)
    assert codes.shape == (3, 12, 5, 6)
    for p, branch in enumerate(pq.branches):  # channel group p holds branch p's codes
        assert torch.equal(codes[:, 4 * p : 4 * p + 4], branch.indices_to_codes(indices[:, p]))
    assert torch.equal(pq.codes_to_indices(codes), indices)
    assert torch.equal(pq(codes).indices, indices)


@pytest.mark.parametrize("name", catalog().names("quantizer"))
def test_index_layout_and_inversion_over_each_installed_quantizer(name: str) -> None:
    torch.manual_seed(0)
    pq = build("quantizer", {"use": "pq", "branches": 2, "branch": tiny(name)}).eval()
    z = latents(c=pq.dim, seed=6)
    groups = z.split(pq.dim // 2, dim=1)
    with torch.no_grad():
        out = pq(z)
        own = [branch(g).indices for branch, g in zip(pq.branches, groups)]
        if isinstance(own[0], torch.Tensor):
            assert out.indices.shape == (2, 2, *own[0].shape[1:])
            for p in range(2):
                assert torch.equal(out.indices[:, p], own[p])
        else:  # multi-scale: one (B, P, s, s) tensor per scale
            assert isinstance(out.indices, list) and len(out.indices) == len(own[0])
            for s, scale in enumerate(out.indices):
                assert scale.shape == (2, 2, *own[0][s].shape[1:])
                for p in range(2):
                    assert torch.equal(scale[:, p], own[p][s])
        torch.testing.assert_close(pq.indices_to_codes(out.indices), out.z_q, atol=1e-5, rtol=1e-4)
        assert torch.equal(flat(pq.codes_to_indices(z)), flat(out.indices))
    x = z.clone().requires_grad_(True)
    train = pq.train()(x)
    (train.z_q * torch.randn_like(x) + train.loss).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_token_layout_is_branch_major_and_names_each_branch_and_its_levels() -> None:
    pq = make_pq(branches=2, branch=TINY_VQ)
    idx = pq(latents(seed=10)).indices  # (B, P, H, W)
    layout = pq.token_layout(4, 4)
    assert (layout.length, layout.tokens_per_step, layout.branches) == (16, 2, 2)
    assert layout.codebooks == ("branch0", "branch1")
    seq = layout.to_sequence(idx)
    assert torch.equal(seq[1, 6], idx[1, :, 1, 2])  # step 6 = position (1, 2); token p = branch p
    groups = layout.codebook_tokens(seq)
    assert list(groups) == ["branch0", "branch1"] and torch.equal(groups["branch1"], idx[:, 1].flatten())
    nested = make_pq(branches=2, branch={"use": "rq", "levels": 2, "code": TINY_VQ})
    idx = nested(latents(seed=10)).indices  # (B, P, N, H, W)
    layout = nested.token_layout(4, 4)
    assert layout.codebooks == ("branch0/level0", "branch0/level1", "branch1/level0", "branch1/level1")
    seq = layout.to_sequence(idx)
    assert torch.equal(seq[0, 5], idx[0, :, :, 1, 1].flatten())  # branch-major within a step: K = P * N
    assert torch.equal(layout.codebook_tokens(seq)["branch1/level0"], idx[:, 1, 0].flatten())
    shared = make_pq(branches=2, branch={"use": "rq", "levels": 2, "code": TINY_VQ, "shared_codebook": True})
    assert list(shared.token_layout(4, 4).codebook_sizes) == ["branch0", "branch1"]
    multi = make_pq(branches=2, branch={"use": "msrq", "scales": [1, 2, 4], "phi_count": 0, "code": TINY_VQ})
    idx = multi(latents(seed=10)).indices  # a list of (B, P, s, s)
    layout = multi.token_layout(4, 4)
    assert (layout.length, layout.tokens_per_step) == (1 + 4 + 16, 2)
    seq = layout.to_sequence(idx)
    assert torch.equal(seq[:, 1:5, 1], idx[1][:, 1].flatten(1))  # scale 1's 2x2 map of branch 1, row-major
    assert all(torch.equal(a, b) for a, b in zip(layout.from_sequence(seq), idx))


@pytest.mark.parametrize("name", catalog().names("quantizer"))
def test_token_layout_covers_every_index_over_each_installed_quantizer(name: str) -> None:
    pq = build("quantizer", {"use": "pq", "branches": 2, "branch": tiny(name)}).eval()
    indices = pq(latents(c=pq.dim, seed=11)).indices
    layout = pq.token_layout(4, 4)
    groups = layout.codebook_tokens(layout.to_sequence(indices))
    assert all(key.startswith(("branch0", "branch1")) for key in groups)
    assert sum(g.numel() for g in groups.values()) == flat(indices).numel()


# ------------------------------------------------------------------------------------------------------------------
# one dropout draw for all branches


def spy(pq: Any) -> tuple[list[int], list[Any]]:
    """Count the ``draw_keep`` calls of pq and of each branch (``[pq, branch0, ...]``) and record the ``keep`` each
    branch's forward receives."""
    modules = [pq, *pq.branches]
    draw_calls = [0] * len(modules)
    received: list[Any] = []
    for i, module in enumerate(modules):
        draw = module.draw_keep

        def counted_draw(batch: int, device: torch.device, i: int = i, draw: Any = draw) -> torch.Tensor:
            draw_calls[i] += 1
            return draw(batch, device)

        module.draw_keep = counted_draw
    for branch in pq.branches:
        forward = branch.forward

        def recorded_forward(z: torch.Tensor, keep: Any = None, forward: Any = forward) -> Any:
            received.append(keep)
            return forward(z, keep=keep)

        branch.forward = recorded_forward
    return draw_calls, received


def _dropped_indices(indices: Any, b: int, kept: int) -> torch.Tensor:
    """Sample b's indices (all branches) at the levels/scales it did not keep."""
    if isinstance(indices, list):
        return torch.cat([scale[b].flatten() for scale in indices[kept:]] or [torch.zeros(0, dtype=torch.long)])
    return indices[b, :, kept:].flatten()


@pytest.mark.parametrize("name", multi_level_names())
def test_all_branches_receive_the_same_draw(name: str) -> None:
    branch = tiny(name, dropout={"rate": 1.0, "min_levels": 1})
    pq = make_pq(branches=3, branch=branch).train()
    draw_calls, received = spy(pq)
    torch.manual_seed(7)
    out = pq(latents(b=8, c=pq.dim, seed=7))
    assert draw_calls == [1, 0, 0, 0]  # drawn once, by pq (with branch 0's settings), not by the branches
    assert len(received) == 3 and all(levels is received[0] for levels in received)
    kept = received[0]
    assert kept.shape == (8,) and kept.min() >= 1 and kept.min() < pq.num_levels  # the draw did drop levels
    for b in range(8):
        assert _dropped_indices(out.indices, b, int(kept[b])).eq(0).all()
    torch.testing.assert_close(pq.indices_to_codes(out.indices, keep=kept), out.z_q, atol=1e-5, rtol=1e-4)

    # eval: nothing dropped; an explicit draw is passed through unchanged
    pq.eval()
    received.clear()
    pq(latents(b=8, c=pq.dim, seed=7))
    assert all(levels.eq(pq.num_levels).all() for levels in received)
    received.clear()
    explicit = torch.arange(8) % pq.num_levels + 1
    pq(latents(b=8, c=pq.dim, seed=7), keep=explicit)
    assert len(received) == 3 and all(levels is explicit for levels in received)


def test_the_draw_uses_the_first_branchs_dropout_settings() -> None:
    pq = make_pq(branches=2, branch={"use": "rq", "levels": 6, "code": RAW_VQ,
                                     "dropout": {"rate": 1.0, "min_levels": 3}}).train()
    assert pq.level_dropout() is pq.branches[0].config.dropout
    torch.manual_seed(8)
    drawn = pq.draw_keep(400, torch.device("cpu"))
    assert set(drawn.tolist()) == {3, 4, 5, 6}
    assert pq.eval().draw_keep(5, torch.device("cpu")).eq(6).all()
    assert make_pq().train().draw_keep(3, torch.device("cpu")).eq(1).all()  # single-level branches keep their level


# ------------------------------------------------------------------------------------------------------------------
# the CNN pipeline with several branches (the reference crashes on CNN + product quantization)

CNN_TINY = {"use": "cnn", "channels": 32, "channel_mult": [1, 2], "num_res_blocks": 1, "z_channels": 32,
            "mid_attention": False, "level_attention": False}


def test_cnn_tokenizer_with_two_product_branches_trains() -> None:
    torch.manual_seed(0)
    quantizer = build("quantizer", {"use": "pq", "branches": 2, "branch": {
        "use": "rq", "levels": 2, "dropout": {"rate": 0.5, "min_levels": 1},
        "code": {"use": "vq", "dim": 8, "codebook_size": 32}}})
    model = TokenizerModel(build("encoder", {**CNN_TINY, "out_dim": 16}), quantizer,
                           build("decoder", {**CNN_TINY, "in_dim": 16}))
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(9)) * 2 - 1
    recon, quant = model.train()(images)
    assert recon.shape == images.shape
    assert quant.indices.shape == (2, 2, 2, 16, 16)  # (B, P, N, h, w)
    loss = F.mse_loss(recon, images) + quant.loss
    loss.backward()
    for name, p in model.encoder.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), f"encoder.{name} got no gradient"
    assert sum(p.grad.abs().sum() for p in model.encoder.parameters()) > 0
    for branch in quantizer.branches:
        for q in branch.codes:
            assert q.embedding.weight.grad.abs().sum() > 0

    model.eval()
    indices = model.encode(images)
    with torch.no_grad():
        expected = model.decoder(quantizer(model.encoder(images)).z_q)
    torch.testing.assert_close(model.decode(indices), expected)
