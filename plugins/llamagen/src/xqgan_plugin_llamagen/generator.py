"""Generator ``llamagen``: a raster-order, decoder-only transformer in the style of LlamaGen (Sun et al. 2024).

Sequence: the tokens ``(B, L, K)`` are read position-major, column-minor, as ``L * K`` steps (step ``s`` is token
``(s // K, s % K)``), so residual levels and product branches of one position are predicted one after the other.
The input is a class token followed by the embeddings of steps ``0 .. L*K - 2``; the output at input index ``s``
predicts step ``s`` with the head of column ``s % K``.

* Class token: ``class_embedding`` has ``num_classes + 1`` rows, the last being the null class (label dropout
  ``class_dropout`` while training, the unconditional branch of classifier-free guidance). ``num_classes = 0``
  leaves only that row: a learned start token for an unconditional model.
* Tokens: one embedding table and one output head per column, sized by that column's vocabulary
  (``layout.vocab_sizes[k]``). A table per column already tells the model which column a step holds, so no
  separate column embedding is added (it would be a constant shift of each table).
* Positions: 2-D rotary embeddings (``rope.py``) by the grid cell ``(row, col)`` of the step a token holds; the
  ``K`` steps of one cell share its rotation. The class token is at angle 0.
* Blocks (``blocks.py``): RMSNorm, causal attention through ``F.scaled_dot_product_attention``, SwiGLU.
* Sampling: one step at a time with a ``sampling.KVCache`` per block; classifier-free guidance with a constant
  scale (LlamaGen's), the batch doubled with the null class; ``sampling.sample_logits`` per column.

Multi-scale layouts (msrq) are refused at ``bind``: a raster order over a pyramid of maps has no single grid to
place rotary positions on, and next-scale prediction is what those tokens are for (generator ``var``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from xqgan_core import config, option, positive
from xqgan_core.config import at_least, between
from xqgan_core.interfaces import Generator, GeneratorOut, Quantizer
from xqgan_core.sampling import KVCache, cfg_mix, sample_logits
from xqgan_core.token_layout import TokenLayout

from .blocks import Block, swiglu_hidden
from .rope import grid_angles

__all__ = ["LlamaGenGenerator", "StepChooser"]

#: ``choose(step, column, logits (B, V_k)) -> tokens (B,)`` int64: how ``decode`` picks each step's tokens
StepChooser = Callable[[int, int, Tensor], Tensor]


class LlamaGenGenerator(Generator):
    """Raster-order class-conditional transformer over ``(B, L, K)`` token sequences (see the module docstring)."""

    plugin_api = 1

    @config
    class Config:
        depth: int = option(
            12, help="transformer blocks. LlamaGen presets (depth / width / heads): B = 12 / 768 / 12, "
            "L = 24 / 1024 / 16, XL = 36 / 1280 / 20, XXL = 48 / 1536 / 24", validator=positive())
        width: int = option(768, help="token width (model dim); a multiple of heads", validator=positive())
        heads: int = option(12, help="attention heads; width / heads must be a multiple of 4 (2-D rotary pairs)",
                            validator=positive())
        ffn_multiple_of: int = option(
            256, help="the SwiGLU hidden width (8/3 * width) is rounded up to a multiple of this (LlamaGen: 256)",
            validator=positive())
        rope_base: float = option(10000.0, help="base of the rotary frequencies (per grid axis)",
                                  validator=positive())
        norm_eps: float = option(1e-5, help="epsilon of the RMSNorm layers", validator=positive())
        dropout: float = option(
            0.1, help="dropout on the input embeddings and on each attention / feed-forward output (LlamaGen's "
            "token, residual and FFN dropout are 0.1)", validator=between(0.0, 1.0))
        drop_path: float = option(0.0, help="stochastic depth rate, rising linearly to this over the blocks",
                                  validator=between(0.0, 1.0))
        class_dropout: float = option(
            0.1, help="probability of replacing a class label by the null class while training (needed for "
            "classifier-free guidance)", validator=between(0.0, 1.0))
        init_std: float = option(0.02, help="std of the normal init of linear and embedding weights",
                                 validator=at_least(0.0))
        head_init_std: float = option(
            0.0, help="std of the normal init of the output heads; 0 = zeros, LlamaGen's choice (uniform predictions "
            "at the start)", validator=at_least(0.0))

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        c = config
        if c.width % c.heads or (c.width // c.heads) % 4:
            raise ValueError(
                f"generator llamagen: width ({c.width}) must be heads ({c.heads}) times a multiple of 4 (the 2-D "
                f"rotary embedding rotates pairs of channels per grid axis)"
            )
        hidden = swiglu_hidden(c.width, c.ffn_multiple_of)
        rates = torch.linspace(0.0, c.drop_path, c.depth).tolist()
        self.blocks = nn.ModuleList(
            Block(c.width, c.heads, hidden, c.norm_eps, c.dropout, rate) for rate in rates
        )
        self.norm = nn.RMSNorm(c.width, eps=c.norm_eps)
        self.input_dropout = nn.Dropout(c.dropout)
        self._init_weights(self.blocks)
        self.layout: TokenLayout | None = None
        self.num_classes = 0
        # set by bind: class_embedding, token_embeddings, heads, rope_cos / rope_sin (LK, head_dim / 2)
        self.class_embedding: nn.Embedding
        self.token_embeddings: nn.ModuleList
        self.heads: nn.ModuleList
        self.rope_cos: Tensor
        self.rope_sin: Tensor

    # -- building --------------------------------------------------------------------------------------------------
    def bind(self, layout: TokenLayout, quantizer: Quantizer | None, num_classes: int) -> None:
        """Build the class table, per-column embeddings and heads, and the rotary tables for ``layout``."""
        if self.layout is not None:
            raise RuntimeError("generator llamagen: bind() was called twice")
        if layout.scales:
            raise ValueError(
                f"generator llamagen: the tokens are multi-scale ({layout.describe()}); a raster order over a pyramid "
                f"of maps has no single grid for its positions. Use generator 'var' (next-scale prediction) for "
                f"msrq tokens, or a single-scale quantizer (vq, rq, pq, lfq, bsq)"
            )
        if num_classes < 0:
            raise ValueError(f"generator llamagen: num_classes must be >= 0, got {num_classes}")
        width = self.config.width
        device, dtype = self.norm.weight.device, self.norm.weight.dtype  # where the blocks already are
        self.layout, self.num_classes = layout, int(num_classes)
        self.class_embedding = nn.Embedding(self.num_classes + 1, width, device=device, dtype=dtype)
        self.token_embeddings = nn.ModuleList(
            nn.Embedding(v, width, device=device, dtype=dtype) for v in layout.vocab_sizes)
        self.heads = nn.ModuleList(
            nn.Linear(width, v, bias=False, device=device, dtype=dtype) for v in layout.vocab_sizes)
        self._init_weights(self.class_embedding)
        self._init_weights(self.token_embeddings)
        for head in self.heads:
            nn.init.normal_(head.weight, std=self.config.head_init_std)  # std 0 gives zeros
        k = layout.tokens_per_step
        steps = torch.arange(layout.length * k - 1)  # the steps fed as inputs after the class token
        angles = grid_angles(steps // k, layout.grid[1], width // self.config.heads, self.config.rope_base)
        angles = torch.cat([angles.new_zeros(1, angles.shape[1]), angles])  # class token: angle 0
        self.register_buffer("rope_cos", angles.cos().to(device), persistent=False)
        self.register_buffer("rope_sin", angles.sin().to(device), persistent=False)

    def _init_weights(self, root: nn.Module) -> None:
        for m in root.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=self.config.init_std)

    def _bound(self) -> TokenLayout:
        if self.layout is None:
            raise RuntimeError("generator llamagen: call bind(layout, quantizer, num_classes) before using it")
        return self.layout

    # -- conditioning ----------------------------------------------------------------------------------------------
    def _class_ids(self, condition: Tensor | None, batch: int, device: torch.device) -> Tensor:
        """``(batch,)`` class ids, the null class for ``None``; ValueError for ids outside ``[0, num_classes]``."""
        null = self.num_classes
        if condition is None:
            return torch.full((batch,), null, dtype=torch.int64, device=device)
        if condition.shape != (batch,) or condition.dtype.is_floating_point or condition.dtype == torch.bool:
            raise ValueError(f"generator llamagen: condition must be ({batch},) integer class ids, got "
                             f"{tuple(condition.shape)} {condition.dtype}")
        if condition.numel() and (int(condition.min()) < 0 or int(condition.max()) > null):
            raise ValueError(f"generator llamagen: class ids must lie in [0, {null}] ({null} = null class, "
                             f"num_classes = {self.num_classes}), got [{int(condition.min())}, {int(condition.max())}]")
        return condition.to(device=device, dtype=torch.int64)

    def _drop_labels(self, ids: Tensor) -> Tensor:
        rate = self.config.class_dropout
        if not self.training or rate == 0.0 or self.num_classes == 0:
            return ids
        drop = torch.rand(ids.shape, device=ids.device) < rate
        return ids.masked_fill(drop, self.num_classes)

    # -- teacher forcing -------------------------------------------------------------------------------------------
    def forward(self, tokens: Tensor, condition: Tensor | None) -> GeneratorOut:
        layout = self._bound()
        b, k = tokens.shape[0], layout.tokens_per_step
        if tokens.ndim != 3 or tuple(tokens.shape[1:]) != (layout.length, k):
            raise ValueError(f"generator llamagen: expected tokens (B, {layout.length}, {k}) for the layout "
                             f"({layout.describe()}), got {tuple(tokens.shape)}")
        ids = self._drop_labels(self._class_ids(condition, b, tokens.device))
        steps = torch.stack([emb(tokens[..., c]) for c, emb in enumerate(self.token_embeddings)], dim=2)
        x = torch.cat([self.class_embedding(ids)[:, None], steps.flatten(1, 2)[:, :-1]], dim=1)
        x = self.input_dropout(x)
        for block in self.blocks:
            x = block(x, self.rope_cos, self.rope_sin)
        h = self.norm(x).view(b, layout.length, k, -1)
        return GeneratorOut(logits=[head(h[:, :, c]) for c, head in enumerate(self.heads)])

    # -- sampling --------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, class_ids: Tensor, choose: StepChooser) -> Tensor:
        """The cached step-by-step loop: ``(B, L, K)`` tokens for ``class_ids`` ``(B,)``, each step's tokens picked
        by ``choose(step, column, logits)`` from that step's logits ``(B, V_column)``. ``sample`` is this loop with
        guidance and ``sample_logits``; a chooser returning given tokens scores a sequence (teacher forcing)."""
        layout = self._bound()
        k, steps = layout.tokens_per_step, layout.length * layout.tokens_per_step
        caches = [KVCache(capacity=steps) for _ in self.blocks]  # inputs: class token + steps - 1 tokens
        out = torch.empty(class_ids.shape[0], steps, dtype=torch.int64, device=class_ids.device)
        x = self.class_embedding(class_ids)[:, None]
        for s in range(steps):
            cos, sin = self.rope_cos[s : s + 1], self.rope_sin[s : s + 1]
            for block, cache in zip(self.blocks, caches):
                x = block(x, cos, sin, cache)
            column = s % k
            out[:, s] = choose(s, column, self.heads[column](self.norm(x[:, -1])))
            if s + 1 < steps:
                x = self.token_embeddings[column](out[:, s])[:, None]
        return out.view(-1, layout.length, k)

    @torch.no_grad()
    def sample(
        self, n: int, condition: Tensor | None = None, *, cfg_scale: float = 1.0, temperature: float = 1.0,
        top_k: int = 0, top_p: float = 1.0, generator: torch.Generator | None = None,
    ) -> Tensor:
        """``(n, L, K)`` int64 tokens (see ``Generator.sample``); guidance at a constant ``cfg_scale``. Runs in eval
        mode (restoring the caller's mode)."""
        self._bound()
        if n < 1:
            raise ValueError(f"generator llamagen: n must be >= 1, got {n}")
        guided = cfg_scale != 1.0
        if guided and self.num_classes == 0:
            raise ValueError(f"generator llamagen: cfg_scale {cfg_scale} needs a class-conditional model "
                             f"(num_classes = 0 here); use cfg_scale = 1")
        device = self.norm.weight.device
        ids = self._class_ids(condition, n, device)
        if guided:
            ids = torch.cat([ids, torch.full_like(ids, self.num_classes)])

        def choose(step: int, column: int, logits: Tensor) -> Tensor:
            if guided:
                cond, uncond = logits.chunk(2)
                logits = cfg_mix(cond, uncond, cfg_scale)
            picked = sample_logits(logits, temperature, top_k, top_p, generator)
            return torch.cat([picked, picked]) if guided else picked

        was_training = self.training
        self.eval()
        try:
            return self.decode(ids, choose)[:n]
        finally:
            self.train(was_training)
