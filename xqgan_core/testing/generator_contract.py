"""The generator contract: what ``GeneratorTask`` and ``xqgan-run sample`` rely on.

In a plugin's ``tests/test_contract.py``::

    from xqgan_core.testing import GeneratorContract

    class TestMyGenerator(GeneratorContract):
        name = "mygen"                                 # the entry-point name
        options = {"depth": 2}
        quantizer = {"use": "msrq", "scales": [1, 2, 4], "phi_count": 0, "code": TINY_VQ}  # optional
        grid = (4, 4)

The generator is bound to ``quantizer``'s token layout at ``grid`` (built with seeded random weights), or, without a
quantizer, to ``layout``. Every ``test_*`` method then checks: logits of every column with the layout's shapes,
causality, greedy cached sampling reproducing the argmax of the uncached forward step by step (at cfg_scale 1, the
conditional model), top-k 1 determinism, seeded sampling reproducibility, class dropout acting only in training,
unconditional use, and a state_dict round trip that leaves frozen parts out.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import pytest
import torch
from torch import Tensor

from ..config import ComponentSpec
from ..frozen import all_frozen_parts, seeded
from ..interfaces import Generator, GeneratorOut, Quantizer
from ..registry import build
from ..token_layout import TokenLayout
from .contracts import ComponentContract

__all__ = ["GeneratorContract"]


class GeneratorContract(ComponentContract):
    """Contract for generators; see the module doc."""

    kind = "generator"
    batch_size: ClassVar[int] = 3
    num_classes: ClassVar[int] = 4
    #: the quantizer whose ``token_layout(*grid)`` the generator is bound to (None: bound to ``layout``, no quantizer)
    quantizer: ClassVar[dict[str, Any] | None] = None
    grid: ClassVar[tuple[int, int]] = (3, 3)
    #: the layout used without a quantizer: two columns with different vocabularies (e.g. two product branches)
    layout: ClassVar[TokenLayout] = TokenLayout(grid=(3, 3), vocab_sizes=(11, 7), codebooks=("branch0", "branch1"),
                                                axes=(("branch", 2),))
    #: greedy decoding compares the cached sampler's choice with the forward pass's logits up to this gap
    logit_tolerance: ClassVar[float] = 1e-4

    # -- helpers --------------------------------------------------------------------------------------------
    def bound_to(self) -> tuple[TokenLayout, Quantizer | None]:
        if self.quantizer is None:
            return self.layout, None
        q = seeded(lambda: build("quantizer", copy.deepcopy(self.quantizer))).eval()
        return q.token_layout(*self.grid), q

    def make(self, num_classes: int | None = None, spec: ComponentSpec | None = None, seed: int = 0) -> Generator:
        layout, q = self.bound_to()
        torch.manual_seed(seed)
        g = (spec or self.spec()).build()
        g.bind(layout, q, self.num_classes if num_classes is None else num_classes)
        return g

    def tokens(self, layout: TokenLayout, n: int | None = None, seed: int = 0) -> Tensor:
        gen = torch.Generator().manual_seed(seed)
        n = n or self.batch_size
        cols = [torch.randint(0, v, (n, layout.length, 1), generator=gen) for v in layout.vocab_sizes]
        return torch.cat(cols, dim=-1)

    def labels(self, n: int | None = None) -> Tensor:
        return torch.arange(n or self.batch_size) % self.num_classes

    def spec_with(self, **options: Any) -> ComponentSpec:
        from ..config import validate_component

        return validate_component(self.kind, self.table(**options))

    # -- tests ----------------------------------------------------------------------------------------------
    def test_forward_gives_logits_for_every_step_and_column(self) -> None:
        g = self.make().train()
        layout, _ = self.bound_to()
        out = g(self.tokens(layout), self.labels())
        assert isinstance(out, GeneratorOut)
        assert len(out.logits) == layout.tokens_per_step, "one logits tensor per column of the layout"
        for k, (logits, vocab) in enumerate(zip(out.logits, layout.vocab_sizes)):
            assert logits.shape == (self.batch_size, layout.length, vocab), f"column {k}: {tuple(logits.shape)}"
            assert torch.isfinite(logits).all(), f"column {k}: non-finite logits"
        for name, loss in out.losses.items():
            assert loss.dim() == 0 and torch.isfinite(loss), f"loss {name} is not a finite scalar"

    def test_training_loss_reaches_the_parameters(self) -> None:
        from ..sampling import token_cross_entropy

        g = self.make().train()
        layout, _ = self.bound_to()
        tokens = self.tokens(layout)
        out = g(tokens, self.labels())
        loss = token_cross_entropy(out.logits, tokens) + sum(out.losses.values())
        loss.backward()
        grads = [p.grad for p in g.parameters() if p.requires_grad]
        assert grads and any(x is not None and x.abs().sum() > 0 for x in grads), "no parameter received a gradient"
        assert all(x is None or torch.isfinite(x).all() for x in grads), "non-finite gradient"

    def test_forward_is_causal(self) -> None:
        """Changing the tokens of step t changes no logits of the steps before it."""
        g = self.make().eval()
        layout, _ = self.bound_to()
        tokens = self.tokens(layout)
        t = layout.length // 2
        changed = tokens.clone()
        changed[:, t:] = self.tokens(layout, seed=1)[:, t:]
        with torch.no_grad():
            a, b = g(tokens, self.labels()), g(changed, self.labels())
        for k in range(layout.tokens_per_step):
            torch.testing.assert_close(a.logits[k][:, :t], b.logits[k][:, :t], msg=f"column {k}: steps < {t} changed")

    def test_greedy_cached_sampling_matches_the_uncached_forward(self) -> None:
        """top_k = 1 with the KV cache, at cfg_scale 1 (the conditional model): at every step and column the sampled
        token is the argmax of ``forward`` run on the sampled sequence (teacher forcing, no cache)."""
        g = self.make().eval()
        labels = self.labels()
        with torch.no_grad():
            seq = g.sample(self.batch_size, labels, cfg_scale=1.0, top_k=1)
            out = g(seq, labels)
        self._assert_argmax(seq, out)

    def test_greedy_sampling_is_deterministic(self) -> None:
        g = self.make().eval()
        with torch.no_grad():
            first = g.sample(self.batch_size, self.labels(), top_k=1, generator=torch.Generator().manual_seed(1))
            second = g.sample(self.batch_size, self.labels(), top_k=1, generator=torch.Generator().manual_seed(2))
        assert torch.equal(first, second), "top_k = 1 must be greedy: the samples depended on the generator's seed"

    def test_sampling_returns_tokens_in_range_and_is_reproducible(self) -> None:
        g = self.make().eval()
        layout, _ = self.bound_to()
        with torch.no_grad():
            draws = [g.sample(self.batch_size, self.labels(), cfg_scale=2.0, top_k=5, top_p=0.9,
                              generator=torch.Generator().manual_seed(7)) for _ in range(2)]
        seq = draws[0]
        assert seq.shape == (self.batch_size, layout.length, layout.tokens_per_step) and seq.dtype == torch.long
        for k, vocab in enumerate(layout.vocab_sizes):
            assert 0 <= int(seq[..., k].min()) and int(seq[..., k].max()) < vocab, f"column {k} out of range"
        assert torch.equal(draws[0], draws[1]), "the same torch.Generator seed must give the same samples"

    def test_class_dropout_acts_only_in_training(self) -> None:
        g = self.make(spec=self.spec_with(class_dropout=1.0))
        layout, _ = self.bound_to()
        tokens, labels = self.tokens(layout), self.labels()
        null = torch.full_like(labels, self.num_classes)

        def logits(mode: bool, cond: Tensor) -> Tensor:
            g.train(mode)
            torch.manual_seed(3)  # the same draws in both calls (dropout layers, if any)
            with torch.no_grad():
                return torch.cat([x.flatten() for x in g(tokens, cond).logits])

        torch.testing.assert_close(logits(True, labels), logits(True, null),
                                   msg="class_dropout = 1 in training must replace every class by the null class")
        assert not torch.allclose(logits(False, labels), logits(False, null)), \
            "in eval mode the class must be used (no label dropout), and must change the logits"

    def test_unconditional_generator(self) -> None:
        g = self.make(num_classes=0).eval()
        layout, _ = self.bound_to()
        with torch.no_grad():
            out = g(self.tokens(layout), None)
            seq = g.sample(self.batch_size, None, top_k=1)
            again = g(seq, None)
        assert all(x.shape[:2] == (self.batch_size, layout.length) for x in out.logits)
        self._assert_argmax(seq, again)

    def test_state_dict_round_trip_leaves_frozen_parts_out(self) -> None:
        a = self.make(seed=0).eval()
        b = self.make(seed=1234).eval()
        state = a.state_dict()
        frozen = {id(p) for part in all_frozen_parts(a).values() for p in (*part.parameters(), *part.buffers())}
        assert not frozen & {id(v) for v in state.values()}, "a frozen part is in state_dict()"
        b.load_state_dict(state)
        layout, _ = self.bound_to()
        tokens, labels = self.tokens(layout), self.labels()
        with torch.no_grad():
            for x, y in zip(a(tokens, labels).logits, b(tokens, labels).logits):
                torch.testing.assert_close(x, y)

    # -- checks ---------------------------------------------------------------------------------------------
    def _assert_argmax(self, seq: Tensor, out: GeneratorOut) -> None:
        for k, logits in enumerate(out.logits):
            chosen = logits.gather(-1, seq[..., k : k + 1]).squeeze(-1)
            gap = logits.max(-1).values - chosen  # 0 where the sampler chose the forward pass's argmax
            worst = float(gap.max())
            step = int(gap.amax(0).argmax())
            assert worst <= self.logit_tolerance, (
                f"column {k}: the cached greedy sampler chose a token {worst:.3g} below the uncached forward pass's "
                f"best logit (first at step {step}): the cache or the step inputs differ from teacher forcing"
            )
