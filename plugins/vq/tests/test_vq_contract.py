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
