"""Residual quantization (XQ-GAN Sec. 4.2, RQ-VAE): N levels, each quantizing what the previous ones left over.

Forward, for a latent ``z`` and a nested single-level quantizer ``Q_l`` per level (``code``)::

    r_0 = z
    c_l = Q_l(r_l)                    # the level's quantized value (its code), l = 0 .. N-1
    r_{l+1} = r_l - sg(c_l)
    z_q = z + sg(sum_l m_l * c_l - z) # straight-through; m_l = 1 if the sample keeps level l

**What is added.** A level adds its inner quantizer's code exactly as that quantizer defines it (the value of its
``z_q``, equal to its ``indices_to_codes``), so ``indices_to_codes`` of rq is the sum of the levels' codes and inverts
``forward`` exactly in eval mode, whatever the inner quantizer is (VQ, LFQ, BSQ, or a product of them). With the
``vq`` default ``l2_norm = true`` every code is a unit vector: level l searches by cosine on the normalised residual
and adds a unit-norm code, so depth adds resolution in direction but the residual does not shrink below what unit
steps allow. VAR/XQ-GAN (and ``msrq``'s default ``accumulate = "raw"``) instead search by cosine and add the *raw*
codebook row; they can because their losses are computed on the running sum of raw rows, which trains the rows'
lengths. rq keeps the inner quantizer's own losses (below), and a normalised VQ's losses never train a row's length,
so adding raw rows here would add lengths nothing learns. For a residual whose error shrinks with depth (as in
RQ-VAE) use ``code = {use = "vq", l2_norm = false}``: the stored row is then both what is added and what the losses
train; the tests check the error is non-increasing with depth for such codebooks fitted to the data.

**Gradients.**

* ``z_q`` is the straight-through estimate of ``z`` itself: the reconstruction gradient reaches ``z`` unchanged
  (identity, even when the inner quantizer normalises its input: the sum of codes approximates ``z``, not its
  normalisation) and never reaches a codebook. The inner quantizers' own straight-through graphs are not used.
* The residual is formed from the *detached* code, so ``r_l = z - sg(c_0 + ... + c_{l-1})`` and dr_l/dz = I. Level
  l's commitment loss ``beta * mean((sg c_l - r_l)^2)`` is therefore ``beta * mean((z - sg(partial sum up to l))^2)``:
  the encoder is pulled towards every partial reconstruction (RQ-VAE's commitment over depth). Had the residual used
  the inner's straight-through ``z_q`` (value ``c_l``, gradient ``I``), ``r_{l+1}`` would carry no gradient at all
  and the deeper levels' commitment losses would never reach the encoder.
* Level l's codebook loss ``mean((c_l - sg r_l)^2)`` fits level l's codebook to the residuals it is given.
* Losses: the inner quantizers' same-named losses are averaged over levels (``mean_losses``), so the total does not
  grow with depth.

**Quantizer dropout** (Sec. 4.2, Eq. 3). ``keep`` (an int or a (B,) tensor; drawn once by the core's
``MultiLevelQuantizer`` from the ``dropout`` section when not given) says how many leading levels each sample keeps. Every level still runs on the whole batch
(static shapes: no per-sample gathers, every codebook gets a gradient each step, which DDP and HPU graphs need), but
a level a sample does not keep contributes nothing to its ``z_q`` and reports index 0 there. Its losses still count:
they train the deeper levels on that sample's residual as if it were kept, which is what they do for every other
sample. Dropout only happens in training; in eval every level is kept, unless ``keep`` is passed explicitly.
``indices_to_codes`` cannot tell a dropped level's index 0 from code 0: pass the same ``keep`` to it (or decode eval
indices, where nothing is dropped).

**Codebooks.** ``shared_codebook = false`` builds one inner module per level (``codes.0`` .. ``codes.{N-1}``);
``true`` builds one (``codes.0``) used at every level (paper: "shares the same codebook across scales").

**Token layout**: ``L = h * w`` positions, ``K = N`` tokens per position (level after level; the inner quantizer's
own columns within a level, e.g. a pq's branches). Columns are named ``level{i}`` (the held-out codebook metrics'
names; ``level0/branch1`` over a pq) or, with a shared codebook, all by the inner quantizer's own name(s).

**Stats.** Each level's inner stats under ``level{i}/`` (``level0/perplexity``, ``level0/utilization``, ...; computed by
the inner quantizer on the whole batch), plus ``perplexity``/``utilization`` (and any other top-level inner stat)
averaged over levels; 0-d tensors, as the inner quantizer's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from xqgan_core import ComponentSpec, component, config, option, positive, section
from xqgan_core.errors import ConfigError
from xqgan_core.interfaces import Indices, QuantOut
from xqgan_core.multilevel import Keep, MultiLevelQuantizer
from xqgan_core.quant_ops import LevelDropout, mean_losses, nested_stats, straight_through
from xqgan_core.token_layout import LEVEL, TokenLayout


class ResidualQuantizer(MultiLevelQuantizer):
    """``forward(z (B, dim, H, W), keep=None) -> QuantOut(z_q, indices (B, levels, H, W) int64, losses, stats)``."""

    plugin_api = 1

    @config
    class Config:
        levels: int = option(4, help="number of residual levels N (tokens per position)", validator=positive())
        code: ComponentSpec = component(
            "quantizer",
            default={"use": "vq"},
            help="the single-level quantizer applied at each level (vq, lfq, bsq, ...); its dim and codebook_size "
            "are rq's. For vq, l2_norm = false makes the residual shrink with depth (see the plugin README)",
        )
        shared_codebook: bool = option(
            False, help="one quantizer (one codebook) used at every level instead of one per level"
        )
        dropout: LevelDropout = section(
            LevelDropout,
            help="quantizer dropout in training: a fraction of samples keeps only the first n levels "
            "(paper: rate = 0.1, min_levels = 3)",
        )

    @classmethod
    def config_dim(cls, config: Config) -> int | None:
        """The nested quantizer's dim."""
        return config.code.cls.config_dim(config.code.config)

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.codes = nn.ModuleList(config.code.build() for _ in range(1 if config.shared_codebook else config.levels))
        inner = self.codes[0]
        if getattr(inner, "num_levels", 1) != 1:
            raise ConfigError(
                [f"quantizer.code: rq needs a single-level quantizer at each level; '{config.code.use}' has "
                 f"{inner.num_levels} levels (nest the other way round, e.g. pq over rq)"]
            )
        self.dim = inner.dim
        self.codebook_size = inner.codebook_size
        self.num_levels = config.levels

    def level(self, i: int) -> Any:
        """The quantizer of level ``i`` (the shared one when ``shared_codebook``)."""
        return self.codes[0 if self.config.shared_codebook else i]

    def quantize(self, z: Tensor, keep: Tensor) -> QuantOut:
        if z.ndim != 4 or z.shape[1] != self.dim:
            raise ValueError(f"rq expects latents of shape (B, {self.dim}, H, W), got {tuple(z.shape)}")
        # the residual chain runs in >= fp32 so that bf16 inputs do not lose the small late-level residuals
        residual = z.to(torch.promote_types(z.dtype, torch.float32))
        total = torch.zeros_like(residual)
        indices: list[Tensor] = []
        losses: list[dict[str, Tensor]] = []
        stats: list[dict[str, Any]] = []
        for i in range(self.num_levels):
            out = self.level(i)(residual)
            code = out.z_q.detach().to(residual.dtype)  # the code's value, without the inner straight-through graph
            total = total + code * self.level_mask(keep, i, code)
            indices.append(self.drop_indices(out.indices, keep, i))
            losses.append(out.losses)
            stats.append(out.stats)
            if i + 1 < self.num_levels:
                residual = residual - code
        return QuantOut(
            z_q=straight_through(z, total),
            indices=torch.stack(indices, dim=1),
            losses=mean_losses(losses),
            stats=nested_stats(stats, "level"),
        )

    def indices_to_codes(self, indices: Indices, keep: Keep = None) -> Tensor:
        """``(B, levels, H, W)`` indices -> the sum of the levels' codes ``(B, dim, H, W)``, in >= fp32.

        ``keep`` (a (B,) tensor or an int) sums only each sample's first n levels: decode at a lower bitrate, or
        decode training-mode indices whose dropped levels carry index 0.
        """
        if not isinstance(indices, Tensor) or indices.ndim < 2 or indices.shape[1] != self.num_levels:
            shape = tuple(indices.shape) if isinstance(indices, Tensor) else type(indices).__name__
            raise ValueError(f"rq expects indices as one (B, {self.num_levels}, H, W) tensor, got {shape}")
        kept = None if keep is None else self.normalize_keep(keep, indices.shape[0], indices.device)
        total: Tensor | None = None
        for i in range(self.num_levels):
            code = self.level(i).indices_to_codes(indices[:, i])
            code = code.to(torch.promote_types(code.dtype, torch.float32))
            if kept is not None:
                code = code * self.level_mask(kept, i, code)
            total = code if total is None else total + code
        assert total is not None
        return total

    def token_layout(self, h: int, w: int) -> TokenLayout:
        """``L = h * w``, ``K = levels`` (times the inner quantizer's K); see the module docstring for the names."""
        shared = self.config.shared_codebook
        parts = [self.level(i).token_layout(h, w) for i in range(self.num_levels)]
        return TokenLayout.stack(LEVEL, parts, ["" if shared else f"level{i}" for i in range(self.num_levels)])

    def codes_to_indices(self, z: Tensor) -> Tensor:
        """Latents -> ``(B, levels, H, W)`` indices with every level kept (no dropout, no losses or stats)."""
        if z.ndim != 4 or z.shape[1] != self.dim:
            raise ValueError(f"rq expects latents of shape (B, {self.dim}, H, W), got {tuple(z.shape)}")
        with torch.no_grad():
            residual = z.to(torch.promote_types(z.dtype, torch.float32))
            indices = []
            for i in range(self.num_levels):
                q = self.level(i)
                idx = q.codes_to_indices(residual)
                indices.append(idx.long())
                if i + 1 < self.num_levels:
                    residual = residual - q.indices_to_codes(idx).to(residual.dtype)
            return torch.stack(indices, dim=1)

    def extra_repr(self) -> str:
        c = self.config
        return f"levels={c.levels}, shared_codebook={c.shared_codebook}, dropout={c.dropout}"
