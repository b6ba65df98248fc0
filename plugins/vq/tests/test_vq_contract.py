"""The quantizer contract for ``vq``, with and without l2 normalisation."""

from __future__ import annotations

from xqgan_core.testing.contracts import QuantizerContract


class TestVQContract(QuantizerContract):
    name = "vq"
    options = {"codebook_size": 64, "dim": 8, "chunk_size": 7}
    # with l2_norm the gradient reaches z through the normalisation, so it is not the identity
    # (test_vq_properties checks it equals the normalisation's vector-Jacobian product)
    straight_through_is_identity = False


class TestVQContractNoNorm(QuantizerContract):
    name = "vq"
    options = {"codebook_size": 64, "dim": 8, "l2_norm": False, "init_scale": 1.0}


class TestVQContractHealth(QuantizerContract):
    """k-means init (16 codes: the 32 tokens of one batch suffice) and dead-code restarts, with l2_norm."""

    name = "vq"
    options = {"codebook_size": 16, "dim": 8, "chunk_size": 7, "kmeans_init": 3, "dead_code_threshold": 1.0,
               "usage_decay": 0.9, "usage_window": 5}
    straight_through_is_identity = False
    host_reads_in_forward = "k-means init checks once whether it happened; restarts need the number of dead codes"


class TestVQContractEMA(QuantizerContract):
    """EMA-learned codebook with restarts, and a k-means init that gathers two batches, without l2_norm."""

    name = "vq"
    options = {"codebook_size": 64, "dim": 8, "l2_norm": False, "init_scale": 1.0, "ema_update": True,
               "ema_decay": 0.9, "eps": 1e-4, "dead_code_threshold": 0.5, "kmeans_init": 2, "kmeans_batches": 2}
    host_reads_in_forward = "k-means init checks once whether it happened; restarts need the number of dead codes"
