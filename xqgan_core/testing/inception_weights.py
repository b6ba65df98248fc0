"""Random weights of the real FID network (torch-fidelity's ``FeatureExtractorInceptionV3``) saved to a file, for
tests that must run offline: load them through ``xqgan_core.inception.load_inception(weights=path)``, the same
code path the published file takes. Not importing this module from ``xqgan_core.testing``: it needs torch-fidelity.
"""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import torch
from torch import nn

from ..frozen import seeded
from ..inception import EXTRACTOR_NAME, LOGITS, POOL_FEATURES, _fidelity_module

__all__ = ["save_random_inception"]


def _random_network() -> nn.Module:
    module = _fidelity_module()
    cls = module.FeatureExtractorInceptionV3
    # the constructor insists on loading weights: hand it nothing and skip the (strict) load, keeping the init
    with mock.patch.object(module, "load_state_dict_from_url", lambda *a, **k: {}), \
            mock.patch.object(cls, "load_state_dict", lambda self, state, *a, **k: None):
        net = cls(EXTRACTOR_NAME, [POOL_FEATURES, LOGITS])
    for m in net.modules():
        # He init keeps activations at a usable scale through ~90 layers, so the features separate images
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
    return net


def save_random_inception(path: str | Path, seed: int = 0) -> Path:
    """Write a state dict of the Inception-v3 layout with seeded random weights (``torch.save``, tensors only)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    net = seeded(_random_network, seed)
    torch.save({k: v.contiguous() for k, v in net.state_dict().items()}, path)
    return path

