"""The contract kit's generator contract, run on the kit's tiny generator (with and without a quantizer)."""

from __future__ import annotations

import pytest
import torch

from xqgan_core.interfaces import GeneratorOut
from xqgan_core.testing import TINY_VQ, GeneratorContract, TinyARGenerator
from xqgan_core.token_layout import TokenLayout


class TestTinyGenerator(GeneratorContract):
    name = "kit-tiny-ar"
    options = {"width": 16, "depth": 2, "heads": 2}


class TestTinyGeneratorOnResidualTokens(GeneratorContract):
    """Bound to a real quantizer's layout: rq's levels are the K columns of a step."""

    name = "kit-tiny-ar"
    options = {"width": 16, "depth": 1, "heads": 2}
    quantizer = {"use": "rq", "levels": 2, "code": TINY_VQ}
    grid = (2, 3)


class _CacheIgnoringGenerator(TinyARGenerator):
    """A broken sampler: re-embeds only the start token at every step (ignores what it sampled)."""

    def _embed_steps(self, tokens):  # type: ignore[no-untyped-def]
        out = super()._embed_steps(tokens)
        return out * 0 if not self.training and tokens.shape[1] == 1 else out


def test_the_contract_catches_a_sampler_that_differs_from_teacher_forcing() -> None:
    contract = TestTinyGenerator()
    layout = contract.layout
    torch.manual_seed(0)
    g = _CacheIgnoringGenerator(contract.spec().config)
    g.bind(layout, None, contract.num_classes)
    g.eval()
    labels = contract.labels()
    with torch.no_grad():
        seq = g.sample(contract.batch_size, labels, top_k=1)
        out = g(seq, labels)
    with pytest.raises(AssertionError, match="cached greedy sampler"):
        contract._assert_argmax(seq, out)


class _PeeksAhead(TinyARGenerator):
    """Not causal: every step's logits see the last step's tokens."""

    def forward(self, tokens, condition):  # type: ignore[no-untyped-def]
        out = super().forward(tokens, condition)
        leak = tokens[:, -1:, :1].float().mean(dim=1, keepdim=True)
        return GeneratorOut(logits=[lg + leak for lg in out.logits], losses=out.losses)


class _DropsLabelsInEval(TinyARGenerator):
    """Label dropout whatever the mode."""

    def forward(self, tokens, condition):  # type: ignore[no-untyped-def]
        was, self.training = self.training, True
        try:
            return super().forward(tokens, condition)
        finally:
            self.training = was


class _IgnoresTopK(TinyARGenerator):
    """Samples from the full distribution even when asked for greedy decoding."""

    def sample(self, n, condition=None, **kwargs):  # type: ignore[no-untyped-def]
        return super().sample(n, condition, **{**kwargs, "top_k": 0})


class _BrokenContract(GeneratorContract):
    name = "kit-tiny-ar"
    options = {"width": 16, "depth": 1, "heads": 2}
    cls: type = TinyARGenerator

    def make(self, num_classes=None, spec=None, seed=0):  # type: ignore[no-untyped-def]
        layout, q = self.bound_to()
        torch.manual_seed(seed)
        g = self.cls((spec or self.spec()).config)
        g.bind(layout, q, self.num_classes if num_classes is None else num_classes)
        return g


@pytest.mark.parametrize("broken, check, message", [
    (_PeeksAhead, "test_forward_is_causal", "steps < 4 changed"),
    (_DropsLabelsInEval, "test_class_dropout_acts_only_in_training", "in eval mode the class must be used"),
    (_IgnoresTopK, "test_greedy_sampling_is_deterministic", "top_k = 1 must be greedy"),
])
def test_the_contract_fails_a_broken_generator(broken, check, message) -> None:
    contract = type("C", (_BrokenContract,), {"cls": broken})()
    with pytest.raises(AssertionError, match=message):
        getattr(contract, check)()
    getattr(type("C", (_BrokenContract,), {})(), check)()  # the same check passes on the intact generator


def test_binding_twice_or_not_at_all_is_refused() -> None:
    g = TinyARGenerator(TinyARGenerator.Config(width=8, depth=1, heads=2))
    with pytest.raises(RuntimeError, match="bind"):
        g(torch.zeros(1, 4, 1, dtype=torch.long), None)
    g.bind(TokenLayout.single((2, 2), 5), None, 0)
    with pytest.raises(RuntimeError, match="already bound"):
        g.bind(TokenLayout.single((2, 2), 5), None, 0)
