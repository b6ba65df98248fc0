"""TokenLayout (indices <-> (B, L, K) token sequences) and the MultiLevelQuantizer base class (one place that
turns ``keep`` into per-sample kept levels and draws the quantizer dropout once)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from xqgan_core import config, section
from xqgan_core.interfaces import QuantOut, Quantizer
from xqgan_core.multilevel import MultiLevelQuantizer
from xqgan_core.quant_ops import LevelDropout, nested_stats
from xqgan_core.token_layout import BRANCH, LEVEL, TokenLayout


def randint(*shape: int, high: int = 16, seed: int = 0) -> Tensor:
    return torch.randint(0, high, shape, generator=torch.Generator().manual_seed(seed))


# ---- TokenLayout ------------------------------------------------------------------------------------------------


def test_single_level_is_row_major_with_one_token_per_step() -> None:
    layout = TokenLayout.single((3, 4), 16)
    assert (layout.length, layout.tokens_per_step, layout.branches, layout.levels) == (12, 1, 1, 1)
    idx = randint(2, 3, 4)
    seq = layout.to_sequence(idx)
    assert seq.shape == (2, 12, 1) and seq.dtype == torch.int64
    assert seq[1, 4 + 3, 0] == idx[1, 1, 3]  # step t is position (t // w, t % w)
    assert torch.equal(layout.from_sequence(seq), idx)


def test_two_branches_and_two_levels_have_the_same_index_shape_but_not_the_same_layout() -> None:
    # a (B, 2, h, w) tensor is ambiguous by its shape; the layouts name what each column is
    one = TokenLayout.single((2, 2), 8)
    branches = TokenLayout.stack(BRANCH, [one, one], ["branch0", "branch1"])
    levels = TokenLayout.stack(LEVEL, [one, one], ["", ""])  # one shared codebook
    assert (branches.branches, branches.levels, branches.codebook_sizes) == (2, 1, {"branch0": 8, "branch1": 8})
    assert (levels.branches, levels.levels, levels.codebook_sizes) == (1, 2, {"": 8})
    idx = randint(3, 2, 2, 2, high=8)
    for layout in (branches, levels):
        seq = layout.to_sequence(idx)
        assert seq.shape == (3, 4, 2) and torch.equal(seq[:, 3], idx[:, :, 1, 1])
        assert torch.equal(layout.from_sequence(seq), idx)
    seq = levels.to_sequence(idx)
    assert list(levels.codebook_tokens(seq)) == [""] and levels.codebook_tokens(seq)[""].numel() == idx.numel()
    assert torch.equal(branches.codebook_tokens(seq)["branch1"], idx[:, 1].flatten())


def test_nested_axes_are_row_major_within_a_step() -> None:
    one = TokenLayout.single((2, 3), 4)
    rq = TokenLayout.stack(LEVEL, [one] * 3, ["level0", "level1", "level2"])
    pq = TokenLayout.stack(BRANCH, [rq, rq], ["branch0", "branch1"])
    assert pq.tokens_per_step == 6 and pq.codebooks[:4] == ("branch0/level0", "branch0/level1", "branch0/level2",
                                                             "branch1/level0")
    idx = randint(2, 2, 3, 2, 3, high=4)  # (B, P, N, h, w)
    seq = pq.to_sequence(idx)
    assert torch.equal(seq[0, 5], idx[0, :, :, 1, 2].flatten())  # branch-major: k = p * N + n
    assert torch.equal(pq.from_sequence(seq), idx)


def test_multi_scale_maps_are_read_scale_after_scale() -> None:
    layout = TokenLayout.single((3, 3), 10).over_scales((1, 2, 3))
    assert (layout.length, layout.tokens_per_step) == (14, 1)
    maps = [randint(2, s, s, high=10, seed=s) for s in (1, 2, 3)]
    seq = layout.to_sequence(maps)
    assert seq[:, 0, 0].tolist() == maps[0].flatten(1)[:, 0].tolist()
    assert torch.equal(seq[:, 1:5, 0], maps[1].flatten(1)) and torch.equal(seq[:, 5:, 0], maps[2].flatten(1))
    back = layout.from_sequence(seq)
    assert isinstance(back, list) and all(torch.equal(a, b) for a, b in zip(back, maps))
    branched = TokenLayout.stack(BRANCH, [layout, layout], ["branch0", "branch1"])
    maps = [randint(2, 2, s, s, high=10, seed=s) for s in (1, 2, 3)]  # (B, P, s, s) per scale
    seq = branched.to_sequence(maps)
    assert seq.shape == (2, 14, 2) and torch.equal(seq[:, 5:, 1], maps[2][:, 1].flatten(1))
    assert all(torch.equal(a, b) for a, b in zip(branched.from_sequence(seq), maps))


def test_shapes_that_do_not_fit_are_refused_clearly() -> None:
    layout = TokenLayout.stack(LEVEL, [TokenLayout.single((4, 4), 16)] * 2, ["level0", "level1"])
    with pytest.raises(ValueError, match=r"expected \(B, 2, 4, 4\)"):
        layout.to_sequence(randint(2, 3, 4, 4))
    with pytest.raises(ValueError, match="expected"):
        layout.to_sequence([randint(2, 2, 4, 4)])
    with pytest.raises(ValueError, match=r"\(B, 16, 2\)"):
        layout.from_sequence(randint(2, 16, 3))
    with pytest.raises(TypeError, match="integers"):
        layout.from_sequence(torch.zeros(2, 16, 2))
    with pytest.raises(ValueError, match="last scale"):
        TokenLayout.single((4, 4), 16).over_scales((1, 2))
    with pytest.raises(ValueError, match="two vocabulary sizes"):
        TokenLayout.stack(LEVEL, [TokenLayout.single((2, 2), 8), TokenLayout.single((2, 2), 9)], ["", ""])
    with pytest.raises(ValueError, match="tokens per step"):
        TokenLayout(grid=(2, 2), vocab_sizes=(8,), codebooks=("a",), axes=((BRANCH, 2),))


def test_the_default_layout_of_a_single_level_quantizer() -> None:
    class Fixed(Quantizer):
        codebook_size = 5

    assert Fixed(None).token_layout(2, 3) == TokenLayout.single((2, 3), 5)
    with pytest.raises(NotImplementedError, match="token_layout"):
        type("Deep", (Fixed,), {"num_levels": 2})(None).token_layout(2, 3)


# ---- MultiLevelQuantizer ----------------------------------------------------------------------------------------


@config
class _StackConfig:
    dropout: LevelDropout = section(LevelDropout, help="quantizer dropout")


class _Stack(MultiLevelQuantizer):
    """Level l adds ``l + 1`` to every channel; indices are ``l + 1`` too (0 where dropped)."""

    dim, codebook_size, num_levels = 2, 8, 3

    def __init__(self, cfg: _StackConfig) -> None:
        super().__init__(cfg)
        self.seen: list[Tensor] = []

    def quantize(self, z: Tensor, keep: Tensor) -> QuantOut:
        self.seen.append(keep)
        total = torch.zeros_like(z)
        indices = []
        for level in range(self.num_levels):
            code = torch.full_like(z, level + 1.0)
            total = total + code * self.level_mask(keep, level, code)
            full = torch.full((z.shape[0], *z.shape[2:]), level + 1)
            indices.append(self.drop_indices(full, keep, level))
        return QuantOut(z_q=total, indices=torch.stack(indices, dim=1))


def test_keep_is_normalised_in_one_place() -> None:
    q = _Stack(_StackConfig()).eval()
    z = torch.zeros(3, 2, 1, 1)
    assert q(z).z_q[:, 0, 0, 0].tolist() == [6.0, 6.0, 6.0]  # eval, no keep: every level
    assert q(z, keep=1).z_q[:, 0, 0, 0].tolist() == [1.0, 1.0, 1.0]
    out = q(z, keep=torch.tensor([0, 2, 3], dtype=torch.int32))
    assert out.z_q[:, 0, 0, 0].tolist() == [0.0, 3.0, 6.0]
    assert out.indices[:, :, 0, 0].tolist() == [[0, 0, 0], [1, 2, 0], [1, 2, 3]]
    assert all(k.dtype == torch.int64 and k.shape == (3,) for k in q.seen)
    explicit = torch.tensor([1, 2, 3])
    q(z, keep=explicit)
    assert q.seen[-1] is explicit  # an int64 tensor on the right device is passed on as it is
    for bad in (torch.ones(2, dtype=torch.long), torch.ones(3), torch.ones(3, dtype=torch.bool), 4, -1, 1.5, True):
        with pytest.raises(ValueError, match="keep must be"):
            q(z, keep=bad)


def test_dropout_is_drawn_once_per_forward_in_training_only() -> None:
    q = _Stack(_StackConfig(dropout=LevelDropout(rate=1.0, min_levels=1)))
    z = torch.zeros(400, 2, 1, 1)
    torch.manual_seed(0)
    q.train()(z)
    assert len(q.seen) == 1 and set(q.seen[0].tolist()) == {1, 2, 3}
    assert q.eval()(z).z_q.eq(6.0).all()
    q.seen.clear()
    q.train()(z, keep=2)  # an explicit keep is not replaced by a draw
    assert q.seen[0].eq(2).all()


def test_a_subclass_without_a_dropout_section_says_what_to_override() -> None:
    class NoDropout(_Stack):
        pass

    with pytest.raises(NotImplementedError, match="level_dropout"):
        NoDropout(object()).train()(torch.zeros(1, 2, 1, 1))


# ---- stats stay tensors -----------------------------------------------------------------------------------------


def test_nested_stats_average_tensors_without_leaving_the_device_dtype() -> None:
    parts = [{"perplexity": torch.tensor(2.0), "x/y": torch.tensor(1.0)}, {"perplexity": torch.tensor(4.0)}]
    stats = nested_stats(parts, "level")
    assert isinstance(stats["perplexity"], Tensor) and stats["perplexity"].ndim == 0
    assert float(stats["perplexity"]) == 3.0
    assert set(stats) == {"perplexity", "level0/perplexity", "level0/x/y", "level1/perplexity"}
