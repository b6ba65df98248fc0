"""The quantizer contract for ``pq``: over vq with one and two branches, over rq(vq), and over every other
installed quantizer (lfq, bsq, msrq, pq, ... whatever the catalog offers when the tests run)."""

from __future__ import annotations



from xqgan_core import build, catalog
from xqgan_core.testing.contracts import TINY_VQ, QuantizerContract, tiny_quantizer



class ResidualQuantizerContract(QuantizerContract):
    """The kit for pq over residual / multi-scale branches (rq, msrq): z_q is a sum of codes per branch, and
    re-encoding that sum with arbitrary codebooks may legitimately choose other indices, so the kit's idempotence
    check is off (test_rq_contract runs it on rq codebooks that shrink with depth, where it must hold)."""

    idempotent = False


class TestPQOneBranchContract(QuantizerContract):
    name = "pq"
    options = {"branches": 1, "branch": TINY_VQ}
    straight_through_is_identity = False  # vq's l2_norm: the gradient passes the normalisation


class TestPQTwoBranchesContract(QuantizerContract):
    name = "pq"
    options = {"branches": 2, "branch": TINY_VQ}
    straight_through_is_identity = False


class TestPQTwoUnnormalisedBranchesContract(QuantizerContract):
    name = "pq"
    options = {"branches": 2, "branch": {**TINY_VQ, "l2_norm": False, "init_scale": 1.0}}


class TestPQOverRQContract(ResidualQuantizerContract):
    name = "pq"
    batch_size = 4
    options = {"branches": 2, "branch": {"use": "rq", "levels": 3, "code": TINY_VQ,
                                         "dropout": {"rate": 0.5, "min_levels": 1}}}


# one contract class per other installed quantizer as the branch: pq must work over any of them. The straight-
# through check is the weak one (finite, non-zero), since some branches normalise their input.
for _name in catalog().names("quantizer"):
    if _name in ("vq", "rq"):
        continue
    _multi = build("quantizer", tiny_quantizer(_name)).num_levels > 1
    _cls = type(
        f"TestPQOver_{_name}_Contract",
        (ResidualQuantizerContract if _multi else QuantizerContract,),
        {"name": "pq", "options": {"branches": 2, "branch": tiny_quantizer(_name)}, "straight_through_is_identity": False,
         "__module__": __name__},
    )
    globals()[_cls.__name__] = _cls
