"""Generator ``var``: next-scale prediction (VAR, Tian et al. 2024) over the tokens of a multi-scale quantizer.

The tokens ``(B, L, K)`` are the scales' maps, coarse to fine, each row-major (``L = sum(s_k^2)``); the K columns
are the product branches of a ``pq`` over ``msrq`` (``K = 1`` for a plain ``msrq``). All tokens of one scale are
predicted at once, from the class and every earlier scale:

* Inputs: scale 0's ``s_0^2`` inputs are start tokens (the class embedding plus a learned per-position vector);
  scale ``k >= 1``'s inputs are the codes of scales ``< k`` accumulated at full size and area-resampled to
  ``s_k x s_k``, which the quantizer builds from the indices (``xqgan_core.interfaces.NextScaleInputs``: msrq's
  own code lookup, upsampling and phi refinement, so VQ, LFQ and BSQ codes work alike and the generator never
  reaches into them). The channels of all branches arrive concatenated, so one ``Linear(P * C, width)`` embeds
  the P codes of a position together. A scale (level) embedding and a learned position embedding per token are
  added.
* Attention is block-causal over scales: a token attends to every token of its own and earlier scales.
* Blocks: AdaLN (the class embedding gives each block a scale, shift and gate per residual branch), optionally
  l2-normalised attention (``attn_l2_norm``), MLP ratio ``mlp_ratio``, stochastic depth rising to ``drop_path``.
  Depth ``d`` means width ``64 d`` and ``d`` heads unless ``width`` / ``heads`` say otherwise (VAR's rule).
* Heads: one ``Linear(width, sum_k V_k)`` split per column, so each branch has its own vocabulary-sized head.
* Classes: ``num_classes + 1`` embeddings, the last the null class (label dropout ``class_dropout`` in training,
  the unconditional half of classifier-free guidance).
* Sampling: scale by scale with a ``sampling.KVCache`` per block; guidance ``sampling.cfg_mix`` with VAR's linear
  ramp over scales (``sampling.cfg_ramp``: the conditional model at the first scale, ``cfg_scale`` at the last),
  the batch doubled with the null class; tokens drawn per column with ``sampling.sample_logits``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from xqgan_core import config, option, positive
from xqgan_core.config import at_least, between
from xqgan_core.interfaces import Generator, GeneratorOut, NextScaleInputs, Quantizer
from xqgan_core.sampling import KVCache, cfg_mix, cfg_ramp, sample_logits
from xqgan_core.token_layout import LEVEL, TokenLayout

from .blocks import AdaLNBlock, AdaLNHeadNorm

__all__ = ["NextScaleGenerator", "ScaleChooser"]

#: ``choose(k, logits) -> tokens``: given scale ``k``'s logits (K tensors ``(B, s_k^2, V_j)``), the ``(B, s_k^2, K)``
#: int64 tokens that scale takes (drawn while sampling; the given ones when teacher forcing through the cache)
ScaleChooser = Callable[[int, list[Tensor]], Tensor]

#: VAR's initialisation: AdaLN scale/shift rows damped, gates near zero (blocks start close to the identity),
#: output head small
_INIT_HEAD = 0.02


class NextScaleGenerator(Generator):
    """VAR-style class-conditional next-scale transformer (see the module docstring)."""

    plugin_api = 1

    @config
    class Config:
        depth: int = option(16, help="transformer blocks d; width 64 d and d heads unless set (paper: VAR-d16/d17)",
                            validator=positive())
        width: int = option(0, help="token width; 0 = 64 * depth (VAR's rule)", validator=at_least(0))
        heads: int = option(0, help="attention heads (width must be a multiple); 0 = depth", validator=at_least(0))
        mlp_ratio: float = option(4.0, help="MLP hidden width / token width", validator=positive())
        attn_l2_norm: bool = option(
            True, help="l2-normalise queries and keys, with a learned per-head scale (VAR's attn_l2_norm)")
        drop_path: float = option(0.0, help="stochastic depth rate, rising linearly to this over the blocks",
                                  validator=between(0.0, 1.0))
        class_dropout: float = option(
            0.1, help="probability of replacing a class label by the null class while training (needed for "
            "classifier-free guidance)", validator=between(0.0, 1.0))
        norm_eps: float = option(1e-6, help="epsilon of the layer norms", validator=positive())
        init_std: float = option(0.0, help="std of the truncated-normal init of weights and embeddings; "
                                 "0 = sqrt(1 / (3 width)) (VAR's)", validator=at_least(0.0))
        adaln_init: float = option(0.5, help="multiplier of the AdaLN projections' initial scale and shift rows "
                                   "(VAR's --aln)", validator=at_least(0.0))
        adaln_gate_init: float = option(1e-5, help="multiplier of the AdaLN projections' initial gate rows: near 0, "
                                        "every block starts close to the identity (VAR's --alng; the reference's "
                                        "VAR-d17 recipe: 1e-4)", validator=at_least(0.0))

        def check(self) -> list[str]:
            problems = []
            width, heads = self.width or 64 * self.depth, self.heads or self.depth
            if width % heads:
                problems.append(f"width: {width} is not a multiple of heads ({heads})")
            if self.drop_path >= 1.0:
                problems.append(f"drop_path: must be below 1 (every branch dropped), got {self.drop_path}")
            return problems

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        c = config
        self.width = c.width or 64 * c.depth
        self.num_heads = c.heads or c.depth
        if self.width % self.num_heads:
            raise ValueError(f"generator var: width ({self.width}) must be a multiple of heads ({self.num_heads})")
        rates = torch.linspace(0.0, c.drop_path, c.depth, device="cpu").tolist()  # cpu: buildable on meta
        self.blocks = nn.ModuleList(
            AdaLNBlock(self.width, self.num_heads, c.mlp_ratio, c.attn_l2_norm, rate, c.norm_eps) for rate in rates
        )
        self.head_norm = AdaLNHeadNorm(self.width, c.norm_eps)
        self.layout: TokenLayout | None = None
        self.num_classes = 0
        # set by bind (sized by the tokens): class_embedding, pos_start, pos_embed, level_embed, word_embed, head,
        # the token -> scale map, the scales' token offsets, and the frozen quantizer (NextScaleInputs)
        self.class_embedding: nn.Embedding
        self.pos_start: nn.Parameter
        self.pos_embed: nn.Parameter
        self.level_embed: nn.Embedding
        self.word_embed: nn.Linear
        self.head: nn.Linear
        self.scale_of_token: Tensor
        self.quantizer: NextScaleInputs
        self.offsets: tuple[int, ...] = ()

    # -- building --------------------------------------------------------------------------------------------------
    def bind(self, layout: TokenLayout, quantizer: Quantizer | None, num_classes: int) -> None:
        """Check that ``quantizer`` can serve next-scale inputs for ``layout``, keep it frozen, build the
        embeddings and heads, and initialise every weight."""
        if self.layout is not None:
            raise RuntimeError("generator var: bind() was called twice")
        if num_classes < 0:
            raise ValueError(f"generator var: num_classes must be >= 0, got {num_classes}")
        in_dim = _next_scale_source(layout, quantizer)
        width, device = self.width, self.head_norm.modulation[1].weight.device
        scales = layout.scales
        self.layout, self.num_classes = layout, int(num_classes)
        self.hold_frozen("quantizer", quantizer)  # type: ignore[arg-type]
        sizes = [s * s for s in scales]
        self.offsets = (0, *torch.tensor(sizes).cumsum(0).tolist())
        scale_of_token = torch.repeat_interleave(torch.arange(len(scales)), torch.tensor(sizes)).to(device)
        self.register_buffer("scale_of_token", scale_of_token, persistent=False)
        self.class_embedding = nn.Embedding(self.num_classes + 1, width, device=device)
        self.pos_start = nn.Parameter(torch.empty(1, sizes[0], width, device=device))
        self.pos_embed = nn.Parameter(torch.empty(1, layout.length, width, device=device))
        self.level_embed = nn.Embedding(len(scales), width, device=device)
        self.word_embed = nn.Linear(in_dim, width, device=device)
        self.head = nn.Linear(width, sum(layout.vocab_sizes), device=device)
        self._init_weights()

    def _init_weights(self) -> None:
        std = self.config.init_std or math.sqrt(1 / (3 * self.width))
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, (nn.Linear, nn.Embedding)):
                    nn.init.trunc_normal_(m.weight, std=std)
                    if getattr(m, "bias", None) is not None:
                        m.bias.zero_()
            for p in (self.pos_start, self.pos_embed):
                nn.init.trunc_normal_(p, std=std)
            residual_scale = 1 / math.sqrt(2 * len(self.blocks))  # keep the residual stream's variance in check
            for block in self.blocks:
                block.attn.proj.weight.mul_(residual_scale)
                block.mlp[2].weight.mul_(residual_scale)
                modulation = block.modulation[1].weight
                modulation[: 2 * self.width].mul_(self.config.adaln_gate_init)
                modulation[2 * self.width:].mul_(self.config.adaln_init)
            self.head_norm.modulation[1].weight.mul_(self.config.adaln_init)
            self.head.weight.mul_(_INIT_HEAD)

    def no_weight_decay(self) -> set[str]:
        """VAR's exemptions from weight decay: start and position embeddings, the level embedding and the attention
        log-scales (decaying those would pull every head towards a softer attention)."""
        exempt = {"pos_start", "pos_embed", "level_embed.weight"}
        return {n for n, _ in self.named_parameters() if n in exempt or n.endswith(".attn.l2_scale")}

    def _bound(self) -> TokenLayout:
        if self.layout is None:
            raise RuntimeError("generator var: call bind(layout, quantizer, num_classes) first")
        return self.layout

    # -- pieces shared by teacher forcing and the cached decoder --------------------------------------------------
    def _labels(self, condition: Tensor | None, batch: int, device: torch.device) -> Tensor:
        if condition is None:
            return torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
        if condition.shape != (batch,) or condition.dtype.is_floating_point or condition.dtype == torch.bool:
            raise ValueError(f"generator var: condition must be ({batch},) integer class ids, got "
                             f"{condition.dtype} {tuple(condition.shape)}")
        return condition.to(device=device, dtype=torch.long)

    def _scale_positions(self, start: int, stop: int) -> Tensor:
        """Scale (level) plus position embeddings of tokens ``start:stop``: ``(1, stop - start, width)``."""
        return self.level_embed(self.scale_of_token[start:stop]).unsqueeze(0) + self.pos_embed[:, start:stop]

    def _start_tokens(self, cond: Tensor) -> Tensor:
        """Scale 0's inputs: the class embedding plus a learned vector per position, ``(B, s_0^2, width)``."""
        return cond.unsqueeze(1) + self.pos_start + self._scale_positions(0, self.offsets[1])

    def _embed_inputs(self, maps: list[Tensor], dtype: torch.dtype) -> Tensor:
        """Next-scale input maps ``(B, C, s, s)`` -> ``(B, sum s^2, width)``, row-major within each map."""
        flat = torch.cat([m.flatten(2).transpose(1, 2) for m in maps], dim=1)
        return self.word_embed(flat.to(dtype))

    def _logits(self, x: Tensor, cond: Tensor) -> list[Tensor]:
        out = self.head(self.head_norm(x, cond)).float()
        sizes = self._bound().vocab_sizes
        return [out] if len(sizes) == 1 else list(out.split(list(sizes), dim=-1))  # one column: no split to undo

    # -- teacher forcing ----------------------------------------------------------------------------------------------
    def forward(self, tokens: Tensor, condition: Tensor | None) -> GeneratorOut:
        layout = self._bound()
        indices = layout.from_sequence(tokens)  # checks the shape against the layout
        b, device = tokens.shape[0], self.pos_embed.device
        labels = self._labels(condition, b, device)
        if self.training and self.config.class_dropout > 0:
            dropped = torch.rand(b, device=device) < self.config.class_dropout
            labels = torch.where(dropped, self.num_classes, labels)
        cond = self.class_embedding(labels)
        with torch.no_grad():  # the frozen quantizer's reconstruction path
            maps = self.quantizer.next_scale_inputs(_to_device(indices, device))
        x = self._start_tokens(cond)
        if maps:
            later = self._embed_inputs(maps, x.dtype) + self._scale_positions(self.offsets[1], layout.length)
            x = torch.cat([x, later], dim=1)
        for block in self.blocks:
            x = block(x, cond, spans=self.offsets)  # block-causal over scales
        return GeneratorOut(logits=self._logits(x, cond))

    # -- the cached decoder (sampling, and teacher forcing through the cache) -------------------------------------
    def decode(self, labels: Tensor, cfg_scale: float, choose: ScaleChooser) -> Tensor:
        """Run the model scale by scale with a KV cache: ``choose`` picks each scale's tokens from its (guided)
        logits; returns every scale's tokens ``(B, L, K)``. ``labels`` ``(B,)`` (null class allowed)."""
        layout = self._bound()
        n, scales = labels.shape[0], layout.scales
        axis_sizes = tuple(size for _, size in layout.axes)
        guided = cfg_scale != 1.0
        if guided:  # the batch doubled: conditional rows, then the same rows with the null class
            labels = torch.cat([labels, torch.full_like(labels, self.num_classes)])
        cond = self.class_embedding(labels)
        caches = [KVCache(capacity=layout.length) for _ in self.blocks]  # preallocated: no copy per scale
        x = self._start_tokens(cond)
        f_hat: Tensor | None = None
        picked: list[Tensor] = []
        for k, s in enumerate(scales):
            for block, cache in zip(self.blocks, caches):
                x = block(x, cond, cache=cache)
            logits = self._logits(x, cond)
            if guided:
                weight = cfg_ramp(cfg_scale, k, len(scales))
                logits = [cfg_mix(lg[:n], lg[n:], weight) for lg in logits]
            tokens = choose(k, logits)
            picked.append(tokens)
            if k == len(scales) - 1:
                break
            native = tokens.transpose(1, 2).reshape(n, *axis_sizes, s, s)  # this scale's map, as the quantizer's
            f_hat, nxt = self.quantizer.accumulate_scale(f_hat, k, native)
            assert nxt is not None
            x = self._embed_inputs([nxt], x.dtype) + self._scale_positions(self.offsets[k + 1], self.offsets[k + 2])
            if guided:
                x = torch.cat([x, x])
        return torch.cat(picked, dim=1)

    def cached_logits(self, tokens: Tensor, condition: Tensor | None, cfg_scale: float = 1.0) -> list[Tensor]:
        """Teacher forcing through the sampler's cached path: the (guided) logits ``(B, L, V_k)`` per column that
        ``sample`` would see if it had drawn ``tokens``. Equals ``forward`` (eval mode) at ``cfg_scale = 1``."""
        layout = self._bound()
        layout.from_sequence(tokens)  # shape check
        tokens = tokens.to(self.pos_embed.device)
        seen: list[list[Tensor]] = []

        def teacher(k: int, logits: list[Tensor]) -> Tensor:
            seen.append(logits)
            return tokens[:, self.offsets[k]:self.offsets[k + 1]]

        self.decode(self._labels(condition, tokens.shape[0], tokens.device), cfg_scale, teacher)
        return [torch.cat([scale[j] for scale in seen], dim=1) for j in range(layout.tokens_per_step)]

    def sample(
        self, n: int, condition: Tensor | None = None, *, cfg_scale: float = 1.0, temperature: float = 1.0,
        top_k: int = 0, top_p: float = 1.0, generator: torch.Generator | None = None,
    ) -> Tensor:
        """``(n, L, K)`` tokens, scale by scale (see the module docstring); ``condition`` None = the null class."""
        self._bound()
        if n < 1:
            raise ValueError(f"generator var: n must be >= 1, got {n}")

        def draw(k: int, logits: list[Tensor]) -> Tensor:
            return torch.stack([sample_logits(lg, temperature, top_k, top_p, generator) for lg in logits], dim=-1)

        with torch.no_grad():
            return self.decode(self._labels(condition, n, self.pos_embed.device), cfg_scale, draw)

    def extra_repr(self) -> str:
        c = self.config
        return (f"depth={c.depth}, width={self.width}, heads={self.num_heads}, attn_l2_norm={c.attn_l2_norm}, "
                f"drop_path={c.drop_path}, class_dropout={c.class_dropout}")


def _next_scale_source(layout: TokenLayout, quantizer: Quantizer | None) -> int:
    """The channels of the next-scale inputs ``quantizer`` builds for ``layout``; ValueError for a layout or
    quantizer next-scale prediction cannot serve."""
    if not layout.scales:
        raise ValueError(
            f"generator var: the tokens have no scales ({layout.describe()}); next-scale prediction needs a "
            "multi-scale quantizer (quantizer use = 'msrq', or 'pq' with branch use = 'msrq'). For single-scale "
            "tokens use generator 'llamagen'")
    if len(layout.scales) < 2:
        raise ValueError(f"generator var: next-scale prediction needs at least two scales, the tokens have "
                         f"{list(layout.scales)} (msrq `scales`)")
    if any(name == LEVEL for name, _ in layout.axes):
        raise ValueError(f"generator var: residual levels inside a multi-scale layout are not supported "
                         f"({layout.describe()})")
    if quantizer is None or not isinstance(quantizer, NextScaleInputs):
        raise ValueError(
            f"generator var: it needs the tokenizer's quantizer to build each scale's input from the earlier "
            f"scales' codes (xqgan_core.interfaces.NextScaleInputs: msrq, or pq over msrq), got "
            f"{type(quantizer).__name__}")
    try:
        dim = quantizer.next_scale_dim()
    except ValueError as err:
        raise ValueError(f"generator var: {err}") from err
    own = quantizer.token_layout(*layout.grid)  # type: ignore[attr-defined]
    if own != layout:
        raise ValueError(f"generator var: the token layout ({layout.describe()}) is not the quantizer's own at "
                         f"that grid ({own.describe()})")
    return dim


def _to_device(indices: Tensor | list[Tensor], device: torch.device) -> Tensor | list[Tensor]:
    if isinstance(indices, Tensor):
        return indices.to(device)
    return [i.to(device) for i in indices]
