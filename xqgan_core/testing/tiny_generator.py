"""A tiny raster-order transformer generator: the core's tests train it, the contract kit checks it, and it is the
shortest complete example of a ``Generator`` plugin (registered as ``kit-tiny-ar``: a test name, not a model to use).

Sequence: position 0 holds the class embedding (the null class when unconditional or dropped), position ``t > 0``
the sum of the K token embeddings of step ``t - 1``; the hidden state at ``t`` predicts the K tokens of step ``t``
with one linear head per column (the columns of a step are predicted together, not in order).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import at_least, between, config, option, positive
from ..interfaces import Generator, GeneratorOut, Quantizer
from ..sampling import KVCache, cfg_mix, sample_logits
from ..token_layout import TokenLayout

__all__ = ["TinyARGenerator"]


class _Block(nn.Module):
    """Pre-norm causal self-attention + MLP; ``cache`` given: the new positions attend to everything cached."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: Tensor, cache: KVCache | None = None) -> Tensor:
        b, t, w = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        if cache is not None:
            k, v = cache.append(k, v)
        # uncached: causal over the whole sequence; cached: one new step attends to all steps so far
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=cache is None and t > 1)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, w))
        return x + self.mlp(self.norm2(x))


class TinyARGenerator(Generator):
    """A few-layer causal transformer over ``(B, L, K)`` tokens, class-conditional with label dropout and CFG."""

    plugin_api = 1

    @config
    class Config:
        width: int = option(32, help="Hidden width (a multiple of heads).", validator=positive())
        depth: int = option(2, help="Transformer blocks.", validator=positive())
        heads: int = option(2, help="Attention heads.", validator=positive())
        class_dropout: float = option(
            0.1, help="Probability that a training sample's class is replaced by the null class (for CFG).",
            validator=between(0, 1),
        )
        init_std: float = option(0.02, help="Standard deviation of the initial embedding weights.",
                                 validator=at_least(0))

        def check(self) -> list[str]:
            if self.width % self.heads:
                return [f"width: {self.width} is not a multiple of heads = {self.heads}"]
            return []

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.layout: TokenLayout | None = None
        self.num_classes = 0

    # -- Generator ---------------------------------------------------------------------------------------------
    def bind(self, layout: TokenLayout, quantizer: Quantizer | None, num_classes: int) -> None:
        if self.layout is not None:
            raise RuntimeError("TinyARGenerator.bind: already bound (bind is called once, before the optimizer)")
        cfg = self.config
        self.layout, self.num_classes = layout, int(num_classes)
        self.class_embed = nn.Embedding(self.num_classes + 1, cfg.width)  # last id: the null class
        self.token_embed = nn.ModuleList(nn.Embedding(v, cfg.width) for v in layout.vocab_sizes)
        self.pos = nn.Parameter(torch.randn(layout.length, cfg.width) * cfg.init_std)
        self.blocks = nn.ModuleList(_Block(cfg.width, cfg.heads) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width)
        self.heads = nn.ModuleList(nn.Linear(cfg.width, v) for v in layout.vocab_sizes)
        for emb in (self.class_embed, *self.token_embed):
            nn.init.normal_(emb.weight, std=cfg.init_std)

    def forward(self, tokens: Tensor, condition: Tensor | None) -> GeneratorOut:
        layout = self._bound()
        if tokens.dim() != 3 or tokens.shape[1:] != (layout.length, layout.tokens_per_step):
            expected = f"(B, {layout.length}, {layout.tokens_per_step})"
            raise ValueError(f"tokens: expected {expected}, got {tuple(tokens.shape)}")
        cond = self._condition(condition, tokens.shape[0], tokens.device)
        if self.training and self.config.class_dropout > 0:
            dropped = torch.rand(cond.shape, device=cond.device) < self.config.class_dropout
            cond = cond.masked_fill(dropped, self.num_classes)
        start = self.class_embed(cond)[:, None]
        steps = self._embed_steps(tokens[:, :-1])
        x = torch.cat([start, steps], dim=1) + self.pos
        for block in self.blocks:
            x = block(x)
        h = self.norm(x)
        return GeneratorOut(logits=[head(h) for head in self.heads])

    @torch.no_grad()
    def sample(
        self, n: int, condition: Tensor | None = None, *, cfg_scale: float = 1.0, temperature: float = 1.0,
        top_k: int = 0, top_p: float = 1.0, generator: torch.Generator | None = None,
    ) -> Tensor:
        layout = self._bound()
        device = self.pos.device
        cond = self._condition(condition, n, device)
        guided = cfg_scale != 1.0
        if guided:  # one batch: conditional rows first, then the same rows with the null class
            cond = torch.cat([cond, torch.full_like(cond, self.num_classes)])
        caches = [KVCache() for _ in self.blocks]
        x = self.class_embed(cond)[:, None] + self.pos[:1]
        out = torch.empty(n, layout.length, layout.tokens_per_step, dtype=torch.long, device=device)
        for t in range(layout.length):
            for block, cache in zip(self.blocks, caches):
                x = block(x, cache)
            h = self.norm(x[:, -1])
            for k, head in enumerate(self.heads):
                logits = head(h)
                if guided:
                    logits = cfg_mix(logits[:n], logits[n:], cfg_scale)
                out[:, t, k] = sample_logits(logits, temperature, top_k, top_p, generator)
            if t + 1 < layout.length:
                step = out[:, t : t + 1]
                x = self._embed_steps(torch.cat([step, step]) if guided else step) + self.pos[t + 1 : t + 2]
        return out

    # -- helpers -----------------------------------------------------------------------------------------------
    def _bound(self) -> TokenLayout:
        if self.layout is None:
            raise RuntimeError("TinyARGenerator: call bind(layout, quantizer, num_classes) first")
        return self.layout

    def _condition(self, condition: Tensor | None, n: int, device: torch.device) -> Tensor:
        """Class ids ``(n,)``; None (or an unconditional model) -> the null class."""
        if condition is None or self.num_classes == 0:
            return torch.full((n,), self.num_classes, dtype=torch.long, device=device)
        if condition.shape != (n,):
            raise ValueError(f"condition: expected ({n},) class ids, got {tuple(condition.shape)}")
        return condition.to(device=device, dtype=torch.long)

    def _embed_steps(self, tokens: Tensor) -> Tensor:
        """``(B, T, K)`` tokens -> ``(B, T, width)``: the sum of the K column embeddings of each step."""
        return sum(emb(tokens[..., k]) for k, emb in enumerate(self.token_embed))
