"""The quantizer contract for ``rq``: over vq (separate and shared codebooks, with dropout), and over every other
installed single-level quantizer (lfq, bsq, pq(vq), ... whatever the catalog offers when the tests run)."""

from __future__ import annotations

from typing import Any

import torch

from xqgan_core import build, catalog
from xqgan_core.testing.contracts import TINY_VQ, QuantizerContract, tiny_quantizer



class ResidualQuantizerContract(QuantizerContract):
    """The kit for a residual quantizer: its z_q is a sum of codes, and re-encoding that sum with arbitrary
    codebooks may legitimately choose other indices (the sum need not have its level-0 code as its nearest level-0
    entry), so the kit's idempotence check is off here. TestRQShrinkingCodebooksContract below runs it where it
    must hold: codebooks that shrink with depth, as trained ones do."""

    idempotent = False


class TestRQContract(ResidualQuantizerContract):
    name = "rq"
    options = {"levels": 3, "code": TINY_VQ}


class TestRQSharedCodebookContract(ResidualQuantizerContract):
    name = "rq"
    options = {"levels": 3, "code": TINY_VQ, "shared_codebook": True}


class TestRQDropoutContract(ResidualQuantizerContract):
    name = "rq"
    batch_size = 6
    options = {"levels": 4, "code": {**TINY_VQ, "l2_norm": False, "init_scale": 1.0},
               "dropout": {"rate": 0.5, "min_levels": 1}}


class TestRQShrinkingCodebooksContract(QuantizerContract):
    """The full kit, idempotence included, on codebooks scaled by 0.05**level (as trained residual codebooks
    shrink with depth). Asserted precondition: at every level, all deeper codes together move a point by less than
    half the level's smallest distance between two of its codes, so re-encoding a sum of codes must recover it."""

    name = "rq"
    options = {"levels": 3, "code": {**TINY_VQ, "l2_norm": False, "init_scale": 1.0}}

    def make(self) -> Any:
        m = super().make()
        with torch.no_grad():
            for level, q in enumerate(m.codes):
                q.embedding.weight.mul_(0.05**level)
        tables = [q.embedding.weight.detach() for q in m.codes]
        for level, table in enumerate(tables):
            gap = (torch.cdist(table, table) + torch.eye(len(table)) * 1e9).min()
            reach = sum(float(t.norm(dim=1).max()) for t in tables[level + 1 :])
            assert reach < gap / 2, "the scaled codebooks do not satisfy the idempotence precondition"
        return m


def _single_level_names() -> list[str]:
    names = []
    for name in catalog().names("quantizer"):
        if name != "vq" and build("quantizer", tiny_quantizer(name)).num_levels == 1:
            names.append(name)
    return names


# one contract class per other installed single-level quantizer: rq must work over any of them
for _name in _single_level_names():
    _cls = type(
        f"TestRQOver_{_name}_Contract",
        (ResidualQuantizerContract,),
        {"name": "rq", "options": {"levels": 2, "code": tiny_quantizer(_name)}, "__module__": __name__},
    )
    globals()[_cls.__name__] = _cls
