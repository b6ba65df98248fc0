"""The generator contract (xqgan_core.testing.GeneratorContract) on the token layouts llamagen models: two product
columns with different vocabularies (no quantizer), one vq codebook, and residual levels of rq over vq."""

from __future__ import annotations

from typing import Any, ClassVar

from xqgan_core.testing import GeneratorContract

# tiny, with non-zero heads: zero heads (the default, LlamaGen's init) would make every logit 0 and the checks vacuous
TINY: dict[str, Any] = {"depth": 2, "width": 32, "heads": 2, "ffn_multiple_of": 16, "head_init_std": 0.5}
TINY_VQ: dict[str, Any] = {"use": "vq", "codebook_size": 9, "dim": 4}


class TestLlamaGenOnProductColumns(GeneratorContract):
    name = "llamagen"
    options: ClassVar[dict[str, Any]] = TINY


class TestLlamaGenOnVQ(GeneratorContract):
    name = "llamagen"
    options: ClassVar[dict[str, Any]] = TINY
    quantizer: ClassVar[dict[str, Any] | None] = TINY_VQ
    grid = (3, 4)


class TestLlamaGenOnRQ(GeneratorContract):
    name = "llamagen"
    options: ClassVar[dict[str, Any]] = TINY
    quantizer: ClassVar[dict[str, Any] | None] = {"use": "rq", "levels": 3, "code": TINY_VQ}
    grid = (2, 3)
