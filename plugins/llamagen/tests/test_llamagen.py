"""Behaviour of the llamagen generator at tiny size: the cached sampler against teacher forcing, guidance, greedy
determinism, label dropout, training on multi-token (rq, pq) layouts, refused layouts."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from xqgan_core import build
from xqgan_core.sampling import cfg_mix, sample_logits, token_cross_entropy
from xqgan_core.token_layout import TokenLayout
from xqgan_plugin_llamagen import LlamaGenGenerator

TINY = {"use": "llamagen", "depth": 2, "width": 32, "heads": 2, "ffn_multiple_of": 16}
NUM_CLASSES = 3


def _layout(kind: str, grid: tuple[int, int] = (3, 4)) -> TokenLayout:
    """Token layouts of real quantizers: one vq codebook, rq (2 levels) and pq (2 branches) over vq."""
    vq = {"use": "vq", "codebook_size": 11, "dim": 4}
    table = {"vq": vq, "rq": {"use": "rq", "levels": 2, "code": vq}, "pq": {"use": "pq", "branches": 2, "branch": vq}}
    return build("quantizer", table[kind]).token_layout(*grid)


def _generator(layout: TokenLayout, num_classes: int = NUM_CLASSES, **options: object) -> LlamaGenGenerator:
    """A bound tiny generator in eval mode with random (non-zero) heads, so that every logit depends on the input."""
    torch.manual_seed(0)
    gen = build("generator", {**TINY, "head_init_std": 0.5, **options})
    gen.bind(layout, None, num_classes)
    return gen.eval()


def _random_tokens(layout: TokenLayout, batch: int, seed: int = 1) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    cols = [torch.randint(0, v, (batch, layout.length), generator=g) for v in layout.vocab_sizes]
    return torch.stack(cols, dim=-1)


def _step_logits(out_logits: list[Tensor], k: int) -> list[Tensor]:
    """Teacher-forced logits in decoding order: step s = (position s // K, column s % K)."""
    return [out_logits[s % k][:, s // k] for s in range(out_logits[0].shape[1] * k)]


@pytest.mark.parametrize("kind", ["vq", "rq", "pq"])
def test_cached_greedy_sampler_matches_teacher_forcing(kind: str) -> None:
    layout = _layout(kind)
    gen = _generator(layout)
    classes = torch.tensor([0, 2, 1])
    sampled = gen.sample(3, classes, top_k=1)
    assert sampled.shape == (3, layout.length, layout.tokens_per_step) and sampled.dtype == torch.int64
    recorded: list[Tensor] = []

    def greedy(step: int, column: int, logits: Tensor) -> Tensor:
        recorded.append(logits)
        return logits.argmax(-1)

    assert torch.equal(gen.decode(classes, greedy), sampled)
    with torch.no_grad():
        forward = _step_logits(gen(sampled, classes).logits, layout.tokens_per_step)
    assert len(recorded) == len(forward) == layout.length * layout.tokens_per_step
    for step, (cached, full) in enumerate(zip(recorded, forward)):
        torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5, msg=f"step {step}")


@pytest.mark.parametrize("kind", ["vq", "rq"])
def test_cached_decode_scores_any_sequence_like_forward(kind: str) -> None:
    """Teacher forcing through the cache on a random (non-greedy) sequence gives forward's logits at every step."""
    layout = _layout(kind)
    gen = _generator(layout)
    tokens, classes = _random_tokens(layout, 2), torch.tensor([1, 3])  # 3 = the null class
    recorded: list[Tensor] = []

    def given(step: int, column: int, logits: Tensor) -> Tensor:
        recorded.append(logits)
        return tokens[:, step // layout.tokens_per_step, column]

    assert torch.equal(gen.decode(classes, given), tokens)
    with torch.no_grad():
        forward = _step_logits(gen(tokens, classes).logits, layout.tokens_per_step)
    for step, (cached, full) in enumerate(zip(recorded, forward)):
        torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5, msg=f"step {step}")


def test_cfg_scale_one_is_the_conditional_model() -> None:
    """At scale 1, seeded nucleus sampling draws exactly what the conditional model's own distributions give."""
    layout = _layout("rq")
    gen = _generator(layout)
    classes = torch.tensor([0, 1, 2, 2])
    seq = gen.sample(4, classes, cfg_scale=1.0, top_p=0.9, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        cond = _step_logits(gen(seq, classes).logits, 2)
        null = _step_logits(gen(seq, None).logits, 2)
    assert max((c - u).abs().max().item() for c, u in zip(cond, null)) > 0.1, "the class must change the logits"
    replay = torch.Generator().manual_seed(5)
    for step, logits in enumerate(cond):
        drawn = sample_logits(logits, top_p=0.9, generator=replay)
        assert torch.equal(drawn, seq[:, step // 2, step % 2]), f"step {step}"


def test_guided_greedy_steps_follow_the_cfg_mix() -> None:
    layout = _layout("pq")
    gen = _generator(layout)
    classes = torch.tensor([0, 1, 2])
    guided = gen.sample(3, classes, cfg_scale=4.0, top_k=1)
    with torch.no_grad():
        cond = _step_logits(gen(guided, classes).logits, 2)
        null = _step_logits(gen(guided, None).logits, 2)
    for step, (c, u) in enumerate(zip(cond, null)):
        assert torch.equal(cfg_mix(c, u, 4.0).argmax(-1), guided[:, step // 2, step % 2]), f"step {step}"
    assert not torch.equal(guided, gen.sample(3, classes, top_k=1)), "guidance at scale 4 changed nothing"


def test_top_k_one_is_deterministic_and_sampling_is_not() -> None:
    gen = _generator(_layout("vq"))
    classes = torch.tensor([0, 1])
    greedy = [gen.sample(2, classes, top_k=1, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    assert torch.equal(greedy[0], greedy[1])
    drawn = [gen.sample(2, classes, temperature=2.0, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    assert not torch.equal(drawn[0], drawn[1])
    again = gen.sample(2, classes, temperature=2.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(drawn[0], again), "the same torch.Generator seed must give the same samples"


def test_sample_restores_the_training_mode() -> None:
    gen = _generator(_layout("vq")).train()
    gen.sample(1, torch.tensor([0]), top_k=1)
    assert gen.training


def test_class_dropout_only_in_training() -> None:
    layout = _layout("vq")
    gen = _generator(layout, class_dropout=1.0, dropout=0.0)  # every label dropped while training
    tokens, classes = _random_tokens(layout, 2), torch.tensor([0, 2])
    null = gen(tokens, None).logits[0]
    assert not torch.allclose(gen(tokens, classes).logits[0], null), "eval mode must keep the labels"
    gen.train()
    torch.testing.assert_close(gen(tokens, classes).logits[0], null)


@pytest.mark.parametrize("kind", ["rq", "pq"])
def test_training_on_multi_token_layouts_lowers_the_loss(kind: str) -> None:
    layout = _layout(kind, grid=(2, 3))
    gen = _generator(layout, class_dropout=0.0, dropout=0.0).train()
    tokens, classes = _random_tokens(layout, 4, seed=7), torch.tensor([0, 1, 2, 0])
    opt = torch.optim.AdamW(gen.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = token_cross_entropy(gen(tokens, classes).logits, tokens)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses


def test_unconditional_model_has_a_start_token_and_no_guidance() -> None:
    layout = _layout("vq", grid=(2, 2))
    gen = _generator(layout, num_classes=0)
    assert gen.class_embedding.num_embeddings == 1
    assert gen.sample(2, top_k=1).shape == (2, 4, 1)
    with pytest.raises(ValueError, match="cfg_scale"):
        gen.sample(2, cfg_scale=2.0)
    with pytest.raises(ValueError, match="class ids"):
        gen.sample(1, torch.tensor([1]))


def test_refuses_multi_scale_tokens_and_points_to_var() -> None:
    layout = TokenLayout.single((4, 4), 16).over_scales([1, 2, 4])
    gen = build("generator", TINY)
    with pytest.raises(ValueError, match="'var'"):
        gen.bind(layout, None, NUM_CLASSES)


def test_bad_shapes_and_widths_are_named() -> None:
    with pytest.raises(ValueError, match="width"):
        build("generator", {**TINY, "width": 24, "heads": 4})  # head width 6 is not a multiple of 4
    gen = _generator(_layout("rq"))
    with pytest.raises(ValueError, match=r"\(B, 12, 2\)"):
        gen(torch.zeros(1, 12, 1, dtype=torch.int64), None)
    with pytest.raises(ValueError, match="class ids"):
        gen(torch.zeros(1, 12, 2, dtype=torch.int64), torch.tensor([NUM_CLASSES + 1]))


def test_default_heads_start_at_zero_like_llamagen() -> None:
    """Uniform predictions before training: the loss starts at log(V) per column."""
    layout = _layout("rq")
    torch.manual_seed(0)
    gen = build("generator", TINY)
    gen.bind(layout, None, NUM_CLASSES)
    tokens = _random_tokens(layout, 2)
    loss = token_cross_entropy(gen.eval()(tokens, torch.tensor([0, 1])).logits, tokens)
    torch.testing.assert_close(loss, torch.tensor(11.0).log())
