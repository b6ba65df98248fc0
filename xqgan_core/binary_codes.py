"""Binary codes shared by the lookup-free (LFQ, XQ-GAN Sec. 4.4) and binary spherical (BSQ, Sec. 4.5) quantizers.

A code of ``n`` bits is a vector in ``{-s, +s}^n``: ``s = 1`` for LFQ, ``s = 1/sqrt(n)`` for BSQ (which l2-normalises
its input first, so codes lie on the unit sphere). The implicit codebook has ``2^n`` entries and is never stored.

Index convention: ``index = sum_i bit_i * 2^i`` where ``bit_i = 1`` iff component ``i`` is strictly positive
(component 0 is the least significant bit; a component of exactly 0 counts as bit 0). Indices are int64, so up to
``MAX_BITS = 62`` bits are supported (the sum stays positive and exact).

Entropy loss (MAGVIT-v2 / BSQ-ViT style), computed without materialising the ``2^n`` codes
------------------------------------------------------------------------------------------------------
Soft assignment of a token ``z`` to the codes: ``p(c | z) = softmax_c(-||z - c||^2 / T)`` over all ``c`` in
``{-s, s}^n`` (``T`` = temperature). Since ``||z - c||^2 = ||z||^2 - 2 z.c + n s^2`` only ``2 z.c / T`` varies with
``c``, so the softmax factorises exactly over the bits::

    p(c | z) = prod_i p_i(c_i),   p_i(bit_i = 1) = sigmoid(a_i),   a_i = 4 s z_i / T     ("bit logits")

and the softmax over any group of bits' ``2^g`` sub-codes equals the marginal of the full softmax on that group.

* per-sample entropy ``H_sample = mean_tokens H(p(. | z))`` is therefore *exact* as ``mean_tokens sum_i H_b(sigmoid(a_i))``
  (``H_b`` the binary entropy), whatever the grouping;
* codebook entropy ``H_codebook = H(mean_tokens p(. | z))`` does not factorise (an average of product distributions
  is a mixture). With ``group_size = g`` the bits are split into consecutive groups of ``g`` (the last one may be
  smaller) and ``H_codebook ~= sum_groups H(mean_tokens p(c_group | z))``, each over the group's ``2^g`` joint codes.
  By subadditivity this is >= the exact value, with equality when the groups are independent under the
  batch-averaged distribution; ``g = 1`` is BSQ-ViT's per-bit approximation (and the XQ-GAN reference's "soft"
  entropy), ``g = n`` is exact. Memory: ``tokens x ceil(n/g) x 2^g`` floats.

``entropy loss = sample_weight * H_sample - codebook_weight * H_codebook`` (nats): low per-sample entropy makes each
token confident, high codebook entropy spreads tokens over the codes. Under DDP the codebook term is taken over the
global batch by default (``sync_codebook_entropy``; a per-rank batch of a few images sees too few tokens to judge
how evenly 2^n codes are used), the per-sample term over the local tokens.

``BinaryQuantizer`` is the ``Quantizer`` both plugins subclass; they differ only in ``spherical``. Importing this
module imports torch.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import at_least, between, config, option, positive
from .distributed import mean_over_ranks
from .interfaces import Indices, QuantOut, Quantizer
from .quant_ops import DENSE_USAGE_MAX, autocast_disabled, codebook_usage, flatten_tokens, straight_through

__all__ = [
    "MAX_BITS",
    "MAX_GROUP_SIZE",
    "BINCOUNT_MAX_BITS",
    "BinaryQuantizer",
    "BinaryQuantizerOptions",
    "EntropyTerms",
    "binary_usage",
    "bit_logits",
    "bits_to_indices",
    "entropy_loss",
    "entropy_terms",
    "indices_to_bits",
    "indices_to_signs",
    "sign_codes",
    "sign_quantize",
    "signs_to_indices",
]

#: int64 indices: ``2^62`` still fits with room to spare, so sums of ``bit_i * 2^i`` never overflow.
MAX_BITS = 62
#: the codebook entropy of one group holds ``tokens x 2^group_size`` probabilities; 12 bits = 4096 per token.
MAX_GROUP_SIZE = 12
#: above this many bits, usage stats count the codes present (O(tokens)) instead of a ``2^bits`` histogram
#: (derived from ``quant_ops.DENSE_USAGE_MAX``, which decides it).
BINCOUNT_MAX_BITS = DENSE_USAGE_MAX.bit_length() - 1


def _check_bits(num_bits: int) -> None:
    if not 1 <= num_bits <= MAX_BITS:
        raise ValueError(f"number of bits must be between 1 and {MAX_BITS} (int64 indices), got {num_bits}")


def _powers(num_bits: int, device: torch.device) -> Tensor:
    return torch.ones((), dtype=torch.int64, device=device) << torch.arange(num_bits, dtype=torch.int64, device=device)


# ----------------------------------------------------------------------------------------------------------------
# bits <-> indices


def bits_to_indices(bits: Tensor) -> Tensor:
    """``(..., n)`` bits (bool, or 0/1 integers) -> ``(...)`` int64 indices ``sum_i bit_i * 2^i``."""
    _check_bits(bits.shape[-1])
    return (bits.to(torch.int64) * _powers(bits.shape[-1], bits.device)).sum(dim=-1)


def signs_to_indices(codes: Tensor) -> Tensor:
    """``(..., n)`` real vectors -> ``(...)`` int64 indices, bit ``i`` set iff component ``i`` is > 0."""
    return bits_to_indices(codes.detach() > 0)


def indices_to_bits(indices: Tensor, num_bits: int) -> Tensor:
    """``(...)`` integer indices in ``[0, 2^num_bits)`` -> ``(..., num_bits)`` bool, least significant bit first."""
    _check_bits(num_bits)
    shifts = torch.arange(num_bits, dtype=torch.int64, device=indices.device)
    return ((indices.to(torch.int64).unsqueeze(-1) >> shifts) & 1).bool()


def indices_to_signs(
    indices: Tensor, num_bits: int, scale: float = 1.0, dtype: torch.dtype = torch.float32
) -> Tensor:
    """``(...)`` indices -> ``(..., num_bits)`` codes in ``{-scale, +scale}`` (the inverse of ``signs_to_indices``)."""
    bits = indices_to_bits(indices, num_bits)
    pos = torch.tensor(scale, dtype=dtype, device=indices.device)
    return torch.where(bits, pos, -pos)


def sign_codes(z: Tensor, scale: float = 1.0) -> Tensor:
    """``+scale`` where ``z > 0`` else ``-scale`` (no gradient), in ``z``'s dtype."""
    pos = torch.tensor(scale, dtype=z.dtype, device=z.device)
    return torch.where(z.detach() > 0, pos, -pos)


def sign_quantize(z: Tensor, scale: float = 1.0) -> Tensor:
    """``sign_codes(z, scale)`` with an identity (straight-through) gradient to ``z``.

    Without a recorded gradient the exact codes are returned (see ``quant_ops.straight_through``).
    """
    return straight_through(z, sign_codes(z, scale))


# ----------------------------------------------------------------------------------------------------------------
# Entropy loss


class EntropyTerms(NamedTuple):
    """``sample``: mean per-token entropy (exact); ``codebook``: entropy of the batch-averaged assignment
    (grouped approximation, exact when ``group_size >= bits``). Both fp32 scalars in nats."""

    sample: Tensor
    codebook: Tensor


def bit_logits(z: Tensor, scale: float, temperature: float) -> Tensor:
    """``a_i = 4 * scale * z_i / temperature = log p(bit_i = 1 | z) / p(bit_i = 0 | z)`` under
    ``p(c | z) = softmax_c(-||z - c||^2 / temperature)`` over ``c`` in ``{-scale, scale}^n`` (see module doc)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return z * (4.0 * scale / temperature)


def _group_codebook_entropy(logits: Tensor, across_ranks: bool = False) -> Tensor:
    """``(N, G, g)`` bit logits -> sum over the G groups of the entropy of the token-averaged ``2^g`` joint
    (averaged over the tokens of every rank with ``across_ranks``: a collective, see ``mean_over_ranks``)."""
    g = logits.shape[-1]
    signs = indices_to_signs(torch.arange(2**g, device=logits.device), g, dtype=logits.dtype)  # (2^g, g)
    # log p(c) = sum_i c_i a_i / 2 + const: the half-logit pairs +a/2 with bit 1 and -a/2 with bit 0
    probs = torch.softmax(torch.matmul(logits, signs.t()) * 0.5, dim=-1).mean(dim=0)  # (G, 2^g)
    if across_ranks:
        probs = mean_over_ranks(probs)
    return -(probs * probs.clamp_min(torch.finfo(probs.dtype).tiny).log()).sum()


def entropy_terms(
    z: Tensor, *, scale: float, temperature: float, group_size: int, across_ranks: bool = False
) -> EntropyTerms:
    """Per-sample and codebook entropy of the soft assignment of the tokens ``z (..., n)`` to ``{-scale, scale}^n``.

    Never builds a ``2^n`` axis: memory is ``tokens x ceil(n / group_size) x 2^min(group_size, n)``.
    Runs in at least fp32. See the module docstring for the formulas. ``across_ranks``: under torch.distributed the
    codebook term uses the code distribution of the global batch (every rank must call this equally often and hold
    the same number of tokens); the per-sample term is a per-token mean and needs no collective.
    """
    n = z.shape[-1]
    _check_bits(n)
    if not 1 <= group_size <= MAX_GROUP_SIZE:
        raise ValueError(f"group_size must be between 1 and {MAX_GROUP_SIZE}, got {group_size}")
    flat = z.reshape(-1, n)
    flat = flat.to(torch.promote_types(flat.dtype, torch.float32))
    a = bit_logits(flat, scale, temperature)
    # H_b(sigmoid(a)) = p * softplus(-a) + (1 - p) * softplus(a): no log(0) for confident bits
    p = torch.sigmoid(a)
    sample = (p * F.softplus(-a) + (1 - p) * F.softplus(a)).sum(dim=-1).mean()

    g = min(group_size, n)
    full = (n // g) * g
    codebook = _group_codebook_entropy(a[:, :full].reshape(a.shape[0], n // g, g), across_ranks)
    if full < n:  # the remainder bits form one smaller group
        codebook = codebook + _group_codebook_entropy(a[:, full:].unsqueeze(1), across_ranks)
    return EntropyTerms(sample=sample, codebook=codebook)


def entropy_loss(
    z: Tensor,
    *,
    scale: float,
    temperature: float,
    group_size: int,
    sample_weight: float = 1.0,
    codebook_weight: float = 1.0,
) -> Tensor:
    """``sample_weight * H_sample - codebook_weight * H_codebook`` (fp32 scalar; see ``entropy_terms``)."""
    terms = entropy_terms(z, scale=scale, temperature=temperature, group_size=group_size)
    return sample_weight * terms.sample - codebook_weight * terms.codebook


# ----------------------------------------------------------------------------------------------------------------
# Usage statistics


def binary_usage(indices: Tensor, num_bits: int) -> dict[str, Tensor]:
    """``perplexity`` and ``utilization`` (% of the ``2^num_bits`` codes hit), batch-local: ``codebook_usage`` of the
    ``2^num_bits``-code codebook (detached 0-d tensors, no host sync). Above ``BINCOUNT_MAX_BITS`` bits the histogram
    is taken over the codes actually present (by sorting), so the cost stays O(tokens) for codebooks of 2^36 or more.
    """
    _check_bits(num_bits)
    return codebook_usage(indices, 2**num_bits)


# ----------------------------------------------------------------------------------------------------------------
# The quantizer both plugins build on


@config
class BinaryQuantizerOptions:
    """Options shared by ``lfq`` and ``bsq`` (each plugin's ``Config`` subclasses this)."""

    bits: int = option(
        14, help="bits per token: codebook_size = 2^bits and dim = bits (paper BSQ runs: 12/14; MAGVIT-v2: 18)",
        validator=between(1, MAX_BITS),
    )
    entropy_weight: float = option(
        0.1, help="weight of the whole entropy loss: entropy_weight * (sample term - codebook term)",
        validator=at_least(0.0),
    )
    sample_entropy_weight: float = option(
        1.0, help="weight of the mean per-token entropy (minimised: confident bits)", validator=at_least(0.0)
    )
    codebook_entropy_weight: float = option(
        1.0, help="weight of the entropy of the batch-averaged code distribution (maximised: all codes used)",
        validator=at_least(0.0),
    )
    commitment_weight: float = option(
        0.25, help="commitment loss weight: commitment_weight * mean((sg code - z)^2)", validator=at_least(0.0)
    )
    group_size: int = option(
        1,
        help="bits per group for the codebook entropy: 1 = per-bit (BSQ-ViT approximation, XQ-GAN reference); "
        f"bits = exact; clamped to bits; at most {MAX_GROUP_SIZE} (memory tokens x bits/group_size x 2^group_size)",
        validator=between(1, MAX_GROUP_SIZE),
    )
    sync_codebook_entropy: bool = option(
        True,
        help="under DDP (training only), take the codebook entropy of the code distribution averaged over all ranks, "
        "as one process with the global batch would; false = each rank's local batch (one small all-reduce per step)",
    )
    temperature: float = option(
        1.0,
        help="soft assignment p(c|z) = softmax(-||z - c||^2 / temperature); per bit p(1) = sigmoid(4 s z / "
        "temperature) with s the code magnitude (1 reproduces the XQ-GAN/BSQ-ViT soft entropy; MAGVIT-v2 used 0.01)",
        validator=positive(),
    )


class BinaryQuantizer(Quantizer):
    """``forward(z (B, bits, H, W)) -> QuantOut(z_q in {-s, s}^bits, indices (B, H, W) int64, losses, stats)``.

    ``spherical = False`` (LFQ): ``s = 1``, ``z`` used as is, the gradient passes the sign unchanged.
    ``spherical = True`` (BSQ): ``z`` is l2-normalised over channels first and ``s = 1/sqrt(bits)``, so codes have
    unit norm; the straight-through gradient reaches ``z`` through the normalisation.
    Losses: ``entropy`` (module doc) and ``commitment`` (on the normalised ``z`` for BSQ). No parameters.
    Stats: ``perplexity``, ``utilization`` (``binary_usage``), ``sample_entropy``, ``codebook_entropy``.
    """

    spherical: ClassVar[bool] = False

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.bits = self.dim = config.bits
        self.codebook_size = 2**config.bits
        self.code_scale = 1.0 / math.sqrt(config.bits) if self.spherical else 1.0

    @classmethod
    def config_dim(cls, config: Any) -> int | None:
        """One channel per bit: ``dim = bits``."""
        return int(config.bits)

    def _check(self, z: Tensor) -> None:
        if z.ndim != 4 or z.shape[1] != self.bits:
            raise ValueError(f"{self._name()} expects latents of shape (B, {self.bits}, H, W), got {tuple(z.shape)}")

    def _name(self) -> str:
        return "bsq" if self.spherical else "lfq"

    def forward(self, z: Tensor) -> QuantOut:
        self._check(z)
        c = self.config
        # fp32 with autocast off (the bit logits saturate easily in bf16); only z_q goes back to the input dtype
        with autocast_disabled(z.device):
            z_f = z.to(torch.promote_types(z.dtype, torch.float32))
            if self.spherical:
                z_f = F.normalize(z_f, dim=1)
            codes = sign_codes(z_f, self.code_scale)
            z_q = straight_through(z_f, codes)
            tokens = flatten_tokens(z_f)
            terms = entropy_terms(
                tokens, scale=self.code_scale, temperature=c.temperature, group_size=c.group_size,
                # only in training: evaluation may run on one rank alone, and a collective there would hang
                across_ranks=c.sync_codebook_entropy and self.training,
            )
            entropy = c.entropy_weight * (
                c.sample_entropy_weight * terms.sample - c.codebook_entropy_weight * terms.codebook
            )
            commitment = c.commitment_weight * (codes - z_f).pow(2).mean()
        indices = signs_to_indices(codes.permute(0, 2, 3, 1))
        stats: dict[str, Any] = binary_usage(indices, self.bits)
        stats["sample_entropy"] = terms.sample.detach()
        stats["codebook_entropy"] = terms.codebook.detach()
        return QuantOut(
            z_q=z_q.to(z.dtype), indices=indices, losses={"entropy": entropy, "commitment": commitment}, stats=stats
        )

    def indices_to_codes(self, indices: Indices) -> Tensor:
        """``(B, H, W)`` indices -> ``(B, bits, H, W)`` fp32 codes in ``{-s, s}`` (exactly what ``forward`` returns)."""
        if not isinstance(indices, Tensor) or indices.ndim != 3:
            raise ValueError(f"{self._name()} expects indices as one (B, H, W) tensor")
        return indices_to_signs(indices, self.bits, self.code_scale).permute(0, 3, 1, 2)

    def codes_to_indices(self, z: Tensor) -> Indices:
        """Latents (or codes) ``(B, bits, H, W)`` -> ``(B, H, W)`` indices from the signs; no losses computed.

        Normalisation (BSQ) does not change signs, so it is skipped."""
        self._check(z)
        return signs_to_indices(z.permute(0, 2, 3, 1))

    def extra_repr(self) -> str:
        c = self.config
        return f"bits={c.bits}, group_size={c.group_size}, temperature={c.temperature}"
