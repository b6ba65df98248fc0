"""The transformer pieces of the next-scale generator: AdaLN-conditioned self-attention blocks (VAR's design: the
class embedding sets a per-block scale, shift and gate of each residual branch) and the AdaLN norm before the head.

Attention is block-causal over scales. Teacher forcing (all scales at once) gets the scales' token offsets
``spans``: the queries of each scale attend to the keys of that scale and the earlier ones only, one unmasked
attention call per scale, so the masked-out blocks (about 40 % of the full ``L x L`` at VAR's scales) are never
computed. Sampling gets a ``KVCache`` instead (one scale per call; the cache holds every earlier scale, so the new
scale attends to all of them and to itself without a mask, which is the same pattern).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xqgan_core.sampling import KVCache

__all__ = ["AdaLNBlock", "AdaLNHeadNorm"]

#: l2-normalised attention: the learned per-head logit scale starts at 4 and is capped at 100 (as VAR)
_L2_SCALE_INIT = math.log(4.0)
_L2_SCALE_MAX = math.log(100.0)
_NORM_EPS = 1e-12


class Attention(nn.Module):
    """Multi-head self-attention; ``l2_norm`` normalises queries and keys per head and scales their dot product by
    a learned per-head factor (VAR's ``attn_l2_norm``: bounded logits, stable at depth)."""

    def __init__(self, width: int, heads: int, l2_norm: bool) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.l2_scale = nn.Parameter(torch.full((1, heads, 1, 1), _L2_SCALE_INIT)) if l2_norm else None

    def forward(self, x: Tensor, spans: Sequence[int] | None, cache: KVCache | None) -> Tensor:
        b, t, width = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        scale = None
        if self.l2_scale is not None:
            # the per-head scale is folded into q's normalisation: one pass over q instead of two
            gain = self.l2_scale.clamp(max=_L2_SCALE_MAX).exp()
            q = q * (gain / torch.linalg.vector_norm(q, dim=-1, keepdim=True).clamp_min(_NORM_EPS))
            k = F.normalize(k, dim=-1, eps=_NORM_EPS)
            scale = 1.0
        if cache is not None:
            k, v = cache.append(k, v)
        if spans is None:  # every query sees every key (a cached step: the cache holds the earlier scales)
            out = F.scaled_dot_product_attention(q, k, v, scale=scale)
        else:  # block-causal: the queries of tokens start:stop see keys :stop (split, not sliced: one backward node)
            queries = q.split([stop - start for start, stop in zip(spans[:-1], spans[1:])], dim=2)
            out = torch.cat([F.scaled_dot_product_attention(q_span, k[:, :, :stop], v[:, :, :stop], scale=scale)
                             for q_span, stop in zip(queries, spans[1:])], dim=2)
        return self.proj(out.transpose(1, 2).reshape(b, t, width))


class MLP(nn.Sequential):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))


class AdaLNBlock(nn.Module):
    """``x + gate1 * attn(norm(x) * (1 + scale1) + shift1)``, then the same around the MLP; the six modulation
    vectors come from the condition (``SiLU -> Linear``), per block. In training, stochastic depth drops a sample's
    branch with probability ``drop_path_rate`` (survivors rescaled)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, l2_norm: bool, drop_path_rate: float,
                 norm_eps: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=norm_eps, elementwise_affine=False)
        self.attn = Attention(width, heads, l2_norm)
        self.mlp = MLP(width, round(width * mlp_ratio))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))
        self.drop_path_rate = drop_path_rate

    def forward(self, x: Tensor, cond: Tensor, spans: Sequence[int] | None = None, cache: KVCache | None = None
                ) -> Tensor:
        gate1, gate2, scale1, scale2, shift1, shift2 = self.modulation(cond).unsqueeze(1).chunk(6, dim=-1)
        x = self._residual(x, self.attn(torch.addcmul(shift1, self.norm(x), 1 + scale1), spans, cache), gate1)
        return self._residual(x, self.mlp(torch.addcmul(shift2, self.norm(x), 1 + scale2)), gate2)

    def _residual(self, x: Tensor, h: Tensor, gate: Tensor) -> Tensor:
        """``x + drop_path(gate * h)`` in one fused pass: stochastic depth scales a sample's whole branch, so its
        keep / (1 - rate) factor is folded into the sample's ``(B, 1, width)`` gate."""
        rate = self.drop_path_rate
        if self.training and rate > 0:
            keep = gate.new_empty(gate.shape[0], 1, 1).bernoulli_(1.0 - rate)
            gate = gate * (keep / (1.0 - rate))
        return torch.addcmul(x, h, gate)


class AdaLNHeadNorm(nn.Module):
    """The norm before the output head, modulated by the condition: ``norm(x) * (1 + scale) + shift``."""

    def __init__(self, width: int, norm_eps: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=norm_eps, elementwise_affine=False)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        scale, shift = self.modulation(cond).unsqueeze(1).chunk(2, dim=-1)
        return torch.addcmul(shift, self.norm(x), 1 + scale)
