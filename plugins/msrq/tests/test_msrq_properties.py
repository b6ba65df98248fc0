"""Behaviour of ``msrq`` beyond the generic contract: VAR's algorithm, phi sharing, dropout, losses, token layout."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from xqgan_core import ConfigError, build, catalog
from xqgan_core.quant_ops import flatten_scales, token_count, unflatten_scales
from xqgan_plugin_msrq import phi_schedule

PAPER = (1, 1, 2, 3, 3, 4, 5, 6, 8, 11)
VAR = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
TINY: dict[str, Any] = {"scales": [1, 2, 4], "phi_count": 0, "code": {"use": "vq", "dim": 8, "codebook_size": 32}}
INSTALLED = catalog(refresh=True).names("quantizer")


def make(**options: Any) -> Any:
    torch.manual_seed(0)
    return build("quantizer", {"use": "msrq", **{**TINY, **options}})


def latents(b: int = 3, c: int = 8, size: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, c, size, size, generator=torch.Generator().manual_seed(seed))


def var_reference(
    m: Any, z: torch.Tensor, levels: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor], dict[str, list[torch.Tensor]]]:
    """VAR's forward written out independently (vq inner with l2_norm, raw codes, phi by the schedule).

    Returns f_hat, the masked indices and the per-scale losses (NaN at a scale no sample keeps)."""
    weight = m.code.embedding.weight
    b, c, size, _ = z.shape
    f = z.float()
    rest, f_hat = f.clone(), torch.zeros_like(f)
    indices, codebook, commitment = [], [], []
    for k, s in enumerate(m.scales):
        r = F.adaptive_avg_pool2d(rest, s)
        tokens = F.normalize(r.permute(0, 2, 3, 1).reshape(-1, c), dim=1)
        idx = (tokens @ F.normalize(weight, dim=1).T).argmax(dim=1).view(b, s, s)
        h = weight[idx].permute(0, 3, 1, 2)
        if s != size:
            h = F.interpolate(h, size=(size, size), mode="bicubic", align_corners=False)
        conv = m.phi[m.phi_index[k]]
        h = 0.5 * h + 0.5 * F.conv2d(h, conv.weight, conv.bias, padding=1)
        keep = (levels > k).float().view(b, 1, 1, 1)
        f_hat = f_hat + h * keep
        rest = rest - h
        n = keep.sum() * c * size * size
        codebook.append(((f_hat - f) ** 2 * keep).sum() / n)
        commitment.append(0.25 * ((f_hat - f) ** 2 * keep).sum() / n)
        indices.append(idx * (levels > k).view(b, 1, 1))
    return f_hat, indices, {"codebook": codebook, "commitment": commitment}


# -- configuration -------------------------------------------------------------------------------------------------


def test_defaults_follow_the_paper() -> None:
    m = build("quantizer", {"use": "msrq"})
    assert m.scales == PAPER and m.num_levels == 10 and m.token_count == 286
    assert (m.dim, m.codebook_size) == (m.code.dim, m.code.codebook_size)
    assert m.phi_index == (0, 0, 1, 1, 1, 2, 2, 3, 3, 3) and len(m.phi) == 4
    c = m.config
    assert (c.beta, c.phi_gamma, c.accumulate, c.commit_convention, c.inner_losses) == (0.25, 0.5, "raw", "mean", "aux")
    # ONE nested quantizer = one codebook shared by every scale
    params = [name for name, _ in m.named_parameters()]
    assert sorted(params) == ["code.embedding.weight"] + [f"phi.{i}.{p}" for i in range(4) for p in ("bias", "weight")]


def test_token_counts() -> None:
    assert token_count(PAPER) == 286
    assert token_count(VAR) == 680
    assert make(scales=list(VAR), phi_count=4).token_count == 680


def test_phi_schedule_matches_vars_rule() -> None:
    assert phi_schedule(10, 4) == (0, 0, 1, 1, 1, 2, 2, 3, 3, 3)
    assert phi_schedule(10, 0) == tuple(range(10))  # non-shared: one per scale
    assert phi_schedule(10, 1) == (0,) * 10  # fully shared
    assert phi_schedule(1, 1) == (0,)
    # VAR's numpy rule (ticks linspace, nearest tick, first on ties) for many shapes
    for scales in range(2, 17):
        for convs in range(2, scales + 1):
            pad = 1 / 3 / convs if convs == 4 else 1 / 2 / convs
            ticks = np.linspace(pad, 1 - pad, convs)
            expected = tuple(int(np.argmin(np.abs(ticks - k / (scales - 1)))) for k in range(scales))
            assert phi_schedule(scales, convs) == expected, (scales, convs)


def test_bad_configs_are_rejected_with_the_key() -> None:
    with pytest.raises(ConfigError, match="last scale must be the largest"):
        build("quantizer", {"use": "msrq", "scales": [1, 4, 2]})
    with pytest.raises(ConfigError, match=r"phi_count: 4 phi convs for 3 scales leaves conv\(s\) \[1\] unused"):
        build("quantizer", {"use": "msrq", "scales": [1, 2, 4]})
    with pytest.raises(ConfigError, match=r"quantizer.scales"):
        build("quantizer", {"use": "msrq", "scales": [1, 0, 4]})
    with pytest.raises(ConfigError, match=r"quantizer.scales"):
        build("quantizer", {"use": "msrq", "scales": []})
    build("quantizer", {"use": "msrq", "scales": [1, 2, 4], "phi_gamma": 0.0})  # no convs: any phi_count


def test_nested_multi_level_quantizer_is_rejected() -> None:
    with pytest.raises(ValueError, match="single-level"):
        build("quantizer", {"use": "msrq", **TINY, "code": {"use": "msrq", **TINY}})


def test_last_scale_must_match_the_latent() -> None:
    m = make()
    with pytest.raises(ValueError, match=r"last scale \(4\) must equal the latent's spatial size, got 8x8"):
        m(latents(size=8))
    with pytest.raises(ValueError, match="square"):
        m(torch.zeros(1, 8, 4, 8))
    with pytest.raises(ValueError, match=r"\(B, 8, H, W\)"):
        m(torch.zeros(1, 6, 4, 4))


# -- the algorithm ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("levels", [[3, 3, 3], [3, 1, 2]])
def test_forward_matches_an_independent_var_implementation(levels: list[int]) -> None:
    m = make().train()
    z = latents(seed=4)
    lv = torch.tensor(levels)
    out = m(z, keep=lv)
    f_hat, indices, losses = var_reference(m, z, lv)
    assert all(torch.equal(a, b) for a, b in zip(out.indices, indices))
    torch.testing.assert_close(out.z_q, f_hat)
    for name in ("codebook", "commitment"):
        torch.testing.assert_close(out.losses[name], torch.stack(losses[name]).mean())
    assert set(out.losses) == {"codebook", "commitment"}


def test_last_scale_codes_are_neither_resampled_nor_pooled() -> None:
    # one full-size scale without phi: msrq is exactly its inner quantizer (raw rows = unit rows at init)
    m = make(scales=[4], phi_gamma=0.0).eval()
    z = latents()
    with torch.no_grad():
        out, inner = m(z), m.code(z)
    assert torch.equal(out.indices[0], inner.indices)
    torch.testing.assert_close(out.z_q, inner.z_q)


def test_index_code_index_round_trip_where_it_is_exact() -> None:
    # re-encoding codes is exact where a scale sees its own code alone: one full-size scale, identity phi
    m = make(scales=[4], phi_gamma=0.0).eval()
    idx = [torch.randint(0, 32, (2, 4, 4), generator=torch.Generator().manual_seed(3))]
    again = m.codes_to_indices(m.indices_to_codes(idx))
    assert torch.equal(again[0], idx[0])


def test_token_sequence_round_trip_and_order() -> None:
    m = make(scales=list(PAPER), phi_count=4)
    g = torch.Generator().manual_seed(0)
    indices = [torch.randint(0, 32, (2, s, s), generator=g) for s in PAPER]
    layout = m.token_layout(11, 11)
    assert (layout.length, layout.tokens_per_step, layout.scales) == (286, 1, PAPER) and m.token_count == 286
    assert layout.codebook_sizes == {"": 32}
    seq = layout.to_sequence(indices)
    assert seq.shape == (2, 286, 1) and seq.dtype == torch.int64
    back = layout.from_sequence(seq)
    assert all(torch.equal(a, b) for a, b in zip(back, indices))
    seq = seq[..., 0]
    # scale by scale, each map row-major: position 1 is scale 1's only token, 2..5 scale 2's 2x2 map
    assert seq[0, 0] == indices[0][0, 0, 0] and seq[0, 1] == indices[1][0, 0, 0]
    assert seq[0, 2:6].tolist() == indices[2][0].flatten().tolist()
    assert seq[0, -121:].tolist() == indices[-1][0].flatten().tolist()
    # generic helpers keep extra leading dims (product branches): (B, P, s, s) -> (B, P, L)
    branched = [torch.stack([i, i + 1], dim=1) for i in indices]
    flat = flatten_scales(branched)
    assert flat.shape == (2, 2, 286)
    assert all(torch.equal(a, b) for a, b in zip(unflatten_scales(flat, PAPER), branched))
    with pytest.raises(ValueError, match="286"):
        layout.from_sequence(seq[:, :-1, None])
    with pytest.raises(ValueError, match="token layout"):
        layout.to_sequence(indices[:-1])
    with pytest.raises(ValueError, match="11x11"):
        m.token_layout(8, 8)


def test_raw_codes_keep_their_learned_length() -> None:
    # doubling every stored row leaves the cosine search alone; raw accumulation doubles f_hat, 'quantized' does not
    z = latents()
    for accumulate, factor in (("raw", 2.0), ("quantized", 1.0)):
        m = make(accumulate=accumulate, phi_gamma=0.0).eval()
        with torch.no_grad():
            before = m(z)
            m.code.embedding.weight.mul_(2.0)
            after = m(z)
        # scale 0 sees the same residual, so the same index; later residuals differ under raw accumulation
        assert torch.equal(before.indices[0], after.indices[0])
        torch.testing.assert_close(m.indices_to_codes(before.indices), before.z_q * factor)


def test_indices_to_codes_masks_dropped_scales_with_keep() -> None:
    m = make(dropout={"rate": 1.0, "min_levels": 1}).train()
    z = latents(b=8, seed=2)
    torch.manual_seed(5)
    levels = m.draw_keep(8, z.device)
    out = m(z, keep=levels)
    with torch.no_grad():
        torch.testing.assert_close(m.indices_to_codes(out.indices, levels), out.z_q)
        full = m.eval()(z)
    # dropout never changes the chosen indices (the residual chain subtracts every scale): kept maps equal eval's
    for k, (idx, eval_idx) in enumerate(zip(out.indices, full.indices)):
        kept = levels > k
        assert torch.equal(idx[kept], eval_idx[kept])
        assert (idx[~kept] == 0).all()
    with pytest.raises(ValueError, match="keep must be"):
        m(z, keep=torch.ones(3, dtype=torch.long))


def test_dropout_keeps_at_least_min_levels_and_is_off_in_eval() -> None:
    m = make(scales=list(PAPER), phi_count=4, dropout={"rate": 0.5, "min_levels": 3})
    torch.manual_seed(0)
    drawn = m.train().draw_keep(4000, torch.device("cpu"))
    assert drawn.min() == 3 and drawn.max() == 10
    assert set(drawn.tolist()) == set(range(3, 11))
    assert 0.4 < (drawn < 10).float().mean() < 0.5  # about rate * 7/8 of the samples drop at least one scale
    assert (m.eval().draw_keep(4000, torch.device("cpu")) == 10).all()
    small = make(dropout={"rate": 1.0, "min_levels": 2}).eval()
    z = latents()
    with torch.no_grad():
        torch.manual_seed(1)
        a = small(z)
        torch.manual_seed(2)
        b = small(z)
    # every scale counted: the indices decode to z_q without any levels mask, whatever the RNG
    torch.testing.assert_close(small.indices_to_codes(a.indices), a.z_q)
    torch.testing.assert_close(a.z_q, b.z_q)


# -- losses and gradients -----------------------------------------------------------------------------------------


def test_commit_convention_sum_is_num_scales_times_mean() -> None:
    z = latents()
    mean = make().train()(z).losses
    summed = make(commit_convention="sum").train()(z).losses
    torch.testing.assert_close(summed["codebook"], mean["codebook"])
    torch.testing.assert_close(summed["commitment"], 3 * mean["commitment"])


def test_scale_whose_samples_all_dropped_adds_zero_loss() -> None:
    m = make().train()
    z = latents()
    ones = torch.ones(3, dtype=torch.long)
    out = m(z, keep=ones)
    _, _, ref = var_reference(m, z, ones)
    assert not torch.isfinite(ref["codebook"][1])  # the plain masked mean divides 0 by 0 there
    for name in ("codebook", "commitment"):
        torch.testing.assert_close(out.losses[name], ref[name][0] / 3)


def test_gradients_reach_input_phi_convs_and_codebook() -> None:
    m = make(scales=list(PAPER), phi_count=4).train()
    z = latents(size=11).requires_grad_(True)
    out = m(z)
    (out.loss + (out.z_q * torch.randn_like(out.z_q)).sum()).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    for i, conv in enumerate(m.phi):
        assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0, f"phi {i} got no gradient"
    grad = m.code.embedding.weight.grad
    assert grad is not None
    used = torch.cat([i.flatten() for i in out.indices]).unique()
    assert grad[used].abs().sum(dim=1).gt(0).all()


def test_codebook_loss_trains_codes_and_commitment_trains_encoder() -> None:
    m = make().train()
    z = latents().requires_grad_(True)
    out = m(z)
    out.losses["commitment"].backward(retain_graph=True)
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert m.code.embedding.weight.grad is None and m.phi[0].weight.grad is None
    z.grad = None
    out.losses["codebook"].backward()
    assert z.grad is None
    assert m.code.embedding.weight.grad.abs().sum() > 0 and m.phi[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("inner", [n for n in ("lfq", "bsq") if n in INSTALLED])
def test_binary_inner_keeps_its_entropy_loss(inner: str) -> None:
    code = {"use": inner, "bits": 6}
    z = latents(c=6).requires_grad_(True)
    out = make(code=code, phi_count=3).train()(z)
    assert set(out.losses) == {"codebook", "commitment", "entropy"}
    grad = torch.autograd.grad(out.losses["entropy"], z)[0]
    assert grad.abs().sum() > 0  # the residual fed to the inner carries the gradient to z
    # one full-size scale: the entropy term is the inner quantizer's own on z
    single = make(code=code, scales=[4]).train()
    torch.testing.assert_close(single(z).losses["entropy"], single.code(z).losses["entropy"])
    none = make(code=code, phi_count=3, inner_losses="none").train()(z)
    assert set(none.losses) == {"codebook", "commitment"}


@pytest.mark.parametrize("inner", [n for n in ("lfq", "bsq") if n in INSTALLED])
def test_full_resolution_aux_losses_are_the_inner_entropy_of_each_full_residual(inner: str) -> None:
    code = {"use": inner, "bits": 6}
    z = latents(c=6).requires_grad_(True)
    full = make(code=code, phi_count=3, aux_resolution="full").train()
    scale = make(code=code, phi_count=3).train()
    out, out_scale = full(z), scale(z)
    # the search (indices, z_q, the running-sum losses) does not depend on where the entropy is taken
    for a, b in zip(out.indices, out_scale.indices):
        assert torch.equal(a, b)
    torch.testing.assert_close(out.z_q, out_scale.z_q)
    torch.testing.assert_close(out.losses["commitment"], out_scale.losses["commitment"])
    assert not torch.allclose(out.losses["entropy"], out_scale.losses["entropy"])
    # expected: the mean over scales of the inner quantizer's entropy on the full-size residual z - sum of the
    # previous scales' contributions (every scale's, dropped or not)
    with torch.no_grad():
        table = full._table()
        rest, expected = z.detach().clone(), []
        for k, idx in enumerate(out.indices):  # no dropout configured: every map is the searched one
            expected.append(full.code(rest).losses["entropy"])
            rest = rest - full._contribution(idx.long(), k, 4, table)
    torch.testing.assert_close(out.losses["entropy"], torch.stack(expected).mean())
    assert torch.autograd.grad(out.losses["entropy"], z)[0].abs().sum() > 0


def test_full_resolution_aux_losses_refuse_a_stateful_inner_quantizer() -> None:
    with pytest.raises(ValueError, match="aux_resolution = 'full'.*'vq'"):
        make(aux_resolution="full")


def test_normalize_input_ignores_the_latent_scale() -> None:
    m = make(normalize_input=True).eval()
    z = latents()
    with torch.no_grad():
        a, b = m(z), m(z * 7.0)
    assert all(torch.equal(x, y) for x, y in zip(a.indices, b.indices))
    torch.testing.assert_close(a.z_q, b.z_q)


# -- statistics and precision -------------------------------------------------------------------------------------


def test_stats_overall_and_per_scale() -> None:
    m = make()
    out = m(latents())
    for k in range(3):
        assert 0 < out.stats[f"scale{k}/utilization"] <= 100
        assert out.stats[f"scale{k}/perplexity"] >= 1
    assert out.stats["scale0/utilization"] <= 100 * 3 / 32  # 3 samples x 1 token
    assert out.stats["utilization"] >= max(out.stats[f"scale{k}/utilization"] for k in range(3))
    assert all(isinstance(v, torch.Tensor) and v.ndim == 0 and not v.requires_grad for v in out.stats.values())


def test_bf16_input_gives_bf16_codes_from_fp32_work() -> None:
    m = make().eval()
    z = latents()
    with torch.no_grad():
        ref = m(z)
        out = m(z.bfloat16())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = m(z)
    assert out.z_q.dtype == torch.bfloat16 and auto.z_q.dtype == torch.float32
    assert all(torch.equal(a, b) for a, b in zip(auto.indices, ref.indices))
    torch.testing.assert_close(auto.z_q, ref.z_q)
    assert all(v.dtype == torch.float32 for v in out.losses.values())


def test_codes_to_indices_never_drops_scales() -> None:
    m = make(dropout={"rate": 1.0, "min_levels": 1}).train()
    z = latents(b=16, seed=6)
    torch.manual_seed(0)
    got = m.codes_to_indices(z)
    with torch.no_grad():
        expected = m.eval()(z).indices
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
