"""Behaviour of the ``rq`` quantizer beyond the generic contract."""

from __future__ import annotations

import copy
from typing import Any

import attrs
import pytest
import torch
import torch.nn.functional as F

from xqgan_core import ConfigError, build, catalog
from xqgan_core.quant_ops import flatten_tokens, nearest_code, unflatten_tokens

TINY_VQ = {"use": "vq", "codebook_size": 16, "dim": 4}
RAW_VQ = {**TINY_VQ, "l2_norm": False, "init_scale": 1.0}  # unnormalised codes of the data's scale
_TINY = {"codebook_size": 16, "dim": 4, "bits": 4, "levels": 2, "branches": 2, "scales": [1, 2, 4], "phi_count": 0,
         "code": TINY_VQ, "branch": TINY_VQ}


def tiny(name: str) -> dict[str, Any]:
    """Small settings for any installed quantizer, applied only where its Config has the option."""
    fields = attrs.fields_dict(catalog().resolve("quantizer", name).load().Config)
    return {"use": name, **{k: copy.deepcopy(v) for k, v in _TINY.items() if k in fields}}


def make_rq(**options: Any) -> Any:
    torch.manual_seed(0)
    return build("quantizer", {"use": "rq", "levels": 3, "code": RAW_VQ, **options})


def latents(b: int = 2, c: int = 4, h: int = 4, w: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(seed))


def spy_draws(module: Any) -> list[torch.Tensor]:
    """Record every ``draw_keep`` result of ``module`` (an instance attribute shadows the method)."""
    draws: list[torch.Tensor] = []
    original = module.draw_keep

    def draw(batch: int, device: torch.device) -> torch.Tensor:
        draws.append(original(batch, device))
        return draws[-1]

    module.draw_keep = draw
    return draws


def _names(levels: int | None) -> list[str]:
    names = catalog().names("quantizer")
    if levels is None:
        return names
    return [n for n in names if (build("quantizer", tiny(n)).num_levels == 1) == (levels == 1)]


# ------------------------------------------------------------------------------------------------------------------
# construction


def test_defaults_and_modules() -> None:
    rq = build("quantizer", {"use": "rq"})
    assert (rq.num_levels, rq.dim, rq.codebook_size) == (4, 8, 4096)
    assert rq.config.shared_codebook is False and rq.config.dropout.rate == 0.0
    assert len(rq.codes) == 4 and len({id(m) for m in rq.codes}) == 4
    # separate codebooks: each level is a fresh module with its own weights
    assert not torch.equal(rq.codes[0].embedding.weight, rq.codes[1].embedding.weight)
    shared = build("quantizer", {"use": "rq", "shared_codebook": True})
    assert len(shared.codes) == 1 and all(shared.level(i) is shared.codes[0] for i in range(4))
    assert [k for k in shared.state_dict() if k.endswith("embedding.weight")] == ["codes.0.embedding.weight"]


def test_dim_and_codebook_size_come_from_the_nested_quantizer() -> None:
    rq = build("quantizer", {"use": "rq", "levels": 2, "code": {"use": "vq", "dim": 6, "codebook_size": 10}})
    assert (rq.dim, rq.codebook_size, rq.num_levels) == (6, 10, 2)


@pytest.mark.parametrize("name", _names(levels=2))
def test_a_multi_level_nested_quantizer_is_rejected(name: str) -> None:
    with pytest.raises(ConfigError, match="quantizer.code: rq needs a single-level quantizer"):
        build("quantizer", {"use": "rq", "code": tiny(name)})


def test_wrong_input_shapes_are_rejected() -> None:
    rq = make_rq()
    with pytest.raises(ValueError, match=r"\(B, 4, H, W\)"):
        rq(latents(c=5))
    with pytest.raises(ValueError, match="keep must be"):
        rq(latents(), keep=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        rq.indices_to_codes(torch.zeros(2, 2, 4, 4, dtype=torch.long))


# ------------------------------------------------------------------------------------------------------------------
# the forward pass


def test_forward_equals_a_hand_written_residual_loop() -> None:
    rq = make_rq(code={**RAW_VQ, "beta": 0.5}).train()
    z = latents(seed=1)
    out = rq(z)
    r = flatten_tokens(z)
    total = torch.zeros_like(r)
    errors = []
    for level, q in enumerate(rq.codes):
        table = q.embedding.weight.detach()
        idx = ((r[:, None, :] - table[None]) ** 2).sum(-1).argmin(1)  # brute force, not nearest_code
        assert torch.equal(out.indices[:, level].reshape(-1), idx)
        errors.append(((table[idx] - r) ** 2).mean())
        total, r = total + table[idx], r - table[idx]
    torch.testing.assert_close(out.z_q, unflatten_tokens(total, (2, 4, 4)))
    assert out.indices.shape == (2, 3, 4, 4) and out.indices.dtype == torch.int64
    # inner losses averaged over levels
    torch.testing.assert_close(out.losses["codebook"], torch.stack(errors).mean())
    torch.testing.assert_close(out.losses["commitment"], 0.5 * torch.stack(errors).mean())


def test_gradients_straight_through_and_commitment_over_depth() -> None:
    """z_q passes the gradient to z unchanged and to no codebook; level l's commitment loss reaches z through the
    residual ``z - sg(sum of earlier codes)``; the codebook loss reaches every level's codebook and not z."""
    rq = make_rq().train()
    z = latents(seed=2).requires_grad_(True)
    out = rq(z)
    w = torch.randn_like(z)
    (out.z_q * w).sum().backward(retain_graph=True)
    torch.testing.assert_close(z.grad, w)
    assert all(q.embedding.weight.grad is None for q in rq.codes)

    z.grad = None
    out.losses["commitment"].backward(retain_graph=True)
    z_ref = z.detach().clone().requires_grad_(True)
    codes = [q.indices_to_codes(out.indices[:, level]).detach() for level, q in enumerate(rq.codes)]
    partial, terms = torch.zeros_like(z_ref), []
    for code in codes:
        residual = z_ref - partial  # partial sums carry no gradient
        terms.append(0.25 * ((code - residual) ** 2).mean())
        partial = partial + code
    torch.stack(terms).mean().backward()
    torch.testing.assert_close(z.grad, z_ref.grad)
    assert all(q.embedding.weight.grad is None for q in rq.codes)

    z.grad = None
    out.losses["codebook"].backward()
    assert z.grad is None
    for level, q in enumerate(rq.codes):
        used = out.indices[:, level].unique()
        assert q.embedding.weight.grad[used].abs().sum(dim=1).gt(0).all(), f"level {level} codebook got no gradient"


def test_shared_codebook_is_used_at_every_level() -> None:
    rq = make_rq(shared_codebook=True).train()
    z = latents(seed=3)
    out = rq(z)
    table = rq.codes[0].embedding.weight.detach()
    expected = sum(F.embedding(out.indices[:, level], table).permute(0, 3, 1, 2) for level in range(3))
    torch.testing.assert_close(out.z_q, expected)
    out.losses["codebook"].backward()
    used = out.indices.unique()  # codes chosen at any level get a gradient
    assert rq.codes[0].embedding.weight.grad[used].abs().sum(dim=1).gt(0).all()


@pytest.mark.parametrize("l2_norm", [True, False])
def test_one_level_is_exactly_plain_vq(l2_norm: bool) -> None:
    vq = build("quantizer", {**TINY_VQ, "l2_norm": l2_norm, "init_scale": 1.0}).train()
    rq = build("quantizer", {"use": "rq", "levels": 1, "code": {**TINY_VQ, "l2_norm": l2_norm}}).train()
    rq.codes[0].load_state_dict(vq.state_dict())
    z = latents(seed=4) * 2
    z_vq, z_rq = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    a, b = vq(z_vq), rq(z_rq)
    assert torch.equal(b.indices, a.indices.unsqueeze(1))
    # z_q values: bit-exact, except that with l2_norm vq's straight-through is taken on the normalised input
    # (n + sg(c - n)) and rq's on z (z + sg(c - z)), which round differently in the last bit
    torch.testing.assert_close(b.z_q, a.z_q, rtol=0, atol=0 if not l2_norm else 1e-6)
    with torch.no_grad():  # without a gradient to record both return the codes themselves
        assert torch.equal(rq(z).z_q, vq(z).z_q)
    assert a.losses.keys() == b.losses.keys()
    for name in a.losses:
        torch.testing.assert_close(b.losses[name], a.losses[name], rtol=0, atol=0)
    for name in ("perplexity", "utilization"):
        assert b.stats[name] == a.stats[name] == b.stats[f"level0/{name}"]
    if not l2_norm:  # both straight-through estimators are then the identity: same gradient too
        w = torch.randn_like(z)
        (a.z_q * w + a.loss).sum().backward()
        (b.z_q * w + b.loss).sum().backward()
        torch.testing.assert_close(z_rq.grad, z_vq.grad)


def test_each_level_adds_the_nested_quantizers_code() -> None:
    """With the vq default l2_norm, every level adds a unit-norm code (the nested quantizer's own code)."""
    rq = build("quantizer", {"use": "rq", "levels": 3, "code": TINY_VQ}).eval()
    out = rq(latents(seed=5) * 3)
    for level in range(3):
        code = rq.codes[level].indices_to_codes(out.indices[:, level])
        torch.testing.assert_close(code.norm(dim=1), torch.ones(2, 4, 4))
        torch.testing.assert_close(rq.indices_to_codes(out.indices, keep=level + 1)
                                   - rq.indices_to_codes(out.indices, keep=level), code)


def test_stats_per_level_and_overall_mean() -> None:
    rq = make_rq(levels=4)
    stats = rq(latents(seed=6)).stats
    for name in ("perplexity", "utilization"):
        per_level = [stats[f"level{i}/{name}"] for i in range(4)]
        assert all(isinstance(v, torch.Tensor) and v.ndim == 0 for v in per_level)
        assert stats[name] == pytest.approx(sum(per_level) / 4)
    assert 0 < stats["utilization"] <= 100


def test_bf16_input_keeps_its_dtype_and_the_residual_runs_in_fp32() -> None:
    rq = make_rq().eval()
    z = latents(seed=7).bfloat16()
    out = rq(z)
    assert out.z_q.dtype == torch.bfloat16
    assert torch.equal(out.indices, rq(z.float()).indices)  # same values, quantized in fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = rq(latents(seed=7))
    assert out.z_q.dtype == torch.float32 and torch.isfinite(out.z_q).all()


# ------------------------------------------------------------------------------------------------------------------
# codes <-> indices


def geometric_rq(levels: int = 3, shrink: float = 0.05) -> Any:
    """An rq whose level-l codebook is scaled by ``shrink**l``, like a trained residual codebook whose later levels
    correct ever smaller errors. Checked precondition: at every level, all deeper codes together move a point by
    less than half the level's smallest distance between two of its codes, so greedy re-encoding of any sum of codes
    must recover each level's index."""
    rq = make_rq(levels=levels).eval()
    with torch.no_grad():
        for level, q in enumerate(rq.codes):
            q.embedding.weight.mul_(shrink**level)
    tables = [q.embedding.weight.detach() for q in rq.codes]
    for level, table in enumerate(tables):
        dist = torch.cdist(table, table) + torch.eye(len(table)) * 1e9
        reach = sum(t.norm(dim=1).max() for t in tables[level + 1 :]) if level + 1 < levels else torch.tensor(0.0)
        assert reach < dist.min() / 2, "the constructed codebooks do not satisfy the round-trip precondition"
    return rq


def test_index_code_index_round_trip() -> None:
    rq = geometric_rq()
    indices = torch.randint(0, 16, (3, 3, 5, 6), generator=torch.Generator().manual_seed(8))
    codes = rq.indices_to_codes(indices)
    assert codes.shape == (3, 4, 5, 6)
    assert torch.equal(rq.codes_to_indices(codes), indices)
    out = rq(codes)
    assert torch.equal(out.indices, indices)
    torch.testing.assert_close(out.z_q, codes)


def test_re_encoding_a_quantized_latent_reproduces_its_indices() -> None:
    rq = geometric_rq()
    out = rq(latents(seed=9))
    assert torch.equal(rq.codes_to_indices(out.z_q), out.indices)


def test_indices_to_codes_inverts_forward_exactly_in_eval() -> None:
    rq = make_rq(code=TINY_VQ, dropout={"rate": 1.0, "min_levels": 1}).eval()
    with torch.no_grad():
        out = rq(latents(seed=10))
        assert torch.equal(rq.indices_to_codes(out.indices), out.z_q)  # bit-exact: same sum, same order


# ------------------------------------------------------------------------------------------------------------------
# quantizer dropout


def test_draw_keeps_at_least_min_levels_and_only_in_training() -> None:
    rq = make_rq(levels=6, dropout={"rate": 1.0, "min_levels": 3})
    torch.manual_seed(11)
    drawn = rq.train().draw_keep(400, torch.device("cpu"))
    assert drawn.dtype == torch.int64 and set(drawn.tolist()) == {3, 4, 5, 6}
    assert rq.eval().draw_keep(400, torch.device("cpu")).eq(6).all()
    paper = make_rq(levels=6, dropout={"rate": 0.1, "min_levels": 3}).train()
    drawn = paper.draw_keep(2000, torch.device("cpu"))
    assert drawn.min() >= 3 and 0 < drawn.lt(6).sum() < 400  # about 0.1 * 3/4 of the samples are shortened


def test_training_forward_masks_the_dropped_levels() -> None:
    rq = make_rq(levels=5, dropout={"rate": 1.0, "min_levels": 1}).train()
    draws = spy_draws(rq)
    z = latents(b=8, seed=12)
    torch.manual_seed(13)
    out = rq(z)
    assert len(draws) == 1
    kept = draws[0]
    assert kept.min() < 5  # the draw actually shortened some samples
    full = rq.eval()(z)
    for b in range(8):
        n = int(kept[b])
        assert torch.equal(out.indices[b, :n], full.indices[b, :n])  # the residual chain ignores the mask
        assert out.indices[b, n:].eq(0).all()
    torch.testing.assert_close(out.z_q, rq.indices_to_codes(full.indices, keep=kept))
    torch.testing.assert_close(out.z_q, rq.indices_to_codes(out.indices, keep=kept))


def test_no_dropout_in_eval_and_explicit_levels_are_honoured() -> None:
    rq = make_rq(levels=4, dropout={"rate": 1.0, "min_levels": 1}).eval()
    draws = spy_draws(rq)
    z = latents(b=4, seed=14)
    out = rq(z)
    assert draws[0].eq(4).all() and out.indices.shape == (4, 4, 4, 4)
    torch.testing.assert_close(rq(z, keep=4).z_q, out.z_q)
    one = rq(z, keep=1)
    torch.testing.assert_close(one.z_q, rq.codes[0].indices_to_codes(out.indices[:, 0]))
    assert one.indices[:, 1:].eq(0).all()
    mixed = rq(z, keep=torch.tensor([1, 2, 3, 4]))
    torch.testing.assert_close(mixed.z_q, rq.indices_to_codes(out.indices, keep=torch.tensor([1, 2, 3, 4])))


# ------------------------------------------------------------------------------------------------------------------
# the residual error shrinks with depth


def fit_level_codebooks(rq: Any, z: torch.Tensor, iters: int = 10) -> None:
    """Fit each level's (unnormalised) codebook to the residuals that reach it: Lloyd's k-means, started from the
    residuals' mean plus random residuals. The mean as a starting code makes the distortion at most
    ``mean ||r||^2`` and Lloyd's steps never increase it, so each level can only reduce the error."""
    g = torch.Generator().manual_seed(15)
    r = flatten_tokens(z)
    for q in rq.codes:
        k = q.codebook_size
        table = torch.cat([r.mean(0, keepdim=True), r[torch.randperm(len(r), generator=g)[: k - 1]]])
        for _ in range(iters):
            idx = nearest_code(r, table)
            sums = torch.zeros_like(table).index_add_(0, idx, r)
            counts = torch.bincount(idx, minlength=k).unsqueeze(1)
            table = torch.where(counts > 0, sums / counts.clamp(min=1), table)  # empty clusters keep their code
        with torch.no_grad():
            q.embedding.weight.copy_(table)
        r = r - table[nearest_code(r, table)]


def test_residual_error_is_non_increasing_with_depth() -> None:
    """On fixed data, with l2_norm = false codebooks fitted to each level's residuals (what training does), the
    reconstruction error after n levels never grows with n and ends well below the error of the first level."""
    rq = make_rq(levels=4, code={**TINY_VQ, "l2_norm": False}).eval()
    z = latents(b=2, h=8, w=8, seed=16)
    fit_level_codebooks(rq, z)
    with torch.no_grad():
        errors = [float(((z - rq(z, keep=n).z_q) ** 2).mean()) for n in range(5)]  # n = 0: nothing kept
    assert errors[0] == pytest.approx(float((z**2).mean()))
    for shallow, deep in zip(errors, errors[1:]):
        assert deep <= shallow * (1 + 1e-6), errors
    assert errors[4] < 0.5 * errors[1], errors


# ------------------------------------------------------------------------------------------------------------------
# rq over every installed single-level quantizer


@pytest.mark.parametrize("name", _names(levels=1))
def test_rq_over_each_installed_single_level_quantizer(name: str) -> None:
    torch.manual_seed(0)
    rq = build("quantizer", {"use": "rq", "levels": 3, "code": tiny(name)})
    inner = rq.codes[0]
    assert (rq.dim, rq.codebook_size, rq.num_levels) == (inner.dim, inner.codebook_size, 3)
    z = latents(b=3, c=rq.dim, seed=17)
    with torch.no_grad():
        full = rq.eval()(z)
        inner_idx = inner(z).indices
        assert full.indices.shape == (3, 3, *inner_idx.shape[1:])
        assert torch.equal(full.indices[:, 0], inner_idx)  # level 0 quantizes z itself
        torch.testing.assert_close(rq.indices_to_codes(full.indices), full.z_q, atol=1e-5, rtol=1e-4)
        assert torch.equal(rq.codes_to_indices(z), full.indices)
    kept = torch.tensor([1, 2, 3])
    x = z.clone().requires_grad_(True)
    out = rq.train()(x, keep=kept)
    for b in range(3):
        assert torch.equal(out.indices[b, : b + 1], full.indices[b, : b + 1])
        assert out.indices[b, b + 1 :].eq(0).all()
    torch.testing.assert_close(out.z_q, rq.indices_to_codes(full.indices, keep=kept), atol=1e-5, rtol=1e-4)
    w = torch.randn_like(x)
    (out.z_q * w + out.loss).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert {"perplexity", "level2/perplexity", "level2/utilization"} <= out.stats.keys()


# ------------------------------------------------------------------------------------------------------------------
# token layout (sequences and held-out per-codebook metrics)


def test_token_layout_is_depth_per_position_and_names_the_codebooks() -> None:
    indices = torch.randint(0, 16, (2, 3, 4, 5), generator=torch.Generator().manual_seed(18))
    layout = make_rq().token_layout(4, 5)
    assert (layout.length, layout.tokens_per_step, layout.levels, layout.branches) == (20, 3, 3, 1)
    assert layout.codebooks == ("level0", "level1", "level2") and layout.vocab_sizes == (16, 16, 16)
    seq = layout.to_sequence(indices)
    # step t = row-major position (t // 5, t % 5); token k = level k
    assert torch.equal(seq[1, 7], indices[1, :, 1, 2])
    assert torch.equal(layout.from_sequence(seq), indices)
    shared = make_rq(shared_codebook=True).token_layout(4, 5)
    assert shared.codebooks == ("", "", "") and shared.codebook_sizes == {"": 16}
    groups = shared.codebook_tokens(seq)
    assert list(groups) == [""] and torch.equal(groups[""].sort().values, indices.flatten().sort().values)
    nested = build("quantizer", {"use": "rq", "levels": 2, "code": {"use": "pq", "branches": 2, "branch": TINY_VQ}})
    idx = nested.eval()(latents(c=8, seed=19)).indices  # (B, N, P, H, W)
    layout = nested.token_layout(4, 4)
    assert layout.codebooks == ("level0/branch0", "level0/branch1", "level1/branch0", "level1/branch1")
    assert (layout.levels, layout.branches, layout.tokens_per_step) == (2, 2, 4)
    groups = layout.codebook_tokens(layout.to_sequence(idx))
    assert torch.equal(groups["level1/branch0"].sort().values, idx[:, 1, 0].flatten().sort().values)


@pytest.mark.parametrize(
    "table",
    [
        {"use": "rq", "levels": 3, "shared_codebook": True,
         "code": {"use": "vq", "dim": 4, "codebook_size": 16, "dead_code_threshold": 1.0}},
        {"use": "rq", "levels": 3, "shared_codebook": True,
         "code": {"use": "vq", "dim": 4, "codebook_size": 16, "kmeans_init": 2, "l2_norm": False}},
    ],
    ids=["shared-restarts", "shared-kmeans"],
)
def test_shared_codebook_maintenance_does_not_break_backward(table):
    """Codebook maintenance (restarts, k-means init) on a codebook that earlier levels already used this step."""
    from xqgan_core import build

    q = build("quantizer", table).train()
    for _ in range(3):
        z = torch.randn(4, 4, 4, 4, requires_grad=True)
        out = q(z)
        (out.z_q.sum() + out.loss).backward()
        assert z.grad is not None and torch.isfinite(z.grad).all()
