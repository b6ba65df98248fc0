"""The quantizer contract for ``lfq`` (tiny codebooks: 6 bits = 64 codes)."""

from __future__ import annotations

from xqgan_core.testing.contracts import QuantizerContract


class TestLFQContract(QuantizerContract):
    name = "lfq"
    options = {"bits": 6}


class TestLFQContractGrouped(QuantizerContract):
    name = "lfq"
    # groups of 4 + a remainder group of 3 bits, sharper soft assignment
    options = {"bits": 7, "group_size": 4, "temperature": 0.5}
