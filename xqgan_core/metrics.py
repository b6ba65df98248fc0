"""Evaluation metrics for reconstructions: PSNR, SSIM, codebook usage, and a running mean of per-image values.

Images are tensors (B, 3, H, W) in [-1, 1], as everywhere in the core. PSNR and SSIM are computed on the [0, 1]
scale (data range 1) after clamping, i.e. on the image a user would actually save.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from .token_layout import TokenLayout

__all__ = ["psnr", "ssim", "bicubic_thumbnail", "CodebookUsage", "MetricAverager", "VarCodebookUsage"]

_SSIM_WINDOW = 11
_SSIM_SIGMA = 1.5
_SSIM_K1 = 0.01
_SSIM_K2 = 0.03
#: The smallest image side ``ssim`` accepts (its window); run files are checked against it when validated.
SSIM_MIN_SIZE = _SSIM_WINDOW


def _to_unit(x: Tensor, y: Tensor, name: str) -> tuple[Tensor, Tensor]:
    """Check shapes and map both images from [-1, 1] to clamped float32 [0, 1]."""
    if x.shape != y.shape:
        raise ValueError(f"{name}: images differ in shape, {tuple(x.shape)} vs {tuple(y.shape)}")
    if x.dim() != 4:
        raise ValueError(f"{name}: expected images (B, C, H, W), got shape {tuple(x.shape)}")
    x = ((x.detach().float() + 1) / 2).clamp(0, 1)
    y = ((y.detach().float() + 1) / 2).clamp(0, 1)
    return x, y


@torch.no_grad()
def psnr(x: Tensor, y: Tensor) -> Tensor:
    """Peak signal-to-noise ratio per image, in dB, on the [0, 1] scale: (B,). Identical images give +inf."""
    x, y = _to_unit(x, y, "psnr")
    mse = (x - y).pow(2).mean(dim=(1, 2, 3))
    return 10 * torch.log10(1.0 / mse)


def _gaussian_taps(device: torch.device) -> Tensor:
    radius = _SSIM_WINDOW // 2
    pos = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    taps = torch.exp(-(pos**2) / (2 * _SSIM_SIGMA**2))
    return taps / taps.sum()


@torch.no_grad()
def ssim(x: Tensor, y: Tensor) -> Tensor:
    """Structural similarity per image (Wang et al. 2004): (B,).

    Gaussian window 11x11 with sigma 1.5, K1 = 0.01, K2 = 0.03, data range 1, population (not sample) variances.
    The SSIM map is taken over the 'valid' region only (no padding, so borders are not biased by an invented
    extension), averaged per channel, then over channels. This equals scikit-image's ``structural_similarity``
    with ``gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1``, which filters with
    padding and then crops the same border away.
    """
    x, y = _to_unit(x, y, "ssim")
    b, c, h, w = x.shape
    if h < _SSIM_WINDOW or w < _SSIM_WINDOW:
        raise ValueError(f"ssim: images must be at least {_SSIM_WINDOW}x{_SSIM_WINDOW}, got {h}x{w}")
    # One depthwise separable blur for all five local statistics at once.
    stats = torch.cat([x, y, x * x, y * y, x * y], dim=1)
    taps = _gaussian_taps(x.device)
    groups = stats.shape[1]
    stats = F.conv2d(stats, taps.view(1, 1, -1, 1).expand(groups, 1, -1, 1), groups=groups)
    stats = F.conv2d(stats, taps.view(1, 1, 1, -1).expand(groups, 1, 1, -1), groups=groups)
    mu_x, mu_y, e_xx, e_yy, e_xy = stats.split(c, dim=1)
    var_x = e_xx - mu_x * mu_x
    var_y = e_yy - mu_y * mu_y
    cov_xy = e_xy - mu_x * mu_y
    c1 = _SSIM_K1**2
    c2 = _SSIM_K2**2
    num = (2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)
    den = (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
    return (num / den).mean(dim=(1, 2, 3))


@torch.no_grad()
def bicubic_thumbnail(images: Tensor, size: tuple[int, int]) -> Tensor:
    """The baseline a tokenizer has to beat: ``images`` shrunk to ``size`` and enlarged back, clamped to [-1, 1].

    Shrinking is antialiased bicubic, enlarging plain bicubic. At the token grid's size this is what a user gets
    without any learning: a 16x16 RGB thumbnail (6144 bits at 8 bits per value) against, e.g., 256 tokens of a
    512-entry codebook (2304 bits). Scored with ``psnr``/``ssim`` it is the "thumbnail/..." line of evaluation.
    """
    if images.dim() != 4:
        raise ValueError(f"bicubic_thumbnail: expected images (B, C, H, W), got shape {tuple(images.shape)}")
    x = images.detach().float()
    small = F.interpolate(x, size=tuple(size), mode="bicubic", align_corners=False, antialias=True)
    return F.interpolate(small, size=x.shape[-2:], mode="bicubic", align_corners=False).clamp(-1, 1)


class CodebookUsage:
    """Histogram of code indices over an evaluation pass -> utilization and perplexity.

    ``update`` takes the indices of each codebook:

    * one integer tensor of any shape: one codebook;
    * a list of tensors: one codebook per element ("level").

    Split a quantizer's indices by codebook through its token layout rather than by their shape (a (B, 2, h, w)
    tensor may be 2 product branches or 2 residual levels): ``layout = quantizer.token_layout(h, w)``, then
    ``layout.codebook_tokens(layout.to_sequence(indices))`` (name -> indices) and ``layout.codebook_sizes``.

    ``codebook_size`` is an int (every level), a sequence with one entry per level, or None. A level whose size
    is unknown still gets a perplexity, but no utilization (a fraction of an unknown total is meaningless).
    Memory is O(codebook size) per level: only the counts (``counts``, one int64 tensor per level) are kept,
    on the device of the indices; they can be all-reduced across ranks before ``compute``.
    """

    def __init__(self, codebook_size: int | Sequence[int | None] | None = None) -> None:
        self._configured: int | list[int | None] | None = (
            codebook_size if codebook_size is None or isinstance(codebook_size, int) else list(codebook_size)
        )
        for size in self._configured if isinstance(self._configured, list) else [self._configured]:
            if size is not None and size < 1:
                raise ValueError(f"CodebookUsage: codebook sizes must be positive, got {size}")
        self._sizes: list[int | None] | None = None  # per level, fixed by the first update of a pass
        self.counts: list[Tensor] | None = None
        self._multi_level = False

    def reset(self) -> None:
        """Forget every index seen so far (start of a new evaluation pass)."""
        self.counts = None
        self._sizes = None

    def update(self, indices: Tensor | Sequence[Tensor]) -> None:
        """Count one batch of indices (one tensor, or one tensor per level)."""
        multi = not isinstance(indices, Tensor)
        levels: list[Tensor] = list(indices) if multi else [indices]  # type: ignore[arg-type]
        if not levels:
            raise ValueError("CodebookUsage.update: got an empty list of index tensors")
        if self.counts is None:
            if isinstance(self._configured, list):
                if len(self._configured) != len(levels):
                    raise ValueError(
                        f"CodebookUsage.update: got {len(levels)} level(s) but {len(self._configured)} codebook size(s)"
                    )
                sizes = list(self._configured)
            else:
                sizes = [self._configured] * len(levels)
            self._sizes = sizes
            self._multi_level = multi
            self.counts = [torch.zeros(s or 0, dtype=torch.long, device=t.device) for s, t in zip(sizes, levels)]
        elif len(levels) != len(self.counts):
            raise ValueError(
                f"CodebookUsage.update: got {len(levels)} level(s), earlier batches had {len(self.counts)}"
            )
        for level, idx in enumerate(levels):
            self.counts[level] = self._add(level, idx)

    def _add(self, level: int, idx: Tensor) -> Tensor:
        assert self.counts is not None and self._sizes is not None
        if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
            raise TypeError(f"CodebookUsage: indices must be an integer tensor, got {idx.dtype} (level {level})")
        counts = self.counts[level]
        size = self._sizes[level]
        flat = idx.detach().reshape(-1).to(device=counts.device, dtype=torch.long)
        try:
            hist = torch.bincount(flat, minlength=counts.numel())
        except RuntimeError as exc:  # negative values
            raise ValueError(f"CodebookUsage: indices must be non-negative (level {level}): {exc}") from exc
        if size is not None and hist.numel() > size:
            raise ValueError(
                f"CodebookUsage: index {hist.numel() - 1} is out of range for codebook size {size} (level {level})"
            )
        if hist.numel() > counts.numel():  # unknown size: the histogram grows with the largest index seen
            counts = F.pad(counts, (0, hist.numel() - counts.numel()))
        return counts + hist

    def per_level(self) -> list[dict[str, float]]:
        """``[{"utilization": %, "perplexity": p, "codes_used": n}, ...]``, one per level (no utilization when
        the level's codebook size is unknown). Empty before the first ``update``."""
        if self.counts is None:
            return []
        assert self._sizes is not None
        out = []
        for counts, size in zip(self.counts, self._sizes):
            counts = counts.detach().to("cpu", torch.float64)
            total = counts.sum().item()
            used = int((counts > 0).sum().item())
            probs = counts[counts > 0] / total if total > 0 else counts[:0]
            entropy = -(probs * probs.log()).sum().item()
            row = {"perplexity": math.exp(entropy) if total > 0 else 0.0, "codes_used": float(used)}
            if size is not None:
                row["utilization"] = 100.0 * used / size
            out.append(row)
        return out

    def compute(self) -> dict[str, float]:
        """``utilization`` (% of codes used at least once) and ``perplexity`` (exp of the histogram's entropy).

        With several levels these two are means over the levels, and ``utilization/<i>``, ``perplexity/<i>``
        hold each level's own. Empty dict before the first ``update``.
        """
        rows = self.per_level()
        if not rows:
            return {}
        out: dict[str, float] = {}
        utils = [r["utilization"] for r in rows if "utilization" in r]
        if utils:
            out["utilization"] = sum(utils) / len(utils)
        out["perplexity"] = sum(r["perplexity"] for r in rows) / len(rows)
        if self._multi_level:
            for i, r in enumerate(rows):
                if "utilization" in r:
                    out[f"utilization/{i}"] = r["utilization"]
                out[f"perplexity/{i}"] = r["perplexity"]
        return out


class MetricAverager:
    """Running means of per-image metric values over an evaluation pass.

    ``update(psnr=tensor_B, ssim=tensor_B, ...)`` adds each image's value; ``compute()`` returns the mean per
    name. Sums are kept in float64 on the host (``sums``, ``counts``) so a long pass loses no precision and the
    totals can be combined across ranks.
    """

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def reset(self) -> None:
        self.sums.clear()
        self.counts.clear()

    def update(
        self, values: Mapping[str, Tensor | float | Sequence[float]] | None = None, **kw: Tensor | float
    ) -> None:
        """Add per-image values: a tensor (B,) or a sequence counts each element as one image; a number counts once."""
        merged: dict[str, Tensor | float | Sequence[float]] = dict(values or {})
        merged.update(kw)
        for name, value in merged.items():
            t = value.detach() if isinstance(value, Tensor) else torch.as_tensor(value)
            t = t.to("cpu", torch.float64).reshape(-1)
            self.sums[name] = self.sums.get(name, 0.0) + t.sum().item()
            self.counts[name] = self.counts.get(name, 0) + t.numel()

    def compute(self) -> dict[str, float]:
        """Mean of every metric that received at least one value."""
        return {name: self.sums[name] / n for name, n in self.counts.items() if n > 0}


class VarCodebookUsage:
    """The codebook usage VAR and the XQ-GAN reference code print ("usage"), made a deterministic evaluation metric.

    Not the same number as ``CodebookUsage``'s ``utilization`` (% of codes used at least once over the pass).
    The reference counts, per scale of a multi-scale quantizer, how often each code is hit; a code counts as used
    when its hits reach a margin of 8 % of the hits it would get if all *full-resolution* latent positions were
    spread evenly over the V codes: ``hits >= 0.08 * positions / V`` with ``positions = images * H * W`` (H x W the
    finest grid, also for the coarse scales, which therefore read low). Its usage is then the % of codes used, per
    scale, averaged over product branches and over scales.

    The reference applies the margin per training step to an EMA of per-step, all-reduced hits (decay 0.9 for the
    first 100 steps, then 0.99), with ``positions = world * B * H * W``: usage during training, dependent on the batch
    size and the last ~100 steps. Here the hits are summed over one evaluation pass and the margin scaled to all
    its images, which is the same test on the mean per-image hits: deterministic, batch-size independent, the
    same numbers on any number of ranks (sum ``counts`` across ranks before ``compute``).

    Generalised to every token layout: each (column, scale) pair is one "slot" (a residual level or a product
    branch is a column; single-map quantizers have one scale). ``compute`` returns ``var_usage`` (mean over slots),
    ``var_usage/<codebook>`` when there are several codebooks, and ``var_usage/scale<i>`` (mean over columns) for
    multi-scale layouts.
    """

    MARGIN = 0.08

    def __init__(self, layout: TokenLayout) -> None:
        self.layout = layout
        sides = list(layout.scales) or [None]
        self._spans: list[tuple[int, int]] = []
        start = 0
        for side in sides:
            length = side * side if side is not None else layout.length
            self._spans.append((start, start + length))
            start += length
        self.counts: list[list[Tensor]] | None = None  # [column][scale] -> (V_column,) int64
        self.images = 0

    def update(self, sequence: Tensor) -> None:
        """Count one batch of token sequences ``(B, L, K)`` in the layout's order."""
        b, length, k = sequence.shape
        if (length, k) != (self.layout.length, self.layout.tokens_per_step):
            raise ValueError(f"VarCodebookUsage: expected token sequences (B, {self.layout.length}, "
                             f"{self.layout.tokens_per_step}), got {tuple(sequence.shape)}")
        if self.counts is None:
            self.counts = [[torch.zeros(v, dtype=torch.long, device=sequence.device) for _ in self._spans]
                           for v in self.layout.vocab_sizes]
        for column, vocab in enumerate(self.layout.vocab_sizes):
            for s, (start, stop) in enumerate(self._spans):
                hits = torch.bincount(sequence[:, start:stop, column].reshape(-1).long(), minlength=vocab)
                if hits.numel() > vocab:
                    raise ValueError(f"VarCodebookUsage: index {hits.numel() - 1} out of range for codebook "
                                     f"{self.layout.codebooks[column]!r} of size {vocab}")
                self.counts[column][s] += hits
        self.images += b

    def per_slot(self) -> list[list[float]]:
        """% of codes at or above the margin, ``[column][scale]``."""
        if self.counts is None or self.images == 0:
            return []
        positions = self.images * self.layout.grid[0] * self.layout.grid[1]
        out = []
        for column, vocab in enumerate(self.layout.vocab_sizes):
            margin = self.MARGIN * positions / vocab
            out.append([100.0 * (c.double() >= margin).double().mean().item() for c in self.counts[column]])
        return out

    def compute(self) -> dict[str, float]:
        slots = self.per_slot()
        if not slots:
            return {}
        mean = lambda values: sum(values) / len(values)  # noqa: E731
        out = {"var_usage": mean([u for column in slots for u in column])}
        names = list(dict.fromkeys(self.layout.codebooks))
        if len(names) > 1:
            for name in names:
                out[f"var_usage/{name}"] = mean([u for c, column in enumerate(slots) if self.layout.codebooks[c] == name
                                                 for u in column])
        if self.layout.scales:
            for s in range(len(self._spans)):
                out[f"var_usage/scale{s}"] = mean([column[s] for column in slots])
        return out
