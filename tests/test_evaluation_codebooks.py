"""Held-out codebook usage is read through the quantizer's token layout: one histogram per codebook it names."""

from __future__ import annotations

import pytest
import torch

from xqgan_core import build
from xqgan_core.evaluation import evaluate
from xqgan_core.model import TokenizerModel

CNN = {"use": "cnn", "channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "z_channels": 8,
       "level_attention": False, "mid_attention": False}  # fmt: skip
VQ = {"use": "vq", "codebook_size": 16, "dim": 4, "l2_norm": False, "init_scale": 1.0}


def _usage(indices: torch.Tensor, size: int) -> tuple[float, float]:
    counts = torch.bincount(indices.flatten(), minlength=size).double()
    probs = counts[counts > 0] / counts.sum()
    return 100.0 * probs.numel() / size, float(torch.exp(-(probs * probs.log()).sum()))


@pytest.mark.parametrize("shared", [False, True])
def test_codebook_metrics_of_a_product_of_residual_quantizers(shared: bool) -> None:
    torch.manual_seed(0)
    quantizer = build("quantizer", {"use": "pq", "branches": 2,
                                    "branch": {"use": "rq", "levels": 2, "code": VQ, "shared_codebook": shared}})
    model = TokenizerModel(build("encoder", {**CNN, "out_dim": 8}), quantizer, build("decoder", {**CNN, "in_dim": 8}))
    images = [{"image": torch.rand(3, 16, 16) * 2 - 1} for _ in range(4)]
    metrics, _ = evaluate(model, images, build("device", "cpu"), batch_size=2, progress=False)
    with torch.no_grad():
        indices = model.eval()(torch.stack([i["image"] for i in images]))[1].indices  # (B, P, N, h, w)
    # separate codebooks: one per branch and level; shared: one per branch, over both levels
    expected = {
        (f"branch{p}/level{n}" if not shared else f"branch{p}"): indices[:, p, n] if not shared else indices[:, p]
        for p in range(2) for n in range(2)
    }
    for name, idx in expected.items():
        utilization, perplexity = _usage(idx, 16)
        assert metrics[f"utilization/{name}"] == pytest.approx(utilization)
        assert metrics[f"perplexity/{name}"] == pytest.approx(perplexity)
    assert metrics["utilization"] == pytest.approx(sum(_usage(i, 16)[0] for i in expected.values()) / len(expected))
    assert not any(key.startswith(("utilization/level", "perplexity/level")) for key in metrics)


def test_codebooks_and_their_sizes_come_from_the_layout_not_the_index_shape() -> None:
    from xqgan_core.interfaces import QuantOut, Quantizer
    from xqgan_core.token_layout import BRANCH, TokenLayout

    class TwoTables(Quantizer):
        """Two codebooks of different sizes (4 and 8) side by side: (B, 2, h, w) indices."""

        dim, codebook_size = 8, 8

        def forward(self, z: torch.Tensor) -> QuantOut:
            idx = torch.stack([torch.zeros_like(z[:, 0], dtype=torch.long),
                               torch.arange(z[0, 0].numel()).view(z.shape[2:]).expand(z.shape[0], -1, -1) % 8], 1)
            return QuantOut(z_q=z, indices=idx)

        def token_layout(self, h: int, w: int) -> TokenLayout:
            return TokenLayout.stack(BRANCH, [TokenLayout.single((h, w), 4), TokenLayout.single((h, w), 8)],
                                     ["small", "large"])

    torch.manual_seed(0)
    model = TokenizerModel(build("encoder", {**CNN, "out_dim": 8}), TwoTables(None), build("decoder", {**CNN, "in_dim": 8}))
    metrics, _ = evaluate(model, [{"image": torch.zeros(3, 16, 16)}], build("device", "cpu"), progress=False)
    assert metrics["utilization/small"] == pytest.approx(25.0)  # 1 of 4 codes
    assert metrics["utilization/large"] == pytest.approx(100.0)  # 8 of 8 codes
    assert metrics["perplexity/small"] == pytest.approx(1.0) and metrics["perplexity/large"] == pytest.approx(8.0)
