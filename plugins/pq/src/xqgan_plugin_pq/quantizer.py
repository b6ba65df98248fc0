"""Product quantization (XQ-GAN Sec. 4.3, Eq. 4): split the channels into P groups, quantize each group with its own
branch quantizer (own codebook), concatenate the quantized groups along the channels.

``P(z) = Q_1(z_1) (+) ... (+) Q_P(z_P)`` with ``z = z_1 (+) ... (+) z_P`` (channel-wise concatenation). Every branch is
built from the same ``branch`` table, so each is a fresh module with its own codebook (and, for a multi-level
branch such as rq or msrq, its own per-level modules). ``dim = P * branch.dim``.

* Gradients: each branch's ``z_q`` carries that branch's straight-through gradient to its channel group; pq adds
  nothing of its own (identity when the branches' estimators are).
* Quantizer dropout: when the branches have several levels, pq (a ``MultiLevelQuantizer``) draws ONCE with branch
  0's dropout settings and passes the same ``keep`` tensor to every branch, so all branches keep the same number of
  levels for a sample ("all branches will share the same dropout schedule", Sec. 7.1). An explicit ``keep`` is
  passed on to every branch.
* Indices: the branch dimension is inserted right after the batch: (B, P, H, W) for single-level branches,
  (B, P, N, H, W) for residual ones, and for multi-scale branches a list with one (B, P, s, s) tensor per scale.
* Token layout: the branch's layout with ``K`` multiplied by P, branch-major within a step (pq over rq:
  ``K = P * N``; pq over msrq: ``L = sum(s^2)``, ``K = P``). Columns are named ``branch{p}`` (the held-out codebook
  metrics' names), nested names under it (``branch0/level2``).
* Losses: same-named branch losses averaged over branches (``mean_losses``).
* Stats: branch p's stats under ``branch{p}/`` (nested ones stay nested: ``branch1/level2/utilization``), plus
  ``perplexity``/``utilization`` (and any other top-level branch stat) averaged over branches.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from xqgan_core import ComponentSpec, component, config, option, positive
from xqgan_core.interfaces import CodeViews, Indices, NextScaleInputs, QuantOut
from xqgan_core.multilevel import Keep, MultiLevelQuantizer
from xqgan_core.quant_ops import LevelDropout, mean_losses, nested_stats
from xqgan_core.token_layout import BRANCH, TokenLayout


class ProductQuantizer(MultiLevelQuantizer):
    """``forward(z (B, P * branch.dim, H, W), keep=None) -> QuantOut`` with the branch index dim after the batch."""

    plugin_api = 1

    @config
    class Config:
        branches: int = option(2, help="number of product branches P (channel groups, one codebook each)",
                               validator=positive())
        branch: ComponentSpec = component(
            "quantizer",
            default={"use": "vq"},
            help="the quantizer of each branch (vq, rq, msrq, lfq, bsq, ...); built once per branch, so every "
            "branch has its own codebook. pq's dim is branches * branch.dim",
        )

    @classmethod
    def config_dim(cls, config: Config) -> int | None:
        """``branches * branch dim`` (None when the branch's dim is unknown)."""
        branch_dim = config.branch.cls.config_dim(config.branch.config)
        return None if branch_dim is None else config.branches * branch_dim

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.branches = nn.ModuleList(config.branch.build() for _ in range(config.branches))
        first = self.branches[0]
        self.branch_dim = int(first.dim)
        self.dim = config.branches * self.branch_dim
        self.codebook_size = first.codebook_size
        self.num_levels = getattr(first, "num_levels", 1)

    def level_dropout(self) -> LevelDropout:
        """Branch 0's dropout settings (single-level branches: none)."""
        return self.branches[0].level_dropout() if self.num_levels > 1 else LevelDropout()

    def forward(self, z: Tensor, keep: Keep = None) -> QuantOut:
        if keep is not None and self.num_levels == 1:
            raise ValueError("keep is only accepted when the branches have more than one level")
        return super().forward(z, keep)

    def quantize(self, z: Tensor, keep: Tensor) -> QuantOut:
        if z.ndim != 4 or z.shape[1] != self.dim:
            raise ValueError(f"pq expects latents of shape (B, {self.dim}, H, W), got {tuple(z.shape)}")
        groups = z.split(self.branch_dim, dim=1)
        # one draw for all branches: the same keep tensor goes to every multi-level branch
        extra = {"keep": keep} if self.num_levels > 1 else {}
        outs = [branch(group, **extra) for branch, group in zip(self.branches, groups)]
        z_q = outs[0].z_q if len(outs) == 1 else torch.cat([o.z_q for o in outs], dim=1)
        return QuantOut(
            z_q=z_q,
            indices=_stack_branches([o.indices for o in outs]),
            losses=mean_losses([o.losses for o in outs]),
            stats=nested_stats([o.stats for o in outs], "branch"),
        )

    def indices_to_codes(self, indices: Indices, keep: Keep = None) -> Tensor:
        """Indices with the branch dim after the batch -> ``(B, P * branch.dim, H, W)``.

        ``keep`` (multi-level branches only) is passed to every branch's ``indices_to_codes``.
        """
        if keep is not None and self.num_levels == 1:
            raise ValueError("keep is only accepted when the branches have more than one level")
        extra = {} if keep is None else {"keep": keep}
        codes = [b.indices_to_codes(i, **extra) for b, i in zip(self.branches, self._split_branches(indices))]
        return codes[0] if len(codes) == 1 else torch.cat(codes, dim=1)

    def token_layout(self, h: int, w: int) -> TokenLayout:
        """The branch's layout with K multiplied by P, branch-major; columns named ``branch{p}[/...]``."""
        parts = [branch.token_layout(h, w) for branch in self.branches]
        return TokenLayout.stack(BRANCH, parts, [f"branch{p}" for p in range(len(parts))])

    def codes_to_indices(self, z: Tensor) -> Indices:
        """Latents -> indices, each branch on its channel group through its own ``codes_to_indices``."""
        if z.ndim != 4 or z.shape[1] != self.dim:
            raise ValueError(f"pq expects latents of shape (B, {self.dim}, H, W), got {tuple(z.shape)}")
        with torch.no_grad():
            groups = z.split(self.branch_dim, dim=1)
            return _stack_branches([b.codes_to_indices(g) for b, g in zip(self.branches, groups)])

    # -- views for aligners ------------------------------------------------------------------------------------------
    @classmethod
    def config_code_views(cls, config: Config) -> CodeViews | None:
        """P branches, each with its branch quantizer's scales."""
        inner = config.branch.cls.config_code_views(config.branch.config)
        branch_dim = config.branch.cls.config_dim(config.branch.config)
        return CodeViews(branches=config.branches, scales=inner.scales if inner else (), dim=branch_dim)

    def code_views(self) -> CodeViews:
        return CodeViews(branches=self.config.branches, scales=self.branches[0].code_views().scales,
                         dim=self.branch_dim)

    def code_view(self, quant: QuantOut, latents: Tensor, branch: int = 0, scale: int | None = None) -> Tensor:
        """Branch ``branch``'s channel group, at ``scale`` as its branch quantizer defines it."""
        p = self.code_views().branch_index(branch)
        group = slice(p * self.branch_dim, (p + 1) * self.branch_dim)
        own = QuantOut(z_q=quant.z_q[:, group], indices=self._split_branches(quant.indices)[p], keep=quant.keep)
        return self.branches[p].code_view(own, latents[:, group], 0, scale)

    # -- next-scale inputs (xqgan_core.interfaces.NextScaleInputs) -----------------------------------------------
    def _next_scale_branches(self) -> list[NextScaleInputs]:
        branches = list(self.branches)
        if not all(isinstance(b, NextScaleInputs) for b in branches):
            raise ValueError(
                f"pq: its branch quantizer {self.config.branch.use!r} offers no next-scale inputs; a next-scale "
                "(VAR) generator needs multi-scale branches (branch use = 'msrq')")
        return branches  # type: ignore[return-value]

    def next_scale_dim(self) -> int:
        """Channels of the next-scale inputs: the branches' channels, concatenated."""
        return sum(b.next_scale_dim() for b in self._next_scale_branches())

    def next_scale_inputs(self, indices: Indices) -> list[Tensor]:
        """Each branch's next-scale inputs (from its indices), concatenated along the channels per scale."""
        branches = self._next_scale_branches()
        per_branch = [b.next_scale_inputs(i) for b, i in zip(branches, self._split_branches(indices))]
        return [torch.cat(maps, dim=1) for maps in zip(*per_branch)]

    def accumulate_scale(self, f_hat: Tensor | None, k: int, indices_k: Tensor) -> tuple[Tensor, Tensor | None]:
        """Scale ``k``'s ``(B, P, s, s)`` indices added branch by branch to its channel group of ``f_hat``."""
        branches = self._next_scale_branches()
        p = len(branches)
        if not isinstance(indices_k, Tensor) or indices_k.ndim != 4 or indices_k.shape[1] != p:
            got = tuple(indices_k.shape) if isinstance(indices_k, Tensor) else type(indices_k).__name__
            raise ValueError(f"pq: scale {k}'s indices must be (B, {p}, s, s), got {got}")
        groups = [None] * p if f_hat is None else list(f_hat.split([b.next_scale_dim() for b in branches], dim=1))
        outs = [b.accumulate_scale(g, k, indices_k[:, i]) for i, (b, g) in enumerate(zip(branches, groups))]
        nxt = None if outs[0][1] is None else torch.cat([o[1] for o in outs], dim=1)  # type: ignore[misc]
        return torch.cat([o[0] for o in outs], dim=1), nxt

    def _split_branches(self, indices: Indices) -> list[Indices]:
        p = self.config.branches
        if isinstance(indices, Tensor):
            if indices.ndim < 2 or indices.shape[1] != p:
                raise ValueError(
                    f"pq expects indices with the branch dim ({p}) after the batch, got {tuple(indices.shape)}")
            return list(indices.unbind(dim=1))
        if isinstance(indices, (list, tuple)) and all(isinstance(i, Tensor) and i.ndim >= 2 and i.shape[1] == p
                                                      for i in indices):
            return [[scale[:, b] for scale in indices] for b in range(p)]
        raise ValueError(f"pq expects a (B, {p}, ...) tensor or a list of them (one per scale)")

    def extra_repr(self) -> str:
        return f"branches={self.config.branches}, branch_dim={self.branch_dim}"


def _stack_branches(per_branch: list[Indices]) -> Indices:
    """Insert the branch dim after the batch: tensors are stacked, lists are stacked scale by scale."""
    first = per_branch[0]
    if isinstance(first, Tensor):
        return torch.stack([i.long() for i in per_branch], dim=1)  # type: ignore[union-attr]
    return [torch.stack([b[s].long() for b in per_branch], dim=1) for s in range(len(first))]  # type: ignore[index]
