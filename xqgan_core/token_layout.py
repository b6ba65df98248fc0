"""How a quantizer's indices become one token sequence, and back: ``TokenLayout``.

A quantizer returns its indices in its own shape (``QuantOut.indices``): ``(B, h, w)`` for one level, ``(B, N, h, w)``
for N residual levels, a list of ``(B, s, s)`` maps for multi-scale quantizers, with a branch dim after the batch
for product quantizers. Those shapes are ambiguous from outside (a ``(B, 2, h, w)`` tensor is 2 product branches or
2 residual levels), so code outside the quantizers (metrics, ``Tokenizer.encode(as_sequence=True)``, generators)
asks the quantizer for its layout (``Quantizer.token_layout(h, w)``) and works on sequences:

* ``to_sequence(indices) -> (B, L, K)`` int64: L steps, K tokens per step;
* ``from_sequence(seq) -> indices`` in the quantizer's own shape (the exact inverse).

Conventions (one rule, whatever the nesting):

* the spatial positions of a map are read row-major; multi-scale maps are read scale after scale, coarse to fine
  (VAR's order), so ``L = h * w`` for one map and ``L = sum(s^2)`` over the scales;
* the index dims between the batch and the spatial dims (``axes``: product branches, residual levels, outermost
  first) form the K tokens of one step, in row-major order: pq over rq gives ``K = P * N``, branch-major;
* each column k names the codebook it indexes (``codebooks[k]``, the per-codebook metric names such as ``branch1``
  or ``level0``; ``""`` when there is one codebook) and its vocabulary (``vocab_sizes[k]``). Columns that share one
  codebook (rq with ``shared_codebook``, every scale of msrq) carry the same name.

Importing this module imports torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .quant_ops import flatten_scales, unflatten_scales

__all__ = ["TokenLayout", "BRANCH", "LEVEL"]

#: axis names of the index dims after the batch
BRANCH = "branch"
LEVEL = "level"

NativeIndices = Tensor | list[Tensor]


def _join(prefix: str, name: str) -> str:
    return f"{prefix}/{name}" if name else prefix


@dataclass(frozen=True)
class TokenLayout:
    """The token layout of a quantizer's indices for an ``(h, w)`` latent grid (see the module docstring).

    grid: the latent's ``(h, w)``.
    vocab_sizes: per column (token of a step), the size of the codebook it indexes.
    codebooks: per column, the name of that codebook (same name = same codebook).
    axes: the index dims between the batch and the spatial dims, outermost first: ``(("branch", P), ("level", N))``.
    scales: sides of the per-scale maps, coarse to fine, for multi-scale quantizers; ``()`` for one ``(h, w)`` map.
    """

    grid: tuple[int, int]
    vocab_sizes: tuple[int, ...]
    codebooks: tuple[str, ...]
    axes: tuple[tuple[str, int], ...] = ()
    scales: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        h, w = self.grid
        if h < 1 or w < 1:
            raise ValueError(f"TokenLayout: the grid must be at least 1x1, got {h}x{w}")
        k = math.prod(size for _, size in self.axes)
        if len(self.vocab_sizes) != k or len(self.codebooks) != k:
            raise ValueError(
                f"TokenLayout: axes {self.axes} give {k} tokens per step, but there are {len(self.vocab_sizes)} "
                f"vocabulary sizes and {len(self.codebooks)} codebook names"
            )
        if any(v < 1 for v in self.vocab_sizes):
            raise ValueError(f"TokenLayout: vocabulary sizes must be positive, got {self.vocab_sizes}")
        sizes: dict[str, int] = {}
        for name, vocab in zip(self.codebooks, self.vocab_sizes):
            if sizes.setdefault(name, vocab) != vocab:
                raise ValueError(f"TokenLayout: codebook {name!r} has two vocabulary sizes, {sizes[name]} and {vocab}")
        if self.scales and (h != w or self.scales[-1] != h or min(self.scales) < 1):
            raise ValueError(
                f"TokenLayout: multi-scale maps need a square grid whose side is the last scale, got grid {h}x{w} "
                f"and scales {self.scales}"
            )

    # -- constructors ------------------------------------------------------------------------------------------------
    @classmethod
    def single(cls, grid: tuple[int, int], vocab_size: int, codebook: str = "") -> TokenLayout:
        """One index per position: ``L = h * w``, ``K = 1``."""
        return cls(grid=(int(grid[0]), int(grid[1])), vocab_sizes=(int(vocab_size),), codebooks=(codebook,))

    @classmethod
    def stack(cls, axis: str, parts: Sequence[TokenLayout], prefixes: Sequence[str]) -> TokenLayout:
        """The layout of indices that stack ``parts`` (one per branch or level) in a new dim after the batch.

        ``prefixes[i]`` is put before part i's codebook names (``"branch1"`` gives ``branch1`` or
        ``branch1/level0``); an empty prefix keeps the names, for parts that share one codebook.
        """
        if not parts or len(parts) != len(prefixes):
            raise ValueError(f"TokenLayout.stack: need one prefix per part, got {len(parts)} parts, {len(prefixes)}")
        first = parts[0]
        for p in parts[1:]:
            if (p.grid, p.axes, p.scales) != (first.grid, first.axes, first.scales):
                raise ValueError("TokenLayout.stack: the parts differ in grid, axes or scales")
        return cls(
            grid=first.grid,
            vocab_sizes=tuple(v for p in parts for v in p.vocab_sizes),
            codebooks=tuple(_join(prefix, name) for p, prefix in zip(parts, prefixes) for name in p.codebooks),
            axes=((axis, len(parts)), *first.axes),
            scales=first.scales,
        )

    def over_scales(self, scales: Sequence[int]) -> TokenLayout:
        """This layout with one map per scale (a multi-scale quantizer built on a single-map quantizer)."""
        if self.scales:
            raise ValueError("TokenLayout.over_scales: the layout is multi-scale already")
        return replace(self, scales=tuple(int(s) for s in scales))

    # -- shape ---------------------------------------------------------------------------------------------------
    @property
    def length(self) -> int:
        """L: steps of the sequence (positions of one map, or of every scale's map)."""
        if self.scales:
            return sum(s * s for s in self.scales)
        return self.grid[0] * self.grid[1]

    @property
    def tokens_per_step(self) -> int:
        """K: tokens per step (one per branch and level)."""
        return len(self.vocab_sizes)

    @property
    def branches(self) -> int:
        """P: product branches (1 without a product quantizer)."""
        return math.prod(size for name, size in self.axes if name == BRANCH)

    @property
    def levels(self) -> int:
        """N: residual levels per branch (1 without a residual quantizer; multi-scale depth is ``len(scales)``)."""
        return math.prod(size for name, size in self.axes if name == LEVEL)

    @property
    def codebook_sizes(self) -> dict[str, int]:
        """Vocabulary of each distinct codebook, by name, in column order."""
        return dict(zip(self.codebooks, self.vocab_sizes))

    def _axis_sizes(self) -> tuple[int, ...]:
        return tuple(size for _, size in self.axes)

    def _map_shapes(self) -> list[tuple[int, int]]:
        return [(s, s) for s in self.scales] if self.scales else [self.grid]

    def describe(self) -> str:
        axes = ", ".join(f"{name}={size}" for name, size in self.axes) or "one index per position"
        maps = f"scales {list(self.scales)}" if self.scales else f"{self.grid[0]}x{self.grid[1]} grid"
        return f"L={self.length}, K={self.tokens_per_step} ({axes}; {maps})"

    # -- conversions ---------------------------------------------------------------------------------------------
    def to_sequence(self, indices: NativeIndices) -> Tensor:
        """The quantizer's indices -> ``(B, L, K)`` int64 (a new tensor)."""
        lead = self._axis_sizes()
        maps = self._map_shapes()
        parts = list(indices) if isinstance(indices, (list, tuple)) else [indices]
        expected = [f"(B, {', '.join(str(d) for d in (*lead, *shape))})" for shape in maps]
        want = expected[0] if not self.scales else f"a list of {len(maps)} maps {', '.join(expected)}"
        if len(parts) != len(maps) or (not self.scales and isinstance(indices, (list, tuple))) or not all(
            isinstance(p, Tensor) and p.ndim == 1 + len(lead) + 2 and tuple(p.shape[1:]) == (*lead, *shape)
            and p.shape[0] == parts[0].shape[0]
            for p, shape in zip(parts, maps)
        ):
            raise ValueError(f"indices do not match the token layout ({self.describe()}): expected {want}, got "
                             f"{_shape_of(indices)}")
        b = parts[0].shape[0]
        flat = flatten_scales(parts) if self.scales else parts[0].flatten(start_dim=-2)  # (B, *lead, L)
        return flat.reshape(b, self.tokens_per_step, self.length).transpose(1, 2).to(torch.int64).contiguous()

    def from_sequence(self, seq: Tensor) -> NativeIndices:
        """``(B, L, K)`` -> the quantizer's indices (a tensor, or a list per scale), int64, the inverse of
        ``to_sequence``."""
        if not isinstance(seq, Tensor) or seq.ndim != 3 or tuple(seq.shape[1:]) != (self.length, self.tokens_per_step):
            raise ValueError(f"expected a token sequence (B, {self.length}, {self.tokens_per_step}) for the layout "
                             f"({self.describe()}), got {_shape_of(seq)}")
        if seq.dtype.is_floating_point or seq.dtype.is_complex or seq.dtype == torch.bool:
            raise TypeError(f"a token sequence must hold integers, got {seq.dtype}")
        b = seq.shape[0]
        flat = seq.to(torch.int64).transpose(1, 2).reshape(b, *self._axis_sizes(), self.length)
        if self.scales:
            return [m.contiguous() for m in unflatten_scales(flat, self.scales)]
        return flat.unflatten(-1, self.grid).contiguous()

    def codebook_tokens(self, seq: Tensor) -> dict[str, Tensor]:
        """A ``(B, L, K)`` sequence split by codebook: name -> every index of the columns of that codebook (1-D)."""
        if not isinstance(seq, Tensor) or seq.ndim != 3 or seq.shape[-1] != self.tokens_per_step:
            raise ValueError(f"expected a token sequence (B, L, {self.tokens_per_step}), got {_shape_of(seq)}")
        columns: dict[str, list[int]] = {}
        for k, name in enumerate(self.codebooks):
            columns.setdefault(name, []).append(k)
        return {name: seq[..., cols].reshape(-1) for name, cols in columns.items()}


def _shape_of(value: object) -> str:
    if isinstance(value, Tensor):
        return str(tuple(value.shape))
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_shape_of(v) for v in value) + "]"
    return type(value).__name__
