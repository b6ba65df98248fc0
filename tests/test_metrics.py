"""PSNR / SSIM against scikit-image, codebook usage and averaging against brute force."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from xqgan_core.metrics import CodebookUsage, MetricAverager, psnr, ssim


def _unit_np(img: torch.Tensor) -> np.ndarray:
    """(3,H,W) in [-1,1] -> (H,W,3) float64 in [0,1], what scikit-image is given."""
    return ((img.double() + 1) / 2).clamp(0, 1).permute(1, 2, 0).numpy()


def _sk_ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    return structural_similarity(
        _unit_np(a),
        _unit_np(b),
        channel_axis=2,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=1.0,
    )


def _smooth(b: int, h: int, w: int, gen: torch.Generator) -> torch.Tensor:
    """Low-frequency images in [-1, 1]: upsampled coarse noise."""
    coarse = torch.rand(b, 3, h // 8, w // 8, generator=gen) * 2 - 1
    return F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False).clamp(-1, 1)


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def test_psnr_matches_skimage_per_image(gen: torch.Generator) -> None:
    x = torch.rand(4, 3, 24, 32, generator=gen) * 2 - 1
    y = (x + 0.1 * torch.randn(x.shape, generator=gen) * torch.arange(1, 5).view(4, 1, 1, 1)).clamp(-1, 1)
    got = psnr(x, y)
    assert got.shape == (4,)
    want = [peak_signal_noise_ratio(_unit_np(x[i]), _unit_np(y[i]), data_range=1.0) for i in range(4)]
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-3)
    assert got[0] > got[3]  # more noise, lower PSNR


def test_psnr_identical_is_inf_and_values_are_clamped(gen: torch.Generator) -> None:
    x = torch.rand(2, 3, 16, 16, generator=gen) * 2 - 1
    assert torch.isinf(psnr(x, x)).all()
    # Out-of-range decoder output is judged as the saved (clamped) image would be.
    over = x.clone()
    over[0, 0, 0, 0] = 5.0
    clamped = over.clamp(-1, 1)
    torch.testing.assert_close(psnr(over, x), psnr(clamped, x))


@pytest.mark.parametrize("kind", ["random", "smooth"])
def test_ssim_matches_skimage(kind: str, gen: torch.Generator) -> None:
    b, h, w = 3, 40, 48
    x = torch.rand(b, 3, h, w, generator=gen) * 2 - 1 if kind == "random" else _smooth(b, h, w, gen)
    noise = torch.randn(x.shape, generator=gen) * torch.tensor([0.05, 0.2, 0.6]).view(b, 1, 1, 1)
    y = (x + noise).clamp(-1, 1)
    got = ssim(x, y)
    want = [_sk_ssim(x[i], y[i]) for i in range(b)]
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-3)
    # Also a pair of unrelated images (low, possibly negative SSIM) and identical images (exactly 1).
    z = torch.rand(x.shape, generator=gen) * 2 - 1 if kind == "random" else _smooth(b, h, w, gen)
    np.testing.assert_allclose(ssim(x, z).numpy(), [_sk_ssim(x[i], z[i]) for i in range(b)], rtol=0, atol=1e-3)
    np.testing.assert_allclose(ssim(x, x).numpy(), np.ones(b), rtol=0, atol=1e-5)


def test_ssim_channels_are_averaged(gen: torch.Generator) -> None:
    x = _smooth(1, 32, 32, gen)
    y = x.clone()
    y[:, 1] = (y[:, 1] + 0.5 * torch.randn(y[:, 1].shape, generator=gen)).clamp(-1, 1)  # only green damaged
    per_channel = [
        structural_similarity(
            _unit_np(x[0])[..., c], _unit_np(y[0])[..., c],
            gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0,
        )
        for c in range(3)
    ]
    assert per_channel[0] == pytest.approx(1.0) and per_channel[1] < 0.9
    assert ssim(x, y).item() == pytest.approx(float(np.mean(per_channel)), abs=1e-3)


def test_ssim_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="at least 11"):
        ssim(torch.zeros(1, 3, 10, 32), torch.zeros(1, 3, 10, 32))
    with pytest.raises(ValueError, match="differ in shape"):
        ssim(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 17))
    with pytest.raises(ValueError, match="B, C, H, W"):
        psnr(torch.zeros(3, 16, 16), torch.zeros(3, 16, 16))


def _brute_usage(values: list[int], size: int) -> tuple[float, float]:
    hist = Counter(values)
    total = len(values)
    entropy = -sum(n / total * math.log(n / total) for n in hist.values())
    return 100.0 * len(hist) / size, math.exp(entropy)


def test_codebook_usage_single_level_matches_brute_force(gen: torch.Generator) -> None:
    size = 64
    usage = CodebookUsage(size)
    seen: list[int] = []
    for _ in range(5):
        # skewed: mostly the first 20 codes, so utilization is well below 100% and perplexity below size
        idx = (torch.rand(2, 4, 4, generator=gen) ** 3 * 20).long()
        usage.update(idx)
        seen += idx.flatten().tolist()
    util, ppl = _brute_usage(seen, size)
    out = usage.compute()
    assert set(out) == {"utilization", "perplexity"}
    assert out["utilization"] == pytest.approx(util)
    assert out["perplexity"] == pytest.approx(ppl)
    assert 0 < out["utilization"] < 100 * 20 / size + 1e-9
    assert usage.counts is not None and usage.counts[0].numel() == size


def test_codebook_usage_uniform_and_single_code() -> None:
    usage = CodebookUsage(8)
    usage.update(torch.arange(8).repeat(3))
    assert usage.compute() == {"utilization": pytest.approx(100.0), "perplexity": pytest.approx(8.0)}
    usage.reset()
    usage.update(torch.full((5,), 3))
    assert usage.compute() == {"utilization": pytest.approx(12.5), "perplexity": pytest.approx(1.0)}


def test_codebook_usage_multi_level_with_own_sizes(gen: torch.Generator) -> None:
    sizes = [16, 32, None]
    usage = CodebookUsage(sizes)
    seen: list[list[int]] = [[], [], []]
    for _ in range(3):
        levels = [
            torch.randint(0, 10, (2, 2, 2), generator=gen),
            torch.randint(0, 32, (2, 4, 4), generator=gen),
            torch.randint(0, 7, (2, 8, 8), generator=gen),
        ]
        usage.update(levels)
        for i, t in enumerate(levels):
            seen[i] += t.flatten().tolist()
    out = usage.compute()
    utils = []
    ppls = []
    for i, size in enumerate(sizes):
        util, ppl = _brute_usage(seen[i], size or 1)
        assert out[f"perplexity/{i}"] == pytest.approx(ppl)
        ppls.append(ppl)
        if size is None:
            assert f"utilization/{i}" not in out  # unknown codebook size: no utilization
        else:
            assert out[f"utilization/{i}"] == pytest.approx(util)
            utils.append(util)
    assert out["utilization"] == pytest.approx(sum(utils) / 2)
    assert out["perplexity"] == pytest.approx(sum(ppls) / 3)
    assert usage.per_level()[2]["codes_used"] == len(set(seen[2]))


def test_codebook_usage_shared_size_for_list_and_errors() -> None:
    usage = CodebookUsage(4)
    usage.update([torch.tensor([0, 1]), torch.tensor([3, 3])])
    out = usage.compute()
    assert out["utilization/0"] == pytest.approx(50.0) and out["utilization/1"] == pytest.approx(25.0)
    with pytest.raises(ValueError, match="level"):
        usage.update([torch.tensor([0])])
    with pytest.raises(ValueError, match="out of range"):
        CodebookUsage(4).update(torch.tensor([4]))
    with pytest.raises(ValueError, match="non-negative"):
        CodebookUsage(4).update(torch.tensor([-1, 2]))
    with pytest.raises(TypeError, match="integer"):
        CodebookUsage(4).update(torch.tensor([0.0]))
    with pytest.raises(ValueError, match="codebook size"):
        CodebookUsage([4, 4]).update(torch.tensor([0]))
    assert CodebookUsage(4).compute() == {}


def test_metric_averager_means_over_images(gen: torch.Generator) -> None:
    avg = MetricAverager()
    all_psnr: list[float] = []
    all_ssim: list[float] = []
    for b in (3, 1, 4):
        p = torch.rand(b, generator=gen) * 40
        s = torch.rand(b, generator=gen)
        avg.update(psnr=p, ssim=s)
        all_psnr += p.tolist()
        all_ssim += s.tolist()
    avg.update({"lpips": [0.5, 0.25]})
    out = avg.compute()
    assert out["psnr"] == pytest.approx(float(np.mean(all_psnr)))
    assert out["ssim"] == pytest.approx(float(np.mean(all_ssim)))
    assert out["lpips"] == pytest.approx(0.375)
    assert avg.counts == {"psnr": 8, "ssim": 8, "lpips": 2}
    avg.reset()
    assert avg.compute() == {}
