"""The core's generator contract, on ``var`` bound to tiny msrq tokenizers (VQ, LFQ and pq over msrq codes)."""

from __future__ import annotations

from typing import Any, ClassVar

from xqgan_core.testing import GeneratorContract

MSRQ: dict[str, Any] = {"use": "msrq", "scales": [1, 2, 4], "phi_count": 1}
TINY = {"depth": 2, "width": 32, "heads": 2}


class TestVarOnVQ(GeneratorContract):
    name = "var"
    options: ClassVar[dict[str, Any]] = TINY
    quantizer: ClassVar[dict[str, Any]] = {**MSRQ, "code": {"use": "vq", "dim": 8, "codebook_size": 32}}
    grid = (4, 4)


class TestVarOnLFQ(TestVarOnVQ):
    quantizer: ClassVar[dict[str, Any]] = {**MSRQ, "code": {"use": "lfq", "bits": 5}}


class TestVarOnProductBranches(TestVarOnVQ):
    quantizer: ClassVar[dict[str, Any]] = {
        "use": "pq", "branches": 2, "branch": {**MSRQ, "code": {"use": "vq", "dim": 4, "codebook_size": 16}}}
