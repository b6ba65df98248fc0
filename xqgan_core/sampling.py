"""Shared pieces of autoregressive generation: token cross entropy, logit filtering, classifier-free guidance, a
key-value cache. Every generator plugin (var, llamagen, a third party's) uses these, so sampling behaves the same
whatever the model.

Conventions: logits are ``(..., V)`` float tensors; ``top_k = 0`` and ``top_p = 1.0`` switch the filters off;
``temperature = 0`` is not allowed (use ``top_k = 1`` for greedy decoding, which is deterministic).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["token_cross_entropy", "filter_logits", "sample_logits", "cfg_mix", "cfg_ramp", "KVCache"]


def token_cross_entropy(logits: Sequence[Tensor], tokens: Tensor, weight: Tensor | None = None) -> Tensor:
    """Mean cross entropy over every token of ``tokens`` ``(B, L, K)``; ``logits[k]`` is ``(B, L, V_k)``, one per
    column (columns may have different vocabularies). ``weight`` ``(L,)`` weights the steps (VAR may weight scales);
    the result is the weighted mean over steps, averaged over columns."""
    if len(logits) != tokens.shape[-1]:
        raise ValueError(f"token_cross_entropy: {len(logits)} logit columns for {tokens.shape[-1]} token columns")
    per_col = []
    for k, lg in enumerate(logits):
        ce = F.cross_entropy(lg.float().flatten(0, -2), tokens[..., k].flatten(), reduction="none").view(tokens.shape[:-1])
        per_col.append(ce.mean() if weight is None else (ce * weight).sum(-1).mean() / weight.sum())
    return torch.stack(per_col).mean()


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """``logits`` with everything outside the top-k and outside the nucleus of mass ``top_p`` set to -inf (last dim).
    The most likely token always survives.

    Top-k keeps every logit at least the k-th largest (ties with it included). The nucleus is the shortest run of
    the most likely remaining tokens whose mass reaches ``top_p`` (a token is kept while the mass before it is below
    ``top_p``); it is applied as a logit threshold, so a token tied with its least likely member is kept too and
    the result never depends on how a sort orders equal logits. With both filters on, the nucleus is found among
    the k values ``topk`` returns sorted (plus the count of ties with the k-th outside them), without sorting the
    whole vocabulary."""
    if top_k < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(f"filter_logits: need top_k >= 0 and 0 < top_p <= 1, got top_k={top_k}, top_p={top_p}")
    if 0 < top_k < logits.shape[-1]:
        best = torch.topk(logits, top_k, dim=-1).values  # sorted, most likely first
        kth = best[..., -1:]
        if top_p < 1.0:
            ties_outside = (logits >= kth).sum(-1, keepdim=True) - top_k  # equal to the k-th, not among the k
            return logits.masked_fill(logits < _nucleus_floor(best, top_p, ties_outside), float("-inf"))
        return logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        ranked = torch.sort(logits, dim=-1, descending=True).values
        return logits.masked_fill(logits < _nucleus_floor(ranked, top_p), float("-inf"))
    return logits


def _nucleus_floor(ranked: Tensor, top_p: float, ties_outside: Tensor | None = None) -> Tensor:
    """The least logit of the nucleus of mass ``top_p``, ``(..., 1)``, given the candidate logits sorted most likely
    first ``(..., n)`` (-inf = not a candidate) and, per row, how many more candidates equal to the last one were
    left out of ``ranked`` (they only add to the total mass: if the nucleus reaches them, it ends on their value)."""
    weights = (ranked - ranked[..., :1]).exp()  # unnormalised probabilities
    mass = weights.cumsum(-1)
    total = mass[..., -1:] if ties_outside is None else mass[..., -1:] + ties_outside * weights[..., -1:]
    below = (mass < top_p * total).sum(-1, keepdim=True)  # tokens whose mass so far is below top_p
    kept = (below + 1).clamp_max(ranked.shape[-1])  # ... and the one that reaches it
    return ranked.gather(-1, kept - 1)


def sample_logits(
    logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One token per row of ``logits`` ``(..., V)``: ``(...)`` int64. ``top_k = 1`` is greedy and deterministic."""
    if temperature <= 0:
        raise ValueError(f"sample_logits: temperature must be > 0, got {temperature} (use top_k = 1 for greedy)")
    if top_k == 1:
        return logits.argmax(-1)
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(-1)
    flat = torch.multinomial(probs.flatten(0, -2), 1, generator=generator)
    return flat.view(probs.shape[:-1])


def cfg_mix(cond: Tensor, uncond: Tensor, scale: float | Tensor) -> Tensor:
    """Classifier-free guidance on logits: ``uncond + scale * (cond - uncond)``; ``scale = 1`` returns ``cond``."""
    return uncond + scale * (cond - uncond)


def cfg_ramp(cfg_scale: float, step: int, steps: int) -> float:
    """VAR's linear ramp over scales: guidance grows from 1 at the first scale to ``cfg_scale`` at the last
    (``1 + (cfg_scale - 1) * step / (steps - 1)``)."""
    if steps <= 1:
        return cfg_scale
    return 1.0 + (cfg_scale - 1.0) * step / (steps - 1)


class KVCache:
    """Keys and values of one attention layer, grown along the sequence dim (-2) as sampling proceeds.

    ``append(k, v)`` stores the new ``(B, heads, t, d)`` entries and returns everything cached so far; ``reset()``
    empties it. Without ``capacity`` each append concatenates (a copy of the whole cache per call: fine for VAR's ten
    scales); with ``capacity`` (the total length the caller will append) the first append allocates buffers of that
    length and later ones write into them, returning views, so token-by-token decoding copies nothing.
    """

    def __init__(self, capacity: int | None = None) -> None:
        if capacity is not None and capacity < 1:
            raise ValueError(f"KVCache: capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.k: Tensor | None = None
        self.v: Tensor | None = None
        self._buffers: tuple[Tensor, Tensor] | None = None

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if self.capacity is None:
            self.k = k if self.k is None else torch.cat([self.k, k], dim=-2)
            self.v = v if self.v is None else torch.cat([self.v, v], dim=-2)
            return self.k, self.v
        start, end = self.length, self.length + k.shape[-2]
        if end > self.capacity:
            raise ValueError(f"KVCache: appending {k.shape[-2]} steps to {start} exceeds the capacity {self.capacity}")
        if self._buffers is None:
            shape = (*k.shape[:-2], self.capacity, k.shape[-1])
            self._buffers = (k.new_empty(shape), v.new_empty((*v.shape[:-2], self.capacity, v.shape[-1])))
        buf_k, buf_v = self._buffers
        buf_k[..., start:end, :] = k
        buf_v[..., start:end, :] = v
        self.k, self.v = buf_k[..., :end, :], buf_v[..., :end, :]
        return self.k, self.v

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[-2]

    def reset(self) -> None:
        self.k = self.v = None
        self._buffers = None
