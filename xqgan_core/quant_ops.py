"""Building blocks shared by quantizer plugins (VQ, RQ, PQ, LFQ, BSQ, multi-scale RQ).

Conventions:

* latents are ``(B, C, H, W)``; lookups work on flat tokens ``(B*H*W, C)`` (``flatten_tokens`` / ``unflatten_tokens``);
* nearest-code search runs in at least fp32 with autocast switched off, and never holds more than
  ``chunk_size x codebook_size`` scores at once, so codebooks of 16k+ entries fit at large batch sizes;
* losses are returned unweighted by the engine: the quantizer applies its own coefficients (``beta``).

Importing this module imports torch.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor

from .config import at_least, between, config, option

__all__ = [
    "LevelDropout",
    "flatten_scales",
    "token_count",
    "unflatten_scales",
    "autocast_disabled",
    "draw_levels",
    "level_mask",
    "mean_losses",
    "nested_stats",
    "codebook_usage",
    "commitment_losses",
    "flatten_tokens",
    "nearest_code",
    "straight_through",
    "unflatten_tokens",
]


def autocast_disabled(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """A region where autocast is off on ``device`` (distances and losses want full precision)."""
    is_available = getattr(torch.amp, "is_autocast_available", None)
    if is_available is not None and not is_available(device.type):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, enabled=False)


def straight_through(z: Tensor, z_q: Tensor) -> Tensor:
    """``z_q`` in the forward pass, identity gradient to ``z`` in the backward pass (``z + sg(z_q - z)``).

    The result has ``z``'s dtype and carries no gradient to ``z_q`` (the codebook learns through its own loss).
    When no gradient to ``z`` is being recorded, ``z_q`` itself is returned (detached), so inference codes are
    bit-exact codebook rows rather than ``z + (z_q - z)`` with its rounding error.
    """
    z_q = z_q.to(z.dtype)
    if not (torch.is_grad_enabled() and z.requires_grad):
        return z_q.detach()
    return z + (z_q - z).detach()


def flatten_tokens(z: Tensor) -> Tensor:
    """``(B, C, H, W) -> (B*H*W, C)``: one row per spatial position, in (b, h, w) row-major order."""
    if z.ndim != 4:
        raise ValueError(f"expected latents of shape (B, C, H, W), got {tuple(z.shape)}")
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])


def unflatten_tokens(flat: Tensor, spatial: tuple[int, int, int] | torch.Size) -> Tensor:
    """Inverse of ``flatten_tokens``: ``(B*H*W, C) -> (B, C, H, W)`` given ``spatial = (B, H, W)``.

    ``spatial`` is the shape of the matching index map, so ``unflatten_tokens(codes, indices.shape)`` works.
    """
    b, h, w = spatial
    if flat.ndim != 2 or flat.shape[0] != b * h * w:
        raise ValueError(f"cannot unflatten tokens of shape {tuple(flat.shape)} to (B, H, W) = {(b, h, w)}")
    return flat.reshape(b, h, w, flat.shape[1]).permute(0, 3, 1, 2)


#: score-block budgets for ``auto_chunk_size``. On CPU a block that stays in the last-level cache is ~2.8x faster
#: than one that streams through memory (16k codes, 2 cores: 60 ms at 256 rows = 16 MiB, 170 ms at 512+ rows);
#: accelerators want few, large launches instead.
CPU_SCORE_BYTES = 8 * 2**20
ACCELERATOR_SCORE_BYTES = 2**30


def auto_chunk_size(codebook_size: int, device: torch.device) -> int:
    """Tokens per score block for ``nearest_code``: the block ``rows x codebook_size`` fp32 fits the device budget."""
    budget = CPU_SCORE_BYTES if device.type == "cpu" else ACCELERATOR_SCORE_BYTES
    return max(16, budget // (4 * codebook_size))


def nearest_code(
    z_flat: Tensor, codebook: Tensor, chunk_size: int | None = None, *, normalized: bool = False
) -> Tensor:
    """Index of the codebook row nearest (squared L2) to each row of ``z_flat``: ``(N, C), (V, C) -> (N,)`` int64.

    Tokens are scored ``chunk_size`` at a time (None: ``auto_chunk_size``), so at most a ``chunk_size x V`` score
    matrix exists at any moment.
    ``||z - e||^2 = ||z||^2 - 2 z.e + ||e||^2`` and ``||z||^2`` does not change the argmin, so each chunk needs one
    matmul. With ``normalized=True`` (both sides already l2-normalised) ``||e||^2`` is 1 for every row and the
    search is the argmax of the dot product (cosine), which skips adding a rounding-noisy constant.
    Ties resolve to the lowest index. Scores are computed in at least fp32 with autocast off; no gradient.
    """
    if z_flat.ndim != 2 or codebook.ndim != 2 or z_flat.shape[1] != codebook.shape[1]:
        raise ValueError(f"expected (N, C) tokens and a (V, C) codebook, got {tuple(z_flat.shape)} and {tuple(codebook.shape)}")
    if chunk_size is None:
        chunk_size = auto_chunk_size(codebook.shape[0], z_flat.device)
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    dtype = torch.promote_types(torch.promote_types(z_flat.dtype, codebook.dtype), torch.float32)
    out = torch.empty(z_flat.shape[0], dtype=torch.int64, device=z_flat.device)
    with torch.no_grad(), autocast_disabled(z_flat.device):
        tokens = z_flat.detach().to(dtype)
        codes = codebook.detach().to(dtype)
        codes_t = codes.t()
        sq_norms = None if normalized else codes.pow(2).sum(dim=1)
        for start in range(0, tokens.shape[0], chunk_size):
            chunk = tokens[start : start + chunk_size]
            if sq_norms is None:
                out[start : start + chunk_size] = torch.mm(chunk, codes_t).argmax(dim=1)
            else:
                # ||e||^2 - 2 z.e in one fused matmul: the (chunk, V) result is the only large allocation
                out[start : start + chunk_size] = torch.addmm(sq_norms, chunk, codes_t, alpha=-2).argmin(dim=1)
    return out


#: codebooks up to this size are counted with one dense histogram; larger ones (2^36-code LFQ) by sorting the indices
DENSE_USAGE_MAX = 2**20


def codebook_usage(indices: Tensor, codebook_size: int) -> dict[str, Tensor]:
    """Usage of a codebook by one batch of indices (any shape, values in ``[0, codebook_size)``).

    ``perplexity``: exp of the entropy of the code histogram (1 = one code used, ``codebook_size`` = uniform);
    ``utilization``: % of the codebook's entries hit at least once (0-100, as in evaluation). Both are batch-local
    (no all-reduce), 0 for an empty batch, and detached fp32 0-d tensors on the indices' device: nothing here waits
    for the device (no ``.item()``), so a quantizer's forward stays free of host syncs. Memory is
    O(codebook_size) up to ``DENSE_USAGE_MAX`` entries, O(tokens) above. An index outside ``[0, codebook_size)``
    is refused (ValueError on CPU; checking values up front would cost a sync).
    """
    flat = indices.detach().reshape(-1).long()
    if flat.numel() == 0:
        zero = torch.zeros((), device=flat.device)
        return {"perplexity": zero, "utilization": zero.clone()}
    if codebook_size <= DENSE_USAGE_MAX:
        try:  # an index outside the codebook raises on CPU (a device-side assert on CUDA)
            counts = torch.zeros(codebook_size, device=flat.device).index_add_(0, flat, torch.ones_like(flat, dtype=torch.float32))
        except IndexError:
            raise ValueError(f"an index is out of range for a codebook of {codebook_size} entries") from None
    else:
        counts = _sorted_run_lengths(flat)
    total = counts.sum()
    probs = counts / total
    entropy = -(probs * probs.clamp_min(torch.finfo(probs.dtype).tiny).log()).sum()  # 0 log 0 = 0
    return {
        "perplexity": entropy.exp(),
        "utilization": (counts > 0).sum().float() * (100.0 / codebook_size),
    }


def _sorted_run_lengths(flat: Tensor) -> Tensor:
    """How often each distinct value of ``flat`` occurs, in a tensor of ``flat``'s length padded with zeros: static
    shapes only (no ``unique``, whose output size needs a host sync)."""
    values = flat.sort().values
    starts = torch.ones_like(values, dtype=torch.bool)
    starts[1:] = values[1:] != values[:-1]
    run = starts.long().cumsum(0) - 1  # the run (distinct value) each element belongs to
    return torch.zeros(values.numel(), device=flat.device).index_add_(0, run, torch.ones_like(run, dtype=torch.float32))


def commitment_losses(z: Tensor, z_q: Tensor, beta: float) -> dict[str, Tensor]:
    """The VQ-VAE pair of losses, as fp32 scalars.

    ``codebook``: ``mean((z_q - sg z)^2)`` moves the codes towards the encoder outputs;
    ``commitment``: ``beta * mean((sg z_q - z)^2)`` keeps the encoder outputs near their codes.
    """
    z32, zq32 = z.float(), z_q.float()
    return {
        "codebook": (zq32 - z32.detach()).pow(2).mean(),
        "commitment": beta * (zq32.detach() - z32).pow(2).mean(),
    }


# ----------------------------------------------------------------------------------------------------------------
# Quantizer dropout and loss averaging, shared by residual (rq), multi-scale (msrq) and product (pq) quantizers


@config
class LevelDropout:
    """Quantizer dropout: in training, a fraction of samples keeps only the first n levels (scales)."""

    rate: float = option(0.0, help="Fraction of training samples that keep a random prefix of the levels (paper: 0.1).",
                         validator=between(0, 1))
    min_levels: int = option(1, help="Fewest levels a dropped sample keeps; n ~ U{min_levels..levels} (paper: 3).",
                             validator=at_least(1))


def draw_levels(batch: int, num_levels: int, dropout: LevelDropout, training: bool, device: torch.device) -> Tensor:
    """How many levels each sample keeps, shape (B,) int64: all of them, except that in training a random
    ``rate`` fraction of samples keeps ``n ~ U{min_levels..num_levels}``. Product branches share one draw."""
    kept = torch.full((batch,), num_levels, dtype=torch.long, device=device)
    if not training or dropout.rate <= 0 or num_levels <= 1:
        return kept
    lo = min(dropout.min_levels, num_levels)
    dropped = torch.rand(batch, device=device) < dropout.rate
    n = torch.randint(lo, num_levels + 1, (batch,), device=device)
    return torch.where(dropped, n, kept)


def level_mask(levels: Tensor, level: int, like: Tensor) -> Tensor:
    """(B, 1, 1, 1) mask in ``like``'s dtype: 1 where the sample keeps level ``level`` (0-based), else 0."""
    return (levels > level).to(like.dtype).view(-1, *([1] * (like.ndim - 1)))


def mean_losses(parts: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Average same-named losses over levels or branches (a name missing from a part counts as absent there)."""
    names: dict[str, list[Tensor]] = {}
    for part in parts:
        for name, value in part.items():
            names.setdefault(name, []).append(value)
    return {name: torch.stack(values).mean() for name, values in names.items()}


def nested_stats(parts: list[dict[str, Any]], prefix: str) -> dict[str, Any]:
    """Part i's stats under ``{prefix}{i}/``, plus the mean over parts of each top-level numeric stat.

    The means stay tensors (0-d, detached) when the parts' stats are: no host sync."""
    out: dict[str, Any] = {}
    values: dict[str, list[Any]] = {}
    for i, part in enumerate(parts):
        for key, value in part.items():
            out[f"{prefix}{i}/{key}"] = value
            if "/" not in key and _is_scalar(value):
                values.setdefault(key, []).append(value.detach().reshape(()) if isinstance(value, Tensor) else value)
    return {**{key: sum(v) / len(v) for key, v in values.items()}, **out}


def _is_scalar(value: Any) -> bool:
    if isinstance(value, Tensor):
        return value.numel() == 1
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ----------------------------------------------------------------------------------------------------------------
# Per-scale index maps <-> one flat token sequence (the layout a next-scale / VAR generator reads).
# A multi-scale quantizer returns one (B, *extra, s, s) map per scale, coarse to fine (extra = (P,) when product
# branches are stacked after the batch); the sequence concatenates them scale after scale, each row-major.

from collections.abc import Sequence  # noqa: E402


def token_count(scales: Sequence[int]) -> int:
    """Length of the token sequence of a multi-scale index list: ``sum(s^2)`` (286 for the paper's 10 scales)."""
    return sum(int(s) * int(s) for s in scales)


def flatten_scales(indices: Sequence[Tensor]) -> Tensor:
    """``[(B, *extra, s_k, s_k)] -> (B, *extra, sum s_k^2)``, scale after scale, each map row-major."""
    if not isinstance(indices, (list, tuple)) or not indices:
        raise ValueError("expected a non-empty list of per-scale index maps (B, ..., s, s)")
    lead = indices[0].shape[:-2]
    for k, idx in enumerate(indices):
        if idx.ndim < 3 or idx.shape[-1] != idx.shape[-2] or idx.shape[:-2] != lead:
            raise ValueError(
                f"index map {k} has shape {tuple(idx.shape)}; every map must be (B, ..., s, s) with the same "
                f"leading dims {tuple(lead)}"
            )
    return torch.cat([idx.flatten(start_dim=-2) for idx in indices], dim=-1)


def unflatten_scales(tokens: Tensor, scales: Sequence[int]) -> list[Tensor]:
    """Inverse of ``flatten_scales``: ``(B, *extra, sum s_k^2) -> [(B, *extra, s_k, s_k)]`` (views of ``tokens``)."""
    expected = token_count(scales)
    if tokens.ndim < 2 or tokens.shape[-1] != expected:
        raise ValueError(
            f"expected a token sequence (B, ..., {expected}) for scales {tuple(scales)}, got {tuple(tokens.shape)}"
        )
    parts = torch.split(tokens, [s * s for s in scales], dim=-1)
    return [part.unflatten(-1, (s, s)) for part, s in zip(parts, scales)]
