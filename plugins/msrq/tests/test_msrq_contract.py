"""The quantizer contract for ``msrq`` at tiny sizes: scales (1, 2, 4) on a 4x4 latent, over every installed inner
quantizer (vq always; lfq and bsq when their plugins are installed)."""

from __future__ import annotations

from typing import Any

import attrs

from xqgan_core import catalog
from xqgan_core.testing.contracts import QuantizerContract


class MSRQContract(QuantizerContract):
    name = "msrq"

    idempotent = False  # z_q is a sum of upsampled, phi-filtered codes, not one code per position


class TestMSRQContract(MSRQContract):
    options = {
        "scales": [1, 2, 4],
        "phi_count": 2,
        "code": {"use": "vq", "dim": 8, "codebook_size": 32},
        "dropout": {"rate": 0.5, "min_levels": 2},
    }


class TestMSRQContractQuantizedCodes(MSRQContract):
    # the other convention choices: normalised codes, commitment summed, one phi per scale, normalised input
    options = {
        "scales": [1, 2, 4],
        "phi_count": 0,
        "accumulate": "quantized",
        "commit_convention": "sum",
        "normalize_input": True,
        "code": {"use": "vq", "dim": 8, "codebook_size": 32},
    }
    straight_through_is_identity = False  # the gradient passes the input normalisation


class TestMSRQContractNoPhiNoNorm(MSRQContract):
    options = {
        "scales": [1, 2, 4],
        "phi_gamma": 0.0,
        "code": {"use": "vq", "dim": 8, "codebook_size": 32, "l2_norm": False},
    }


def _binary_inner(name: str) -> dict[str, Any]:
    """A small table for a binary (lfq/bsq) inner quantizer: 6 bits (64 codes) when the plugin has a ``bits`` option."""
    cls = catalog(refresh=True).resolve("quantizer", name).load()
    return {"use": name, "bits": 6} if "bits" in attrs.fields_dict(cls.Config) else {"use": name}


# lfq and bsq are separate plugins: run the contract over them only where they are installed
for _inner in [n for n in ("lfq", "bsq") if n in catalog(refresh=True).names("quantizer")]:
    _cls = type(
        f"TestMSRQContract_{_inner}",
        (MSRQContract,),
        {
            "options": {
                "scales": [1, 2, 4],
                "phi_count": 3,
                "code": _binary_inner(_inner),
                "normalize_input": _inner == "bsq",
                "dropout": {"rate": 0.5, "min_levels": 1},
            },
            "straight_through_is_identity": _inner != "bsq",
        },
    )
    globals()[_cls.__name__] = _cls
