"""The transformer block of the LlamaGen-style generator: pre-norm (RMSNorm) causal self-attention with 2-D rotary
positions and a SwiGLU feed-forward, each on a residual branch with dropout and optional stochastic depth."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xqgan_core.sampling import KVCache

from .rope import apply_rotary

__all__ = ["Block", "swiglu_hidden"]


def swiglu_hidden(width: int, multiple_of: int) -> int:
    """SwiGLU hidden width: 2/3 of a 4x MLP (same parameter count with three matrices), rounded up to
    ``multiple_of`` (LLaMA's rule; LlamaGen uses 256)."""
    hidden = int(2 * 4 * width / 3)
    return -(-hidden // multiple_of) * multiple_of


def drop_path(x: Tensor, rate: float, training: bool) -> Tensor:
    """Stochastic depth: zero a sample's residual branch with probability ``rate``, rescale the survivors."""
    if rate == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - rate)
    return x * keep / (1.0 - rate)


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``; gate and up are one matrix product."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.gate_up = nn.Linear(width, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, width, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Attention(nn.Module):
    """Causal multi-head self-attention with rotary positions; with a ``KVCache`` it appends this call's keys and
    values and attends over everything cached (sampling feeds one new step per call)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None = None) -> Tensor:
        b, t, width = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        causal = True
        if cache is not None:
            past = cache.length
            if past and t != 1:
                raise ValueError(f"attention with a filled cache takes one step at a time, got {t}")
            k, v = cache.append(k, v)
            causal = past == 0  # one new query sees every cached step: no mask needed
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal and t > 1)
        return self.proj(out.transpose(1, 2).reshape(b, t, width))


class Block(nn.Module):
    """``x + attn(norm(x))`` then ``+ ffn(norm(.))``, with residual dropout and stochastic depth."""

    def __init__(self, width: int, heads: int, ffn_hidden: int, norm_eps: float, dropout: float,
                 drop_path: float) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(width, eps=norm_eps)
        self.attn = Attention(width, heads)
        self.ffn_norm = nn.RMSNorm(width, eps=norm_eps)
        self.ffn = SwiGLU(width, ffn_hidden)
        self.dropout = nn.Dropout(dropout)
        self.drop_path = drop_path

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None = None) -> Tensor:
        x = x + drop_path(self.dropout(self.attn(self.attn_norm(x), cos, sin, cache)), self.drop_path, self.training)
        return x + drop_path(self.dropout(self.ffn(self.ffn_norm(x))), self.drop_path, self.training)
