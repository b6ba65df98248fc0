"""The quantizer contract for ``bsq`` (tiny codebooks: 6 bits = 64 codes)."""

from __future__ import annotations

from xqgan_core.testing.contracts import QuantizerContract


class TestBSQContract(QuantizerContract):
    name = "bsq"
    options = {"bits": 6}
    # the input is l2-normalised, so the gradient passes the normalisation (test_bsq_properties checks it)
    straight_through_is_identity = False


class TestBSQContractGrouped(QuantizerContract):
    name = "bsq"
    options = {"bits": 7, "group_size": 7, "temperature": 0.1}
    straight_through_is_identity = False
