"""Tests for ``xqgan_core.binary_codes``: bit/index conversion, sign quantization, the factorised entropy loss
(checked against brute force over all 2^bits codes) and the memory it needs at 18 bits."""

from __future__ import annotations

import itertools
import math
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from xqgan_core.binary_codes import (
    MAX_BITS,
    BinaryQuantizer,
    BinaryQuantizerOptions,
    binary_usage,
    bit_logits,
    bits_to_indices,
    entropy_loss,
    entropy_terms,
    indices_to_bits,
    indices_to_signs,
    sign_codes,
    sign_quantize,
    signs_to_indices,
)
from xqgan_core.quant_ops import codebook_usage

# ---- brute force over all 2^bits codes (what the factorised loss must reproduce) -------------------------------


def all_codes(bits: int, scale: float, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """(2^bits, bits) codes in {-scale, scale}; row j is the code of index j (bit i of j -> component i)."""
    rows = [[scale if (j >> i) & 1 else -scale for i in range(bits)] for j in range(2**bits)]
    return torch.tensor(rows, dtype=dtype)


def brute_force_probs(z: torch.Tensor, scale: float, temperature: float) -> torch.Tensor:
    """(N, 2^bits) soft assignment softmax(-||z - c||^2 / T) over every code."""
    codes = all_codes(z.shape[1], scale, z.dtype)
    return torch.softmax(-torch.cdist(z, codes).pow(2) / temperature, dim=1)


def brute_force_entropies(z: torch.Tensor, scale: float, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    p = brute_force_probs(z, scale, temperature)
    sample = -(p * p.log()).sum(dim=1).mean()
    avg = p.mean(dim=0)
    return sample, -(avg * avg.log()).sum()


def tokens(n: int, bits: int, seed: int = 0, std: float = 1.0) -> torch.Tensor:
    return torch.randn(n, bits, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * std


# ---- bits <-> indices ---------------------------------------------------------------------------------------------


def test_index_is_sum_of_positive_bits_times_powers_of_two() -> None:
    codes = torch.tensor([[1.0, -1.0, 1.0], [-1.0, -1.0, -1.0], [0.5, 2.0, 3.0], [0.0, 1.0, -0.0]])
    idx = signs_to_indices(codes)
    assert idx.dtype == torch.int64
    assert idx.tolist() == [1 + 4, 0, 7, 2]  # a component of exactly 0 counts as bit 0
    assert bits_to_indices(torch.tensor([[True, True, False, True]])).tolist() == [1 + 2 + 8]
    assert bits_to_indices(torch.tensor([[0, 1, 1]])).tolist() == [6]


@pytest.mark.parametrize("bits", [1, 6, 18, 36, MAX_BITS])
def test_index_bits_index_round_trip(bits: int) -> None:
    g = torch.Generator().manual_seed(bits)
    idx = torch.randint(0, 2**bits, (5, 7), generator=g, dtype=torch.int64)
    idx[0, 0], idx[0, 1] = 0, 2**bits - 1  # both extremes
    b = indices_to_bits(idx, bits)
    assert b.shape == (5, 7, bits) and b.dtype == torch.bool
    assert torch.equal(bits_to_indices(b), idx)
    signs = indices_to_signs(idx, bits, scale=0.25, dtype=torch.float64)
    assert signs.dtype == torch.float64 and set(signs.unique().tolist()) <= {-0.25, 0.25}
    assert torch.equal(signs_to_indices(signs), idx)


def test_bit_order_is_least_significant_first() -> None:
    assert indices_to_bits(torch.tensor(6), 4).tolist() == [False, True, True, False]
    assert indices_to_signs(torch.tensor([1]), 3).tolist() == [[1.0, -1.0, -1.0]]
    torch.testing.assert_close(indices_to_signs(torch.arange(8), 3, dtype=torch.float64), all_codes(3, 1.0))


@pytest.mark.parametrize("bits", [0, MAX_BITS + 1])
def test_bit_counts_outside_int64_range_are_refused(bits: int) -> None:
    with pytest.raises(ValueError, match="bits"):
        indices_to_bits(torch.tensor([0]), bits)
    with pytest.raises(ValueError, match="bits"):
        bits_to_indices(torch.zeros(1, bits, dtype=torch.bool))


def test_sign_quantize_has_identity_gradient_and_exact_codes_without_grad() -> None:
    z = tokens(4, 5).float().requires_grad_(True)
    q = sign_quantize(z, 0.5)
    torch.testing.assert_close(q, torch.where(z > 0, 0.5, -0.5))
    w = torch.randn(4, 5)
    (q * w).sum().backward()
    torch.testing.assert_close(z.grad, w)
    with torch.no_grad():
        exact = sign_quantize(z, 1 / math.sqrt(5))
    assert torch.equal(exact, sign_codes(z, 1 / math.sqrt(5)))
    assert set(exact.abs().unique().tolist()) == {torch.tensor(1 / math.sqrt(5)).item()}


# ---- the entropy loss against brute force ----------------------------------------------------------------------


@pytest.mark.parametrize("scale", [1.0, 0.5])
@pytest.mark.parametrize("temperature", [1.0, 0.3])
def test_bit_logits_are_the_marginals_of_the_full_softmax(scale: float, temperature: float) -> None:
    z = tokens(20, 4, seed=1)
    p = brute_force_probs(z, scale, temperature)
    bit_is_one = indices_to_bits(torch.arange(16), 4).double()  # (16, 4)
    torch.testing.assert_close(torch.sigmoid(bit_logits(z, scale, temperature)), p @ bit_is_one)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6])
@pytest.mark.parametrize(("scale_kind", "temperature"), [("lfq", 1.0), ("lfq", 0.2), ("bsq", 1.0), ("bsq", 0.05)])
def test_whole_code_group_equals_brute_force(bits: int, scale_kind: str, temperature: float) -> None:
    z = tokens(40, bits, seed=bits)
    scale = 1.0 if scale_kind == "lfq" else 1 / math.sqrt(bits)
    if scale_kind == "bsq":
        z = torch.nn.functional.normalize(z, dim=1)
    exp_sample, exp_codebook = brute_force_entropies(z, scale, temperature)
    got = entropy_terms(z, scale=scale, temperature=temperature, group_size=bits)
    torch.testing.assert_close(got.sample, exp_sample)
    torch.testing.assert_close(got.codebook, exp_codebook)
    # a group_size above bits is clamped: still the exact joint
    torch.testing.assert_close(entropy_terms(z, scale=scale, temperature=temperature, group_size=12).codebook, exp_codebook)


def test_per_sample_entropy_is_exact_for_every_group_size() -> None:
    z = tokens(30, 6, seed=3)
    exp_sample, _ = brute_force_entropies(z, 1.0, 0.7)
    for g in range(1, 7):
        torch.testing.assert_close(entropy_terms(z, scale=1.0, temperature=0.7, group_size=g).sample, exp_sample)


def product_set(groups: list[torch.Tensor]) -> torch.Tensor:
    """Every combination of one row from each group's token set: the groups are independent over the batch."""
    rows = [torch.cat(choice) for choice in itertools.product(*[list(g) for g in groups])]
    return torch.stack(rows)


@pytest.mark.parametrize(("bits", "group_size"), [(2, 1), (4, 2), (6, 1), (6, 2), (6, 3), (5, 2), (5, 3)])
def test_grouped_codebook_entropy_equals_brute_force_for_independent_groups(bits: int, group_size: int) -> None:
    sizes = [group_size] * (bits // group_size) + ([bits % group_size] if bits % group_size else [])
    z = product_set([tokens(3, s, seed=10 + i) for i, s in enumerate(sizes)])
    assert z.shape == (3 ** len(sizes), bits)
    _, exp_codebook = brute_force_entropies(z, 1.0, 0.5)
    got = entropy_terms(z, scale=1.0, temperature=0.5, group_size=group_size)
    torch.testing.assert_close(got.codebook, exp_codebook)


def test_grouped_codebook_entropy_overestimates_correlated_groups() -> None:
    # bit 1 copies bit 0: the per-bit sum counts the shared bit twice (subadditivity), the joint does not;
    # bit 2 is independent of both over the batch (product set), so the groups {0, 1}, {2} are exact
    first = tokens(8, 1, seed=4)
    z = product_set([torch.cat([first, first], dim=1), tokens(5, 1, seed=5)])
    _, exact = brute_force_entropies(z, 1.0, 0.1)
    per_bit = entropy_terms(z, scale=1.0, temperature=0.1, group_size=1).codebook
    pairs = entropy_terms(z, scale=1.0, temperature=0.1, group_size=2).codebook  # groups {0,1} and {2}
    assert per_bit > exact + 0.3
    torch.testing.assert_close(pairs, exact)


def test_loss_and_its_gradient_match_brute_force() -> None:
    z = tokens(25, 4, seed=5).requires_grad_(True)
    loss = entropy_loss(z, scale=1.0, temperature=0.5, group_size=4, sample_weight=0.7, codebook_weight=1.3)
    (grad,) = torch.autograd.grad(loss, z)
    z_ref = z.detach().clone().requires_grad_(True)
    sample, codebook = brute_force_entropies(z_ref, 1.0, 0.5)
    ref = 0.7 * sample - 1.3 * codebook
    (ref_grad,) = torch.autograd.grad(ref, z_ref)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(grad, ref_grad)


def test_confident_bits_give_finite_entropies_and_gradients() -> None:
    z = (tokens(64, 8, seed=6) * 1e4).float().requires_grad_(True)  # sigmoid saturates in fp32
    terms = entropy_terms(z, scale=1.0, temperature=0.01, group_size=4)
    (terms.sample - terms.codebook).backward()
    assert torch.isfinite(terms.sample) and torch.isfinite(terms.codebook) and torch.isfinite(z.grad).all()
    assert terms.sample.item() == pytest.approx(0.0, abs=1e-6)
    assert terms.sample.dtype == torch.float32


def test_entropy_arguments_are_checked() -> None:
    z = tokens(4, 3)
    with pytest.raises(ValueError, match="group_size"):
        entropy_terms(z, scale=1.0, temperature=1.0, group_size=0)
    with pytest.raises(ValueError, match="group_size"):
        entropy_terms(z, scale=1.0, temperature=1.0, group_size=13)
    with pytest.raises(ValueError, match="temperature"):
        entropy_terms(z, scale=1.0, temperature=0.0, group_size=1)


# ---- usage statistics -------------------------------------------------------------------------------------------


def test_usage_uses_the_histogram_up_to_20_bits() -> None:
    idx = torch.tensor([0, 0, 3, 5, 1023, 5])
    assert binary_usage(idx, 10) == codebook_usage(idx, 1024)


def test_usage_above_20_bits_counts_unique_codes() -> None:
    idx = torch.tensor([[2**35, 7, 7], [2**35, 2**36 - 1, 0]])
    stats = binary_usage(idx, 36)
    dense = codebook_usage(torch.tensor([0, 1, 1, 0, 2, 3]), 4)  # the same histogram, relabelled
    assert stats["perplexity"] == pytest.approx(dense["perplexity"])
    assert stats["utilization"] == pytest.approx(100.0 * 4 / 2**36)
    assert binary_usage(torch.zeros(0, dtype=torch.long), 30) == {"perplexity": 0.0, "utilization": 0.0}


# ---- the quantizer base on its own, and the memory it needs --------------------------------------------------------


class _Plain(BinaryQuantizer):
    plugin_api = 1
    spherical = False
    Config = BinaryQuantizerOptions


class _Spherical(_Plain):
    spherical = True


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op produces (forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("cls", [_Plain, _Spherical])
def test_18_bits_never_builds_a_per_token_codebook_axis(cls: type[BinaryQuantizer]) -> None:
    q = cls(BinaryQuantizerOptions(bits=18, group_size=4)).train()
    z = torch.randn(16, 18, 16, 16, requires_grad=True)  # 4096 tokens
    with _LargestTensor() as mode:
        out = q(z)
        (out.z_q.sum() + out.loss).backward()
    assert torch.isfinite(z.grad).all()
    # the largest buffers: tokens x groups x 2^group_size (4096 x 4 x 16) and the 2^18 usage histogram; a single
    # tokens x 2^18 score matrix (10^9 floats) would be 1000x larger
    assert mode.largest <= 2**19
    assert out.stats["utilization"] > 0


def test_18_bits_forward_backward_peak_rss_growth_is_small() -> None:
    # a fresh process, so that ru_maxrss (the peak) reflects this run only
    script = textwrap.dedent(
        """
        import resource, torch
        from xqgan_core.binary_codes import BinaryQuantizer, BinaryQuantizerOptions
        class Q(BinaryQuantizer):
            plugin_api = 1
            Config = BinaryQuantizerOptions
        q = Q(BinaryQuantizerOptions(bits=18)).train()
        small = torch.randn(1, 18, 2, 2, requires_grad=True)
        q(small).loss.backward()  # warm up allocator and kernels
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        z = torch.randn(16, 18, 16, 16, requires_grad=True)
        out = q(z)
        (out.z_q.sum() + out.loss).backward()
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((after - before) * 1024)  # ru_maxrss is in KiB on Linux
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    growth = int(result.stdout.strip().splitlines()[-1])
    assert growth < 256 * 2**20, f"peak RSS grew by {growth / 2**20:.0f} MiB"


# ---- codebook entropy over the global batch under torch.distributed ---------------------------------------------

_ENTROPY_WORKER = textwrap.dedent(
    """
    import sys, torch, torch.distributed as dist
    from xqgan_core import build
    from xqgan_core.binary_codes import entropy_terms
    rank, world, rendezvous, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    tokens = torch.randn(24, 5, generator=torch.Generator().manual_seed(rank), dtype=torch.float64) * (1 + rank)
    tokens.requires_grad_(True)
    terms = entropy_terms(tokens, scale=1.0, temperature=1.0, group_size=3, across_ranks=True)
    terms.codebook.backward()
    # evaluation on one rank alone must not enter a collective (it would hang here)
    lfq = build("quantizer", {"use": "lfq", "bits": 5}).eval()
    if rank == 0:
        lfq(torch.randn(1, 5, 2, 2))
    train_stats = lfq.train()(tokens.detach().float().reshape(2, 3, 4, 5).permute(0, 3, 1, 2)).stats
    dist.barrier()
    torch.save({"codebook": terms.codebook.detach(), "grad": tokens.grad,
                "stat": train_stats["codebook_entropy"]}, path)
    dist.destroy_process_group()
    """
)


def test_codebook_entropy_across_ranks_is_the_global_batch_entropy(tmp_path) -> None:
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.fail("this torch build has no gloo backend for torch.distributed")
    script = tmp_path / "worker.py"
    script.write_text(_ENTROPY_WORKER)
    procs = [
        subprocess.Popen([sys.executable, str(script), str(r), "2", str(tmp_path / "rdv"), str(tmp_path / f"{r}.pt")],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for r in range(2)
    ]
    for p in procs:
        output, _ = p.communicate(timeout=120)
        assert p.returncode == 0, output.decode()
    got = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]

    # the same computation in one process on the concatenated batch
    parts = [torch.randn(24, 5, generator=torch.Generator().manual_seed(r), dtype=torch.float64) * (1 + r)
             for r in range(2)]
    full = torch.cat(parts).requires_grad_(True)
    ref = entropy_terms(full, scale=1.0, temperature=1.0, group_size=3)
    ref.codebook.backward()
    local = entropy_terms(parts[0], scale=1.0, temperature=1.0, group_size=3).codebook
    for r in range(2):
        torch.testing.assert_close(got[r]["codebook"], ref.codebook.detach())
        # DDP averages parameter gradients over the 2 ranks, so each rank's gradient is 2x the one-process one
        torch.testing.assert_close(got[r]["grad"], 2 * full.grad[24 * r : 24 * (r + 1)])
    assert not torch.isclose(local, ref.codebook)  # the check above is not satisfied by the local entropy
    torch.testing.assert_close(got[0]["stat"], got[1]["stat"])  # the module's training stat is the global one too
