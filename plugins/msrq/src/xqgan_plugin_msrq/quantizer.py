"""Multi-scale residual quantization (XQ-GAN Sec. 4.6, VAR): one codebook, a residual quantized coarse to fine.

For a latent ``z`` of size ``H x H`` and scales ``s_1 <= ... <= s_K = H``::

    f_hat = 0
    for k in 1..K:
        r_k = area_downsample(z - f_hat_unmasked, s_k)       # identity at full size
        idx_k = inner.search(r_k)                              # the nested VQ / LFQ / BSQ quantizer
        h_k = phi_k(bicubic_upsample(code(idx_k), H))          # no upsampling at full size
        f_hat += mask_k * h_k                                  # mask_k: the sample keeps scale k (dropout)
    z_q = z + sg(f_hat - z)                                    # straight through

``phi_k(h) = (1 - gamma) h + gamma conv3x3(h)`` restores detail lost by upsampling; ``phi_count`` convs are shared
across the scales by VAR's rule (``phi_schedule``). Conventions (each one a decision, see README):

* **codes accumulated.** The nested quantizer picks the index (by cosine when it l2-normalises). With
  ``accumulate = "raw"`` (default, as VAR and the reference) the vector added is the stored codebook row, not its
  normalised copy: its length is learned, so fine scales can add small corrections; unit-length codes could not
  shrink with the residual. Quantizers without a stored table (LFQ, BSQ) always add their fixed codes.
* **residual chain.** The residual subtracts every scale's contribution whether or not the sample keeps it (as
  the reference): dropout changes only what reaches ``f_hat`` and the losses, never the chosen indices, so a
  dropped sample's kept prefix equals its eval-mode prefix.
* **losses** (VAR): at every scale, on the running sum, over the samples that keep the scale:
  ``codebook_k = mean((f_hat_k - sg z)^2)`` (trains the codebook and the phi convs),
  ``commitment_k = beta mean((sg f_hat_k - z)^2)`` (trains the encoder). Both are averaged over scales by
  default; ``commit_convention = "sum"`` sums the commitment over scales as the reference's multi-scale VQ does.
  Auxiliary losses of the nested quantizer (e.g. an LFQ/BSQ ``entropy``) are computed on each scale's residual
  (with gradient to ``z``), for every sample, and averaged over scales; its own codebook/commitment terms are
  replaced by the ones above. ``aux_resolution = "scale"`` (default) takes them on the residual the scale
  searches (area-downsampled to ``s x s``; BSQ re-normalises it), ``"full"`` on the full-resolution residual, as
  the reference's multi-scale LFQ/BSQ does (one more call of the nested quantizer per coarse scale, so it must be
  stateless: lfq / bsq).
* **indices**: one ``(B, s, s)`` int64 map per scale; scales a sample dropped carry index 0 and contribute
  nothing (``indices_to_codes(indices, keep)`` masks them again). ``forward(z, keep=None)`` and the one dropout
  draw per forward come from the core's ``MultiLevelQuantizer``.
* **token layout**: scale after scale, each map row-major (VAR's order): ``L = sum(s^2)`` (286 for the paper's
  scales), ``K = 1``, every column the one shared codebook.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xqgan_core import ComponentSpec, at_least, between, component, config, each, non_empty, option, positive, section
from xqgan_core.interfaces import CodeViews, Indices, QuantOut, Quantizer
from xqgan_core.multilevel import Keep, MultiLevelQuantizer
from xqgan_core.quant_ops import (
    LevelDropout,
    autocast_disabled,
    codebook_usage,
    flatten_scales,
    mean_losses,
    straight_through,
    token_count,
)
from xqgan_core.token_layout import TokenLayout

__all__ = ["MultiScaleResidualQuantizer", "phi_schedule"]

#: losses of the nested quantizer that msrq replaces by its own losses on the running sum
_REPLACED_LOSSES = ("codebook", "commitment")


def phi_schedule(num_scales: int, num_convs: int) -> tuple[int, ...]:
    """Which phi conv each scale uses: VAR's partially shared rule.

    Scale ``k`` sits at ``k / (num_scales - 1)`` in [0, 1]; conv ``j`` at tick ``j`` of ``num_convs`` ticks spread
    evenly over ``[1/(3n), 1 - 1/(3n)]`` when there are 4 convs, else ``[1/(2n), 1 - 1/(2n)]`` (VAR's choice); each
    scale takes the nearest tick, the lower one on a tie. ``num_convs = 0`` means one conv per scale. 10 scales and
    4 convs give ``(0, 0, 1, 1, 1, 2, 2, 3, 3, 3)``. Floats follow numpy's linspace, so ties resolve as in VAR.
    """
    if num_scales < 1 or num_convs < 0:
        raise ValueError(f"need num_scales >= 1 and num_convs >= 0, got {num_scales} and {num_convs}")
    n = num_convs or num_scales
    if n == 1:
        return (0,) * num_scales
    pad = 1 / 3 / n if n == 4 else 1 / 2 / n
    start, stop = pad, 1 - pad
    step = (stop - start) / (n - 1)
    ticks = [i * step + start for i in range(n)]
    ticks[-1] = stop
    positions = [k / (num_scales - 1) for k in range(num_scales)] if num_scales > 1 else [0.0]
    return tuple(min(range(n), key=lambda j: abs(ticks[j] - p)) for p in positions)


class Phi(nn.Conv2d):
    """``phi(h) = (1 - gamma) h + gamma conv3x3(h)``, channels preserved."""

    def __init__(self, dim: int, gamma: float) -> None:
        super().__init__(dim, dim, kernel_size=3, padding=1)
        self.gamma = gamma

    def forward(self, h: Tensor) -> Tensor:
        return h * (1 - self.gamma) + super().forward(h) * self.gamma


class MultiScaleResidualQuantizer(MultiLevelQuantizer):
    """``forward(z (B, dim, H, H), keep=None) -> QuantOut(z_q, [(B, s, s) per scale], losses, stats)``."""

    plugin_api = 1

    @config
    class Config:
        scales: tuple[int, ...] = option(
            (1, 1, 2, 3, 3, 4, 5, 6, 8, 11),
            help="side of each scale's token map, coarse to fine; the last must equal the latent's H = W "
            "(paper: 1,1,2,3,3,4,5,6,8,11 at 11x11; VAR: 1,2,3,4,5,6,8,10,13,16)",
            validator=[non_empty(), each(positive())],
        )
        code: ComponentSpec = component(
            "quantizer",
            default={"use": "vq"},
            help="the quantizer used at every scale (vq, lfq or bsq): ONE module, so one codebook shared by all scales",
        )
        beta: float = option(
            0.25, help="commitment weight: beta * mean((sg f_hat - z)^2) per scale", validator=at_least(0.0)
        )
        phi_count: int = option(
            4,
            help="phi convs shared across the scales by VAR's rule (4 = VAR/paper; 1 = one for all; "
            "0 = one per scale); every conv must serve at least one scale",
            validator=at_least(0),
        )
        phi_gamma: float = option(
            0.5,
            help="phi(h) = (1 - gamma) h + gamma conv3x3(h); 0 = no convs (identity)",
            validator=between(0.0, 1.0),
        )
        accumulate: Literal["raw", "quantized"] = option(
            "raw",
            help="what is added per scale: 'raw' = the stored codebook row of the chosen index, its learned length "
            "kept even when the search is by cosine (VAR, reference); 'quantized' = the nested quantizer's own codes "
            "(unit length with l2_norm). Quantizers without a stored table (lfq, bsq) add their codes either way",
        )
        commit_convention: Literal["mean", "sum"] = option(
            "mean",
            help="commitment over scales: 'mean' like the codebook loss (consistent), or 'sum' as the reference's "
            "multi-scale VQ (its commitment is then num_scales times larger)",
        )
        inner_losses: Literal["aux", "none"] = option(
            "aux",
            help="losses of the nested quantizer to add, averaged over scales: 'aux' = all but its codebook/"
            "commitment (e.g. the lfq/bsq entropy term), 'none' = none",
        )
        aux_resolution: Literal["scale", "full"] = option(
            "scale",
            help="where the nested quantizer's auxiliary losses (lfq/bsq entropy) are taken at each scale: 'scale' = "
            "on the s x s residual that scale searches; 'full' = on the full-resolution residual, as the reference "
            "(needs a nested quantizer without parameters or buffers: lfq, bsq)",
        )
        normalize_input: bool = option(
            False,
            help="l2-normalise z over channels before quantizing (the reference's multi-scale BSQ does; "
            "the gradient then passes the normalisation)",
        )
        dropout: LevelDropout = section(
            LevelDropout,
            help="quantizer dropout over scales: a fraction of training samples keeps only the first n scales "
            "(paper: rate 0.1, min_levels 3)",
        )

        def check(self) -> list[str]:
            problems = []
            if self.scales and max(self.scales) > self.scales[-1]:
                problems.append(
                    f"scales: the last scale must be the largest (the latent's size), got {list(self.scales)}"
                )
            if self.scales and self.phi_gamma > 0:
                used = set(phi_schedule(len(self.scales), self.phi_count))
                n = self.phi_count or len(self.scales)
                if len(used) < n:
                    problems.append(
                        f"phi_count: {n} phi convs for {len(self.scales)} scales leaves conv(s) "
                        f"{sorted(set(range(n)) - used)} unused (no gradient, breaks DDP); use a smaller phi_count, "
                        "or 0 for one per scale"
                    )
            return problems

    @classmethod
    def config_dim(cls, config: Config) -> int | None:
        """The nested quantizer's dim."""
        return config.code.cls.config_dim(config.code.config)

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.code: Quantizer = config.code.build()
        if getattr(self.code, "num_levels", 1) != 1:
            raise ValueError(f"msrq: the nested quantizer must be single-level (vq, lfq, bsq), got {config.code.use!r}")
        if config.aux_resolution == "full" and any(True for _ in (*self.code.parameters(), *self.code.buffers())):
            # its forward would run twice per scale: a learned or statistics-keeping quantizer would update twice
            raise ValueError(
                f"msrq: aux_resolution = 'full' needs a stateless nested quantizer (lfq, bsq), got "
                f"{config.code.use!r}; use aux_resolution = 'scale'")
        self.dim = self.code.dim
        self.codebook_size = self.code.codebook_size
        self.scales: tuple[int, ...] = tuple(config.scales)
        self.num_levels = len(self.scales)
        self.phi_index = phi_schedule(self.num_levels, config.phi_count) if config.phi_gamma > 0 else ()
        n_phi = (config.phi_count or self.num_levels) if config.phi_gamma > 0 else 0
        self.phi = nn.ModuleList(Phi(self.dim, config.phi_gamma) for _ in range(n_phi))

    # -- the per-scale path shared by forward and indices_to_codes ------------------------------------------------
    def _table(self) -> Tensor | None:
        """The nested quantizer's stored codebook rows ``(V, dim)`` when ``accumulate = "raw"`` applies, else None.

        Read through ``Quantizer.codebook_rows()``; a quantizer without a stored table (lfq, bsq) has fixed codes
        and is read through ``indices_to_codes``.
        """
        weight = self.code.codebook_rows() if self.config.accumulate == "raw" else None
        if weight is None:
            return None
        return weight.to(torch.promote_types(weight.dtype, torch.float32))

    def _contribution(self, idx: Tensor, k: int, size: int, table: Tensor | None) -> Tensor:
        """``phi_k(upsample(code(idx)))``: scale ``k``'s ``(B, dim, size, size)`` share of ``f_hat`` (fp32)."""
        if table is not None:
            codes = F.embedding(idx, table).permute(0, 3, 1, 2)
        else:
            codes = self.code.indices_to_codes(idx).float()
        if idx.shape[-1] != size:
            codes = F.interpolate(codes, size=(size, size), mode="bicubic")
        if self.phi_index:
            codes = self.phi[self.phi_index[k]](codes)
        return codes

    def _check_latent(self, z: Tensor) -> int:
        if z.ndim != 4 or z.shape[1] != self.dim:
            raise ValueError(f"msrq expects latents of shape (B, {self.dim}, H, W), got {tuple(z.shape)}")
        h, w = z.shape[-2:]
        if h != w:
            raise ValueError(
                f"msrq needs square latents whose side equals the last scale ({self.scales[-1]}), got {h}x{w}"
            )
        if h != self.scales[-1]:
            raise ValueError(
                f"msrq: the last scale ({self.scales[-1]}) must equal the latent's spatial size, got {h}x{w}; "
                f"set `scales` to end at {h} (the encoder's output size)"
            )
        return h

    # -- interface ------------------------------------------------------------------------------------------------
    def quantize(self, z: Tensor, keep: Tensor) -> QuantOut:
        size = self._check_latent(z)
        b = z.shape[0]
        # fp32 with autocast off throughout, as VAR: the searches, the upsampling and the losses; z_q is cast back
        with autocast_disabled(z.device):
            f = z.to(torch.promote_types(z.dtype, torch.float32))
            if self.config.normalize_input:
                f = F.normalize(f, dim=1)
            f_sg = f.detach()
            table = self._table()
            f_hat = torch.zeros_like(f_sg)
            taken = torch.zeros_like(f_sg)  # every scale's contribution, dropped or not, without gradient
            parts: list[dict[str, Tensor]] = []
            indices: list[Tensor] = []
            stats: dict[str, Any] = {}
            searched: list[Tensor] = []
            for k, s in enumerate(self.scales):
                # the residual carries the gradient to z only, so the nested quantizer's auxiliary losses reach
                # the encoder; its value is VAR's f_rest
                rest = f - taken
                r = rest if s == size else F.interpolate(rest, size=(s, s), mode="area")
                q = self.code(r)
                idx = q.indices
                if not isinstance(idx, Tensor) or idx.shape != (b, s, s):
                    raise ValueError(f"msrq: the nested quantizer returned indices of the wrong layout at scale {k}")
                idx = idx.long()
                h = self._contribution(idx, k, size, table)
                mask = self.level_mask(keep, k, h)
                f_hat = f_hat + h * mask
                taken = taken + h.detach()
                aux = q.losses
                if self.config.aux_resolution == "full" and s != size and self.config.inner_losses != "none":
                    aux = self.code(rest).losses  # only its auxiliary losses are kept; the search stays at s x s
                parts.append({**self._scale_losses(f, f_sg, f_hat, mask), **self._aux_losses(aux)})
                searched.append(idx)
                indices.append(self.drop_indices(idx, keep, k))
                # the nested quantizer's own statistics of this scale's search, completed if it has no usage
                scale_stats = dict(q.stats)
                if not {"perplexity", "utilization"} <= scale_stats.keys():
                    scale_stats = {**codebook_usage(idx, self.codebook_size), **scale_stats}
                stats.update({f"scale{k}/{name}": value for name, value in scale_stats.items()})
            losses = mean_losses(parts)
            if self.config.commit_convention == "sum":
                losses["commitment"] = losses["commitment"] * self.num_levels
            z_q = straight_through(f, f_hat).to(z.dtype)
        # utilization counts the codes the search chose, also those of dropped scales (they are real choices)
        stats.update(codebook_usage(flatten_scales(searched), self.codebook_size))
        return QuantOut(z_q=z_q, indices=indices, losses=losses, stats=stats)

    def _scale_losses(self, f: Tensor, f_sg: Tensor, f_hat: Tensor, mask: Tensor) -> dict[str, Tensor]:
        """VAR's losses on the running sum, averaged over the samples that keep this scale (0 if none does)."""
        per_sample = mask.flatten()
        denom = per_sample.sum().clamp(min=1) * f[0].numel()
        return {
            "codebook": ((f_hat - f_sg).pow(2) * mask).sum() / denom,
            "commitment": self.config.beta * ((f_hat.detach() - f).pow(2) * mask).sum() / denom,
        }

    def _aux_losses(self, inner: dict[str, Tensor]) -> dict[str, Tensor]:
        if self.config.inner_losses == "none":
            return {}
        return {name: value.float() for name, value in inner.items() if name not in _REPLACED_LOSSES}

    def indices_to_codes(self, indices: Indices, keep: Keep = None) -> Tensor:
        """Per-scale index maps -> ``f_hat`` ``(B, dim, H, H)`` in fp32, by the same path as ``forward``.

        ``keep`` (an int or a (B,) tensor) masks out the scales each sample dropped (as in the forward that produced
        the indices); without it every scale counts, which reproduces an eval-mode forward exactly.
        """
        if not isinstance(indices, (list, tuple)) or len(indices) != self.num_levels:
            raise ValueError(f"msrq expects a list of {self.num_levels} index maps, one per scale {self.scales}")
        b = indices[0].shape[0]
        for k, (idx, s) in enumerate(zip(indices, self.scales)):
            if idx.shape != (b, s, s):
                raise ValueError(f"index map {k} must be (B, {s}, {s}) = ({b}, {s}, {s}), got {tuple(idx.shape)}")
        size = self.scales[-1]
        kept = None if keep is None else self.normalize_keep(keep, b, indices[0].device)
        with autocast_disabled(indices[0].device):
            table = self._table()
            f_hat: Tensor | None = None
            for k, idx in enumerate(indices):
                h = self._contribution(idx.long(), k, size, table)
                if kept is not None:
                    h = h * self.level_mask(kept, k, h)
                f_hat = h if f_hat is None else f_hat + h
        assert f_hat is not None
        return f_hat

    def codes_to_indices(self, z: Tensor) -> Indices:
        """Latents -> per-scale index maps, every scale kept (no dropout draw even in training mode)."""
        with torch.no_grad():
            return self.forward(z, keep=self.num_levels).indices

    # -- views for aligners ----------------------------------------------------------------------------------------
    @classmethod
    def config_code_views(cls, config: Config) -> CodeViews | None:
        return CodeViews(branches=1, scales=tuple(config.scales), dim=cls.config_dim(config))

    def code_views(self) -> CodeViews:
        return CodeViews(branches=1, scales=self.scales, dim=int(self.dim))

    def code_view(self, quant: QuantOut, latents: Tensor, branch: int = 0, scale: int | None = None) -> Tensor:
        """Scale ``k``'s view: the codes accumulated over scales ``0..k`` (what the decoder would get from a sample
        keeping ``k + 1`` scales), area-resampled to scale ``k``'s ``s x s`` token grid, with the straight-through
        gradient to ``latents``. ``None`` (or the last scale): ``quant.z_q`` itself."""
        views = self.code_views()
        views.branch_index(branch)
        k = None if scale is None else views.scale_index(scale)
        if k is None or k == self.num_levels - 1:
            return quant.z_q
        if not isinstance(quant.indices, (list, tuple)):
            raise ValueError("msrq.code_view needs the per-scale index maps of msrq's own forward")
        b = latents.shape[0]
        kept = torch.full((b,), k + 1, dtype=torch.long, device=latents.device)
        if quant.keep is not None:
            kept = torch.minimum(kept, quant.keep)
        s = self.scales[k]
        with torch.no_grad():  # no gradient to the codebook or phi (straight-through, as for z_q)
            f_hat = F.interpolate(self.indices_to_codes(list(quant.indices), keep=kept), size=(s, s), mode="area")
        with autocast_disabled(latents.device):
            f = latents.to(torch.promote_types(latents.dtype, torch.float32))
            if self.config.normalize_input:
                f = F.normalize(f, dim=1)
            f = F.interpolate(f, size=(s, s), mode="area")
            return straight_through(f, f_hat).to(quant.z_q.dtype)

    # -- token sequences for a next-scale generator ---------------------------------------------------------------
    @property
    def token_count(self) -> int:
        """Tokens per image over all scales: ``sum(s^2)``."""
        return token_count(self.scales)

    def token_layout(self, h: int, w: int) -> TokenLayout:
        """Scale after scale, each map row-major (VAR's order): ``L = sum(s^2)``, ``K = 1``, one codebook."""
        if (h, w) != (self.scales[-1], self.scales[-1]):
            raise ValueError(f"msrq: the latent grid must be {self.scales[-1]}x{self.scales[-1]} (the last scale), "
                             f"got {h}x{w}")
        return self.code.token_layout(h, w).over_scales(self.scales)

    # -- next-scale inputs (xqgan_core.interfaces.NextScaleInputs) -------------------------------------------------
    def next_scale_dim(self) -> int:
        """Channels of the next-scale inputs: the codes' ``dim``."""
        return int(self.dim)

    def next_scale_inputs(self, indices: Indices) -> list[Tensor]:
        """Per-scale index maps -> the input of every scale after the first, ``(B, dim, s_k, s_k)`` fp32: the
        codes of the earlier scales accumulated by ``forward``'s path, area-resampled to ``s_k``."""
        if not isinstance(indices, (list, tuple)) or len(indices) != self.num_levels:
            raise ValueError(f"msrq expects a list of {self.num_levels} index maps, one per scale {self.scales}")
        f_hat: Tensor | None = None
        inputs: list[Tensor] = []
        for k in range(self.num_levels - 1):  # the last scale's codes feed no input
            f_hat, nxt = self.accumulate_scale(f_hat, k, indices[k])
            assert nxt is not None
            inputs.append(nxt)
        return inputs

    def accumulate_scale(self, f_hat: Tensor | None, k: int, indices_k: Tensor) -> tuple[Tensor, Tensor | None]:
        """``f_hat + phi_k(upsample(code(indices_k)))`` (fp32, ``(B, dim, H, H)``) and scale ``k + 1``'s input,
        ``f_hat`` area-resampled to its side (None after the last scale)."""
        if not 0 <= k < self.num_levels:
            raise ValueError(f"msrq: scale {k} does not exist (scales {list(self.scales)})")
        s = self.scales[k]
        if not isinstance(indices_k, Tensor) or indices_k.ndim != 3 or tuple(indices_k.shape[1:]) != (s, s):
            got = tuple(indices_k.shape) if isinstance(indices_k, Tensor) else type(indices_k).__name__
            raise ValueError(f"msrq: scale {k}'s index map must be (B, {s}, {s}), got {got}")
        size = self.scales[-1]
        with autocast_disabled(indices_k.device):
            h = self._contribution(indices_k.long(), k, size, self._table())
            f_hat = h if f_hat is None else f_hat + h
            if k == self.num_levels - 1:
                return f_hat, None
            nxt = self.scales[k + 1]
            return f_hat, f_hat if nxt == size else F.interpolate(f_hat, size=(nxt, nxt), mode="area")

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"scales={self.scales}, phi={self.phi_index} (gamma={c.phi_gamma}), accumulate={c.accumulate}, "
            f"beta={c.beta}, commit={c.commit_convention}, aux={c.aux_resolution}"
        )
