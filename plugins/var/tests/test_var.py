"""Behaviour of the ``var`` generator: the cached sampler against the uncached forward, block-causal attention,
classifier-free guidance with VAR's ramp, greedy determinism, label dropout, training on VQ / LFQ / BSQ / pq codes,
and what ``bind`` refuses."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from xqgan_core import ConfigError, build
from xqgan_core.sampling import cfg_mix, cfg_ramp, token_cross_entropy

SCALES = [1, 2, 4]
CLASSES = 3
CODES: dict[str, dict[str, Any]] = {
    "vq": {"use": "vq", "dim": 8, "codebook_size": 32},
    "lfq": {"use": "lfq", "bits": 5},
    "bsq": {"use": "bsq", "bits": 5},
}
MSRQ = {"use": "msrq", "scales": SCALES, "phi_count": 1}


def quantizer(kind: str, scales: list[int] = SCALES) -> Any:
    """A tiny msrq over ``kind`` codes, or (``"pq"``) two msrq branches of VQ codes."""
    torch.manual_seed(0)
    msrq = {**MSRQ, "scales": scales}
    if kind == "pq":
        table = {"use": "pq", "branches": 2, "branch": {**msrq, "code": {"use": "vq", "dim": 4, "codebook_size": 16}}}
    else:
        table = {**msrq, "code": CODES[kind]}
    return build("quantizer", table).eval()


def generator(q: Any, perturb: bool = True, **options: Any) -> Any:
    """A depth-2 var bound to ``q``; ``perturb`` adds noise to every weight, so the blocks (whose gates start near
    zero) shape the logits and a wrong mask or cache would show."""
    torch.manual_seed(1)
    gen = build("generator", {"use": "var", "depth": 2, "width": 32, "heads": 2, **options})
    gen.bind(q.token_layout(4, 4), q, CLASSES)
    if perturb:
        with torch.no_grad():
            for p in gen.parameters():
                p.add_(torch.randn_like(p) * 0.3)
    return gen.eval()


def tokens_of(q: Any, n: int = 4, seed: int = 0) -> torch.Tensor:
    z = torch.randn(n, q.dim, 4, 4, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return q.token_layout(4, 4).to_sequence(q(z).indices)


LABELS = torch.tensor([0, 1, 2, 3])  # 3 = the null class


@pytest.mark.parametrize("kind", ["vq", "lfq", "pq"])
def test_cached_teacher_forcing_equals_the_uncached_forward(kind: str) -> None:
    q = quantizer(kind)
    gen = generator(q)
    tokens = tokens_of(q)
    with torch.no_grad():
        full = gen(tokens, LABELS).logits
        cached = gen.cached_logits(tokens, LABELS)
    assert len(full) == q.token_layout(4, 4).tokens_per_step
    for a, b, v in zip(full, cached, q.token_layout(4, 4).vocab_sizes):
        assert a.shape == (4, 21, v)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scales", [[1, 1, 2, 4], [2, 4]])
def test_repeated_and_larger_first_scales(scales: list[int]) -> None:
    """The paper's scales repeat a side (1, 1, ...); a first scale above 1 gives several start tokens."""
    q = quantizer("vq", scales)
    gen = generator(q)
    tokens = tokens_of(q)
    with torch.no_grad():
        full = gen(tokens, LABELS).logits[0]
        torch.testing.assert_close(gen.cached_logits(tokens, LABELS)[0], full, rtol=1e-5, atol=1e-5)
        assert gen.sample(2, top_k=1).shape == (2, sum(s * s for s in scales), 1)


@pytest.mark.parametrize("kind", ["vq", "pq"])
def test_greedy_samples_are_the_argmax_of_the_forward(kind: str) -> None:
    q = quantizer(kind)
    gen = generator(q)
    with torch.no_grad():
        drawn = gen.sample(4, LABELS, top_k=1)
        again = gen.sample(4, LABELS, top_k=1)
        logits = gen(drawn, LABELS).logits
    assert drawn.shape == (4, 21, len(logits)) and drawn.dtype == torch.int64
    torch.testing.assert_close(drawn, again, rtol=0, atol=0)  # top-k 1: deterministic
    greedy = torch.stack([lg.argmax(-1) for lg in logits], dim=-1)
    torch.testing.assert_close(drawn, greedy, rtol=0, atol=0)


def test_attention_is_block_causal_over_scales() -> None:
    q = quantizer("vq")
    gen = generator(q)
    tokens = tokens_of(q)
    changed = tokens.clone()
    changed[:, 1:5] = (changed[:, 1:5] + 7) % 32  # every token of scale 1 (steps 1..4)
    with torch.no_grad():
        before, after = gen(tokens, LABELS).logits[0], gen(changed, LABELS).logits[0]
    torch.testing.assert_close(after[:, :5], before[:, :5], rtol=0, atol=0)  # scales 0 and 1 cannot see it
    assert (after[:, 5:] - before[:, 5:]).abs().amax() > 1e-3  # scale 2's input holds scale 1's codes


def test_guidance_follows_vars_ramp_over_scales() -> None:
    q = quantizer("vq")
    gen = generator(q)
    tokens = tokens_of(q)
    null = torch.full_like(LABELS, CLASSES)
    with torch.no_grad():
        cond, uncond = gen(tokens, LABELS).logits[0], gen(tokens, null).logits[0]
        guided = gen.cached_logits(tokens, LABELS, cfg_scale=4.0)[0]
    for k, (start, stop) in enumerate([(0, 1), (1, 5), (5, 21)]):
        expected = cfg_mix(cond[:, start:stop], uncond[:, start:stop], cfg_ramp(4.0, k, 3))
        torch.testing.assert_close(guided[:, start:stop], expected, rtol=1e-4, atol=1e-4)
    # the ramp starts at the conditional model; the guided logits are not the conditional ones later on
    torch.testing.assert_close(guided[:, :1], cond[:, :1], rtol=1e-5, atol=1e-5)
    assert (guided[:, 5:] - cond[:, 5:]).abs().amax() > 1e-2


def test_cfg_scale_one_is_the_conditional_model() -> None:
    q = quantizer("vq")
    gen = generator(q)
    tokens = tokens_of(q)
    with torch.no_grad():
        torch.testing.assert_close(gen.cached_logits(tokens, LABELS, cfg_scale=1.0)[0], gen(tokens, LABELS).logits[0],
                                   rtol=1e-5, atol=1e-5)
        greedy = gen.sample(4, LABELS, top_k=1, cfg_scale=1.0)
        guided = gen.sample(4, LABELS, top_k=1, cfg_scale=5.0)
    torch.testing.assert_close(guided[:, :1], greedy[:, :1], rtol=0, atol=0)  # scale 0: guidance weight 1


def test_seeded_sampling_is_reproducible() -> None:
    q = quantizer("vq")
    gen = generator(q)

    def draw(seed: int) -> torch.Tensor:
        return gen.sample(4, LABELS, cfg_scale=2.0, top_k=8, top_p=0.9, generator=torch.Generator().manual_seed(seed))

    torch.testing.assert_close(draw(0), draw(0), rtol=0, atol=0)
    assert not torch.equal(draw(0), draw(1))
    assert int(draw(0).max()) < 32


def test_label_dropout_in_training_only() -> None:
    q = quantizer("vq")
    tokens = tokens_of(q)
    gen = generator(q, class_dropout=1.0)
    null = torch.full_like(LABELS, CLASSES)
    with torch.no_grad():
        as_null = gen(tokens, null).logits[0]
        conditional = gen(tokens, LABELS).logits[0]
        gen.train()
        dropped = gen(tokens, LABELS).logits[0]
    torch.testing.assert_close(dropped, as_null, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(conditional, as_null)


def test_drop_path_is_random_in_training_only() -> None:
    q = quantizer("vq")
    gen = generator(q, drop_path=0.5, class_dropout=0.0)
    tokens = tokens_of(q)

    def logits(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        with torch.no_grad():
            return gen(tokens, LABELS).logits[0]

    torch.testing.assert_close(logits(0), logits(1), rtol=0, atol=0)  # eval: no dropped paths
    gen.train()
    assert not torch.allclose(logits(0), logits(1))
    torch.testing.assert_close(logits(2), logits(2), rtol=0, atol=0)
    with pytest.raises(ConfigError, match="drop_path: must be below 1"):
        build("generator", {"use": "var", "depth": 2, "drop_path": 1.0})


@pytest.mark.parametrize("kind", ["vq", "lfq", "bsq", "pq"])
def test_trains_on_each_kind_of_code(kind: str) -> None:
    q = quantizer(kind)
    gen = generator(q, perturb=False, drop_path=0.1).train()
    tokens = tokens_of(q, n=8)
    labels = torch.arange(8) % CLASSES
    opt = torch.optim.AdamW(gen.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        out = gen(tokens, labels)
        loss = token_cross_entropy(out.logits, tokens) + sum(out.losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(p.grad is None for p in q.parameters())  # the quantizer stays frozen
    assert losses[-1] < 0.8 * losses[0], losses


def test_the_quantizer_is_frozen_and_not_saved() -> None:
    q = quantizer("vq")
    gen = generator(q)
    assert not any(k.startswith("quantizer") for k in gen.state_dict())
    assert "attn_mask" not in gen.state_dict()
    twin = generator(quantizer("vq"), perturb=False)
    twin.load_state_dict(gen.state_dict())
    tokens = tokens_of(q)
    with torch.no_grad():
        torch.testing.assert_close(twin(tokens, LABELS).logits[0], gen(tokens, LABELS).logits[0], rtol=0, atol=0)


def test_width_and_heads_follow_depth() -> None:
    gen = build("generator", {"use": "var", "depth": 3})
    assert (gen.width, gen.num_heads) == (192, 3)
    with pytest.raises(ConfigError, match="width: 30 is not a multiple of heads"):
        build("generator", {"use": "var", "depth": 2, "width": 30, "heads": 4})


def test_bind_refuses_what_var_cannot_serve() -> None:
    def fresh() -> Any:
        return build("generator", {"use": "var", "depth": 1, "width": 16, "heads": 1})

    vq = build("quantizer", CODES["vq"])
    with pytest.raises(ValueError, match="no scales.*msrq"):
        fresh().bind(vq.token_layout(4, 4), vq, CLASSES)
    pq_vq = build("quantizer", {"use": "pq", "branches": 2, "branch": CODES["vq"]})
    with pytest.raises(ValueError, match="no scales"):
        fresh().bind(pq_vq.token_layout(4, 4), pq_vq, CLASSES)
    one_scale = quantizer("vq", [4])
    with pytest.raises(ValueError, match="at least two scales"):
        fresh().bind(one_scale.token_layout(4, 4), one_scale, CLASSES)
    q = quantizer("vq")
    with pytest.raises(ValueError, match="needs the tokenizer's quantizer"):
        fresh().bind(q.token_layout(4, 4), None, CLASSES)
    with pytest.raises(ValueError, match="not the quantizer's own"):
        fresh().bind(quantizer("pq").token_layout(4, 4), q, CLASSES)
    gen = fresh()
    gen.bind(q.token_layout(4, 4), q, CLASSES)
    with pytest.raises(RuntimeError, match="twice"):
        gen.bind(q.token_layout(4, 4), q, CLASSES)
    with pytest.raises(RuntimeError, match="bind"):
        fresh().sample(1)
