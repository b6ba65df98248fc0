"""Product quantization (XQ-GAN Sec. 4.3, Eq. 4): split the channels into P groups, quantize each group with its own
branch quantizer (own codebook), concatenate the quantized groups along the channels.

``P(z) = Q_1(z_1) (+) ... (+) Q_P(z_P)`` with ``z = z_1 (+) ... (+) z_P`` (channel-wise concatenation). Every branch is
built from the same ``branch`` table, so each is a fresh module with its own codebook (and, for a multi-level
branch such as rq or msrq, its own per-level modules). ``dim = P * branch.dim``.

* Gradients: each branch's ``z_q`` carries that branch's straight-through gradient to its channel group; pq adds
  nothing of its own (identity when the branches' estimators are).
* Quantizer dropout: when the branches have several levels, pq draws ONCE (with branch 0's ``draw_levels``, i.e.
  branch 0's dropout settings) and passes the same ``levels`` to every branch, so all branches keep the same number
  of levels for a sample ("all branches will share the same dropout schedule", Sec. 7.1). An explicit ``levels``
  is passed through unchanged.
* Indices: the branch dimension is inserted right after the batch: (B, P, H, W) for single-level branches,
  (B, P, N, H, W) for residual ones, and for multi-scale branches a list with one (B, P, s, s) tensor per scale.
* Losses: same-named branch losses averaged over branches (``mean_losses``).
* Codebook groups (held-out codebook metrics): one per branch (``branch{p}``), nested ones under it.
* Stats: branch p's stats under ``branch{p}/`` (nested ones stay nested: ``branch1/level2/utilization``), plus
  ``perplexity``/``utilization`` (and any other top-level branch stat) averaged over branches.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from xqgan_core import ComponentSpec, component, config, option, positive
from xqgan_core.config import validate_component
from xqgan_core.interfaces import Indices, QuantOut, Quantizer
from xqgan_core.quant_ops import mean_losses, nested_stats


class ProductQuantizer(Quantizer):
    """``forward(z (B, P * branch.dim, H, W), levels=None) -> QuantOut`` with the branch index dim after the batch."""

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

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        spec = config.branch if isinstance(config.branch, ComponentSpec) else _validate(config.branch)
        self.branches = nn.ModuleList(spec.build() for _ in range(config.branches))
        first = self.branches[0]
        self.branch_dim = int(first.dim)
        self.dim = config.branches * self.branch_dim
        self.codebook_size = first.codebook_size
        self.num_levels = getattr(first, "num_levels", 1)

    def draw_levels(self, batch: int, device: torch.device) -> Tensor:
        """(B,) kept-level counts shared by every branch: branch 0's draw (all levels for single-level branches)."""
        if self.num_levels == 1:
            return torch.ones(batch, dtype=torch.long, device=device)
        return self.branches[0].draw_levels(batch, device)

    def forward(self, z: Tensor, levels: Tensor | int | None = None) -> QuantOut:
        if z.ndim != 4 or z.shape[1] != self.dim:
            raise ValueError(f"pq expects latents of shape (B, {self.dim}, H, W), got {tuple(z.shape)}")
        groups = z.split(self.branch_dim, dim=1)
        if self.num_levels > 1:
            if levels is None:
                levels = self.draw_levels(z.shape[0], z.device)
            elif isinstance(levels, int) and not isinstance(levels, bool):
                levels = torch.full((z.shape[0],), levels, dtype=torch.long, device=z.device)
            outs = [branch(group, levels=levels) for branch, group in zip(self.branches, groups)]
        else:
            if levels is not None:
                raise ValueError("levels is only accepted when the branches have more than one level")
            outs = [branch(group) for branch, group in zip(self.branches, groups)]
        z_q = outs[0].z_q if len(outs) == 1 else torch.cat([o.z_q for o in outs], dim=1)
        return QuantOut(
            z_q=z_q,
            indices=_stack_branches([o.indices for o in outs]),
            losses=mean_losses([o.losses for o in outs]),
            stats=nested_stats([o.stats for o in outs], "branch"),
        )

    def indices_to_codes(self, indices: Indices, levels: Tensor | int | None = None) -> Tensor:
        """Indices with the branch dim after the batch -> ``(B, P * branch.dim, H, W)``.

        ``levels`` (multi-level branches only) is passed to every branch's ``indices_to_codes``.
        """
        extra = {} if levels is None else {"levels": levels}
        codes = [b.indices_to_codes(i, **extra) for b, i in zip(self.branches, self._split_branches(indices))]
        return codes[0] if len(codes) == 1 else torch.cat(codes, dim=1)

    def codebook_groups(self, indices: Indices) -> dict[str, Tensor]:
        """Indices by the codebook they index: ``branch{p}``, or the branch's own groups under it
        (``branch0/level2`` for rq branches with separate codebooks)."""
        return {
            f"branch{p}/{name}" if name else f"branch{p}": idx
            for p, (branch, part) in enumerate(zip(self.branches, self._split_branches(indices)))
            for name, idx in branch.codebook_groups(part).items()
        }

    def codes_to_indices(self, z: Tensor) -> Indices:
        """Latents -> indices, each branch on its channel group through its own ``codes_to_indices``."""
        if z.ndim != 4 or z.shape[1] != self.dim:
            raise ValueError(f"pq expects latents of shape (B, {self.dim}, H, W), got {tuple(z.shape)}")
        with torch.no_grad():
            groups = z.split(self.branch_dim, dim=1)
            return _stack_branches([b.codes_to_indices(g) for b, g in zip(self.branches, groups)])

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


def _validate(table: Mapping[str, Any]) -> ComponentSpec:
    # a Config made in Python without validation may still hold the default table
    return validate_component("quantizer", table, "quantizer.branch")


def _stack_branches(per_branch: list[Indices]) -> Indices:
    """Insert the branch dim after the batch: tensors are stacked, lists are stacked scale by scale."""
    first = per_branch[0]
    if isinstance(first, Tensor):
        return torch.stack([i.long() for i in per_branch], dim=1)  # type: ignore[union-attr]
    return [torch.stack([b[s].long() for b in per_branch], dim=1) for s in range(len(first))]  # type: ignore[index]
