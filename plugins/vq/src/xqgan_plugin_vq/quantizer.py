"""Vector quantization (XQ-GAN Sec. 4.1): each latent token is replaced by its nearest codebook entry.

``z' = argmin_j ||z - e_j||^2`` over a learned codebook ``{e_j}``. With ``l2_norm`` (the default, as in the
reference recipe) tokens and codebook rows are l2-normalised first, so the search is by cosine similarity and
every code lies on the unit sphere. Training signal: the codebook loss ``mean((z_q - sg z)^2)`` moves the codes,
the commitment loss ``beta * mean((sg z_q - z)^2)`` moves the encoder, and the straight-through estimator passes
the reconstruction gradient from ``z_q`` to the (normalised) input.

The codebook is ``self.embedding`` (an ``nn.Embedding``; state-dict key ``embedding.weight``, shape
``(codebook_size, dim)``). With ``l2_norm`` the stored rows are normalised on use, so the code of index ``i`` is
``normalize(embedding.weight[i])``.

Codebook health (every option is off by default; the defaults quantize exactly as plain VQ). Everything below
happens in training mode (``module.train()``, whether or not gradients are recorded) and under ``no_grad``; eval
mode and ``codes_to_indices`` read the codebook and change nothing.

* ``kmeans_init = N``: the first training forward(s) gather tokens (at least ``codebook_size`` of them and at least
  ``kmeans_batches`` batches) and then set the codebook to the result of k-means over them: k-means++ seeding
  (D^2 sampling, so well-separated clusters each get a seed) followed by N Lloyd iterations with the chunked
  ``nearest_code`` search. With ``l2_norm`` it is spherical k-means (unit tokens, centres = normalised means).
  Until then the current codebook quantizes. The ``initialised`` buffer (bool) records that it happened, so a
  resumed run does not do it again. Gathered tokens are not part of the state: a run stopped mid-gathering
  starts gathering again. Under ``torch.distributed`` rank 0 decides when, runs k-means on its own tokens and
  broadcasts the centres.
* ``dead_code_threshold = T > 0``: buffer ``usage`` is an EMA (``usage_decay``) of how many tokens each code
  received per training batch. It starts at ``T`` ("no evidence yet"), so a code is dead once it is hit fewer than
  ``T`` times per batch on average, and an initial code that gets no token in the first batch is dead after it.
  At the start of each training forward, before the lookup, dead codes are restarted from random tokens of the
  incoming batch (distinct while there are enough; normalised with ``l2_norm``) and their usage is reset to
  ``T``: a restarted code survives if it receives at least ``T`` tokens in the next batch, else it is restarted
  again. Restarting before rather than after the lookup keeps the autograd graph of the previous forward valid.
  No restarts happen while k-means initialisation is pending (the codebook is about to be replaced); the k-means
  init resets ``usage`` to ``T``. Stat ``restarted``: codes restarted in this forward. The optimizer's state for
  a restarted row (Adam moments) is not reset: the module cannot reach it.
* ``ema_update``: the codebook is not learned by gradient (``embedding.weight.requires_grad`` is False and the
  ``codebook`` loss is not returned; ``commitment`` stays). Buffers ``ema_count`` (K) and ``ema_sum`` (K, dim) are
  EMAs (``ema_decay``) of the per-batch count and sum of the tokens assigned to each code; after each training
  lookup the codes become ``ema_sum / smoothed(ema_count)`` with Laplace smoothing
  ``(c + eps) / (n + K * eps) * n`` (``n`` = total count), re-normalised with ``l2_norm``. ``ema_count`` starts
  at 1 with ``ema_sum`` equal to the initial rows, so an unused code stays where it is. A k-means init sets
  ``ema_sum = centres * ema_count``; a restarted code gets ``ema_count = T`` and ``ema_sum = T * token``.
* Stats of every training forward, besides the batch-local ``perplexity`` and ``utilization`` (%):
  ``window_utilization`` (% of codes hit in the last ``usage_window`` training forwards, this one included) and
  ``dead_codes`` (codes with ``usage < T`` when ``dead_code_threshold`` is on, i.e. those the next forward
  restarts; otherwise codes not hit in the window). The window is exact and O(codebook): buffer ``last_hit``
  holds the training-forward index at which each code was last hit (-1: never) and ``train_batches`` counts
  training forwards (micro-batches under gradient accumulation). Eval forwards report the batch stats only.

Under ``torch.distributed`` (initialised, world > 1) the per-code counts (and sums for ``ema_update``) of each
training forward are averaged over ranks before they update ``usage``, ``last_hit`` and the EMA, and restart
tokens come from rank 0, so every rank keeps the same codebook and buffers; ``usage`` is then in tokens per
per-rank batch. The batch ``perplexity``/``utilization`` stay rank-local.

Buffers exist only when their feature is on (``last_hit``/``train_batches`` always), so the state dict follows
the options; all of them are saved and restored with it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from xqgan_core import at_least, between, config, option, positive
from xqgan_core.distributed import rank, world_size
from xqgan_core.interfaces import Indices, QuantOut, Quantizer
from xqgan_core.quant_ops import (
    autocast_disabled,
    codebook_usage,
    commitment_losses,
    flatten_tokens,
    nearest_code,
    straight_through,
    unflatten_tokens,
)

__all__ = ["VectorQuantizer", "kmeans"]


def _kmeans_pp_seeds(tokens: Tensor, num_codes: int) -> Tensor:
    """``num_codes`` rows of ``tokens`` drawn by k-means++ (each next seed with probability ~ squared distance to
    the nearest seed so far). One O(N * dim) matrix-vector pass per seed: no N x K matrix, no host sync.
    Uses the global torch RNG."""
    n = tokens.shape[0]
    sq = tokens.pow(2).sum(dim=1)
    picks = torch.empty(num_codes, dtype=torch.long, device=tokens.device)

    def sq_dist_to(i: Tensor) -> Tensor:  # ||x||^2 - 2 x.c + ||c||^2, as one addmv (fast on CPU and GPU)
        return torch.addmv(sq + sq[i], tokens, tokens[i].squeeze(0), alpha=-2).clamp_min_(0)

    picks[:1] = torch.randint(n, (1,), device=tokens.device)
    d2 = sq_dist_to(picks[:1])
    for i in range(1, num_codes):
        # inverse-CDF draw (much faster than torch.multinomial on CPU); right=True skips zero-weight tokens, so a
        # taken seed (weight 0 up to rounding) is practically never drawn again while untaken tokens remain
        cdf = d2.cumsum(0)
        nxt = torch.searchsorted(cdf, torch.rand(1, device=tokens.device, dtype=cdf.dtype) * cdf[-1:], right=True)
        nxt = nxt.clamp_(max=n - 1)
        picks[i : i + 1] = nxt
        torch.minimum(d2, sq_dist_to(nxt), out=d2)
    return tokens[picks].clone()


@torch.no_grad()
def kmeans(tokens: Tensor, num_codes: int, iters: int, *, spherical: bool, chunk_size: int | None = None) -> Tensor:
    """k-means of ``tokens (N, dim)`` into ``num_codes`` centres ``(num_codes, dim)``: k-means++ seeding then
    ``iters`` Lloyd iterations with the chunked ``nearest_code`` assignment. ``spherical``: tokens are unit
    vectors, similarity is the cosine and centres are normalised means. A centre that gets no token keeps its
    position. Needs ``N >= 1``; with fewer distinct tokens than codes some centres coincide."""
    if tokens.ndim != 2 or tokens.shape[0] == 0:
        raise ValueError(f"kmeans needs (N >= 1, dim) tokens, got {tuple(tokens.shape)}")
    centres = _kmeans_pp_seeds(tokens, num_codes)
    for _ in range(iters):
        assign = nearest_code(tokens, centres, chunk_size, normalized=spherical)
        counts = torch.bincount(assign, minlength=num_codes)
        sums = torch.zeros_like(centres).index_add_(0, assign, tokens)
        means = F.normalize(sums, dim=1) if spherical else sums / counts.clamp_min(1).unsqueeze(1).to(sums.dtype)
        centres = torch.where((counts > 0).unsqueeze(1), means, centres)
    return centres


class VectorQuantizer(Quantizer):
    """``forward(z (B, dim, H, W)) -> QuantOut(z_q, indices (B, H, W) int64, losses, stats)``."""

    plugin_api = 1
    # usage-window statistics: only the window utilization stat depends on them, so checkpoints without them load
    optional_state_keys = ("last_hit", "train_batches")

    @config
    class Config:
        codebook_size: int = option(4096, help="number of codebook entries", validator=positive())
        dim: int = option(8, help="code dimension = channels of the latent fed to the quantizer (8-64 typical)", validator=positive())
        beta: float = option(0.25, help="commitment loss weight: beta * mean((sg z_q - z)^2)", validator=at_least(0.0))
        l2_norm: bool = option(
            True, help="l2-normalise tokens and codebook rows; nearest code by cosine, codes on the unit sphere"
        )
        chunk_size: int = option(
            0,
            help="tokens scored against the codebook at once; bounds the distance buffer to chunk_size x codebook_size. "
            "0 = automatic: an 8 MiB block on CPU (cache-sized, ~2.8x faster than one large block), 1 GiB elsewhere",
            validator=at_least(0),
        )
        init_scale: float | None = option(
            None,
            help="codebook init U(-init_scale, init_scale); unset = 1/codebook_size. Rows are then l2-normalised "
            "if l2_norm, so the scale only matters without it",
            validator=positive(),
        )
        kmeans_init: int = option(
            0,
            help="k-means iterations for a data-dependent codebook init on the first training forward(s) "
            "(k-means++ seeding; spherical with l2_norm); 0 = off. Done once: buffer 'initialised' is saved",
            validator=at_least(0),
        )
        kmeans_batches: int = option(
            1,
            help="with kmeans_init: training batches whose tokens are gathered before the init (more are gathered "
            "until there are at least codebook_size tokens); the codebook quantizes unchanged meanwhile",
            validator=at_least(1),
        )
        dead_code_threshold: float = option(
            0.0,
            help="restart codes whose EMA usage (tokens per training batch) falls below this, from random tokens "
            "of the incoming batch; 0 = off. Usage starts at, and restarted codes reset to, the threshold",
            validator=at_least(0.0),
        )
        usage_decay: float = option(
            0.99, help="decay of the per-code usage EMA used by dead_code_threshold", validator=between(0.0, 1.0)
        )
        ema_update: bool = option(
            False,
            help="learn the codebook by EMA of the mean of the tokens assigned to each code (no gradient, no "
            "'codebook' loss; commitment stays) instead of by the codebook loss",
        )
        ema_decay: float = option(0.99, help="decay of the codebook EMA (ema_update)", validator=between(0.0, 1.0))
        eps: float = option(1e-5, help="Laplace smoothing of the EMA code counts (ema_update)", validator=positive())
        usage_window: int = option(
            100,
            help="training forwards over which stat 'window_utilization' (and, without dead_code_threshold, "
            "'dead_codes') counts a code as used",
            validator=positive(),
        )

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.dim = config.dim
        self.codebook_size = config.codebook_size
        self.embedding = nn.Embedding(config.codebook_size, config.dim)
        scale = config.init_scale if config.init_scale is not None else 1.0 / config.codebook_size
        with torch.no_grad():
            self.embedding.weight.uniform_(-scale, scale)
            if config.l2_norm:
                self.embedding.weight.copy_(F.normalize(self.embedding.weight, dim=1))
        k = config.codebook_size
        # sliding-window usage, always on: O(codebook) and exact (see the module docstring)
        self.last_hit: Tensor
        self.train_batches: Tensor
        self.register_buffer("last_hit", torch.full((k,), -1, dtype=torch.long))
        self.register_buffer("train_batches", torch.zeros((), dtype=torch.long))
        if config.kmeans_init > 0:
            self.initialised: Tensor
            self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))
        self._kmeans_tokens: list[Tensor] = []  # gathered for the init; deliberately not part of the state
        self._known_initialised = False  # a host copy of `initialised` once it is True (see _is_initialised)
        if config.dead_code_threshold > 0:
            self.usage: Tensor
            self.register_buffer("usage", torch.full((k,), float(config.dead_code_threshold)))
        if config.ema_update:
            self.embedding.weight.requires_grad_(False)
            self.ema_count: Tensor
            self.ema_sum: Tensor
            self.register_buffer("ema_count", torch.ones(k))
            self.register_buffer("ema_sum", self.embedding.weight.detach().float().clone())

    def codebook(self) -> Tensor:
        """The effective codes ``(codebook_size, dim)`` in at least fp32 (normalised rows when ``l2_norm``)."""
        weight = self.embedding.weight
        weight = weight.to(torch.promote_types(weight.dtype, torch.float32))
        return F.normalize(weight, dim=1) if self.config.l2_norm else weight

    def _tokens(self, z: Tensor) -> Tensor:
        """``(B, dim, H, W)`` -> flat ``(B*H*W, dim)`` tokens in >= fp32, normalised when ``l2_norm``."""
        if z.ndim != 4 or z.shape[1] != self.dim:
            raise ValueError(f"vq expects latents of shape (B, {self.dim}, H, W), got {tuple(z.shape)}")
        flat = flatten_tokens(z)
        flat = flat.to(torch.promote_types(flat.dtype, torch.float32))
        return F.normalize(flat, dim=1) if self.config.l2_norm else flat

    def forward(self, z: Tensor) -> QuantOut:
        # Everything below runs in >= fp32 with autocast off: under bf16 autocast the nearest-code search and the
        # losses would otherwise lose precision. Only z_q is cast back to the input dtype.
        with autocast_disabled(z.device):
            flat = self._tokens(z)
            b, _, h, w = z.shape
            restarted = self._before_lookup(flat.detach()) if self.training else None
            codebook = self.codebook()
            if self.config.ema_update:
                codebook = codebook.detach()  # learned by EMA only; also keeps the in-place update below safe
            idx = self._nearest(flat, codebook)
            z_f = unflatten_tokens(flat, (b, h, w))
            codes = unflatten_tokens(codebook[idx], (b, h, w))  # carries the gradient to the codebook
            losses = commitment_losses(z_f, codes, self.config.beta)
            if self.config.ema_update:
                del losses["codebook"]
            # with l2_norm the gradient reaches z through the normalisation (as in the reference)
            z_q = straight_through(z_f, codes).to(z.dtype)
            indices = idx.view(b, h, w)
            stats = codebook_usage(indices, self.codebook_size)
            if self.training:
                stats.update(self._after_lookup(flat.detach(), idx, restarted))
        return QuantOut(z_q=z_q, indices=indices, losses=losses, stats=stats)

    # -- codebook health (training only) ----------------------------------------------------------------------
    @torch.no_grad()
    def _before_lookup(self, tokens: Tensor) -> Tensor | None:
        """k-means init while pending, else dead-code restarts. Returns the number of restarted codes (0-d tensor),
        None when restarts are off."""
        if self.config.kmeans_init > 0 and not self._is_initialised():
            self._kmeans_gather(tokens)
            return tokens.new_zeros(()) if self.config.dead_code_threshold > 0 else None
        if self.config.dead_code_threshold > 0:
            return self._restart_dead_codes(tokens)
        return None

    def _is_initialised(self) -> bool:
        # reading the buffer waits for the device: read it until it says True, then remember (reset on loading)
        if not self._known_initialised:
            self._known_initialised = bool(self.initialised)
        return self._known_initialised

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._known_initialised = False  # the loaded buffer decides again
        super()._load_from_state_dict(*args, **kwargs)

    def _kmeans_gather(self, tokens: Tensor) -> None:
        c = self.config
        self._kmeans_tokens.append(tokens.clone())  # may be a view of the caller's latents
        gathered = sum(t.shape[0] for t in self._kmeans_tokens)
        ready = len(self._kmeans_tokens) >= c.kmeans_batches and gathered >= self.codebook_size
        distributed = world_size() > 1
        if distributed:  # rank 0 decides, so that every rank enters the broadcast below together
            flag = torch.tensor([int(ready)], device=tokens.device)
            dist.broadcast(flag, src=0)
            ready = bool(flag.item())
        if not ready:
            return
        data = torch.cat(self._kmeans_tokens)
        self._kmeans_tokens.clear()
        if rank() == 0:
            centres = kmeans(data, self.codebook_size, c.kmeans_init, spherical=c.l2_norm, chunk_size=c.chunk_size or None)
        else:
            centres = torch.empty(self.codebook_size, self.dim, dtype=data.dtype, device=data.device)
        if distributed:
            dist.broadcast(centres, src=0)
        # `.data`: a shared codebook (rq shared_codebook, msrq) may already sit in this step's graph; a tracked
        # in-place write would make its backward fail. Only the re-initialised rows' gradients see the new values.
        self.embedding.weight.data.copy_(centres)
        if c.ema_update:
            self.ema_sum.copy_(centres * self.ema_count.unsqueeze(1))
        if c.dead_code_threshold > 0:
            self.usage.fill_(c.dead_code_threshold)  # usage of the replaced codebook says nothing about these
        self.initialised.fill_(True)

    def _restart_dead_codes(self, tokens: Tensor) -> Tensor:
        c = self.config
        dead = self.usage < c.dead_code_threshold
        count = dead.sum()
        # the restart's shapes depend on the count: the one host sync of this option (the same on every rank, since
        # usage is updated from rank-averaged counts)
        n_dead = int(count)
        if n_dead == 0:
            return count.float()
        n = tokens.shape[0]
        if n == 0:  # nothing to restart from: keep the rows (still reset usage so they get another chance)
            rows = self.embedding.weight[dead].to(tokens.dtype)
        elif n_dead <= n:  # distinct tokens, so restarted codes do not duplicate each other
            rows = tokens[torch.randperm(n, device=tokens.device)[:n_dead]]
        else:
            rows = tokens[torch.randint(n, (n_dead,), device=tokens.device)]
        if world_size() > 1:
            rows = rows.contiguous()
            dist.broadcast(rows, src=0)
        self.embedding.weight.data[dead] = rows.to(self.embedding.weight.dtype)  # untracked: see _kmeans_gather
        self.usage[dead] = c.dead_code_threshold
        if c.ema_update:
            self.ema_count[dead] = c.dead_code_threshold
            self.ema_sum[dead] = rows.to(self.ema_sum.dtype) * c.dead_code_threshold
        return count.float()

    @torch.no_grad()
    def _after_lookup(self, tokens: Tensor, idx: Tensor, restarted: Tensor | None) -> dict[str, Tensor]:
        """Update usage, window and EMA codebook from this batch's assignment; return the health stats (0-d
        tensors, no host sync)."""
        c, k = self.config, self.codebook_size
        counts = torch.zeros(k, device=idx.device).index_add_(0, idx, torch.ones_like(idx, dtype=torch.float32))
        sums = None
        if c.ema_update:
            sums = torch.zeros(k, self.dim, device=tokens.device).index_add_(0, idx, tokens.float())
        world = world_size()
        if world > 1:  # one collective for counts and sums: every rank applies the same update
            packed = counts.unsqueeze(1) if sums is None else torch.cat([counts.unsqueeze(1), sums], dim=1)
            dist.all_reduce(packed)
            packed /= world
            counts = packed[:, 0].contiguous()
            sums = None if sums is None else packed[:, 1:]
        step = self.train_batches.clone()
        self.last_hit.masked_fill_(counts > 0, step)
        self.train_batches += 1
        if c.dead_code_threshold > 0:
            self.usage.lerp_(counts, 1.0 - c.usage_decay)
        if sums is not None:
            self.ema_count.lerp_(counts, 1.0 - c.ema_decay)
            self.ema_sum.lerp_(sums, 1.0 - c.ema_decay)
            total = self.ema_count.sum()
            smoothed = (self.ema_count + c.eps) / (total + k * c.eps) * total
            new = self.ema_sum / smoothed.unsqueeze(1)
            self.embedding.weight.copy_(F.normalize(new, dim=1) if c.l2_norm else new)
        in_window = (self.last_hit >= 0) & (self.last_hit > step - c.usage_window)
        used = in_window.sum().float()
        stats = {"window_utilization": used * (100.0 / k)}
        if c.dead_code_threshold > 0:
            stats["dead_codes"] = (self.usage < c.dead_code_threshold).sum().float()
            stats["restarted"] = restarted if restarted is not None else used.new_zeros(())
        else:
            stats["dead_codes"] = k - used
        return stats

    def _nearest(self, flat: Tensor, codebook: Tensor) -> Tensor:
        """Nearest-code search with this quantizer's metric and block size (chunk_size 0 = automatic)."""
        return nearest_code(flat, codebook, self.config.chunk_size or None, normalized=self.config.l2_norm)

    # -- index <-> code ---------------------------------------------------------------------------------------
    def codebook_rows(self) -> Tensor:
        return self.embedding.weight

    def indices_to_codes(self, indices: Indices) -> Tensor:
        """``(B, H, W)`` indices -> ``(B, dim, H, W)`` codes (normalised rows when ``l2_norm``), in >= fp32."""
        if not isinstance(indices, Tensor) or indices.ndim != 3:
            raise ValueError("vq expects indices as one (B, H, W) tensor")
        return F.embedding(indices.long(), self.codebook()).permute(0, 3, 1, 2)

    def codes_to_indices(self, z: Tensor) -> Indices:
        """Nearest-code lookup only: no losses, no statistics, and no codebook updates even in training mode."""
        with torch.no_grad(), autocast_disabled(z.device):
            flat = self._tokens(z)
            idx = self._nearest(flat, self.codebook())
        return idx.view(z.shape[0], z.shape[2], z.shape[3])

    def extra_repr(self) -> str:
        c = self.config
        parts = [f"codebook_size={c.codebook_size}, dim={c.dim}, beta={c.beta}, l2_norm={c.l2_norm}"]
        if c.kmeans_init:
            parts.append(f"kmeans_init={c.kmeans_init}")
        if c.dead_code_threshold:
            parts.append(f"dead_code_threshold={c.dead_code_threshold}")
        if c.ema_update:
            parts.append(f"ema_update=True, ema_decay={c.ema_decay}")
        return ", ".join(parts)
