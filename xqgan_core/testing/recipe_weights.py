"""Weights as a recipe: every tensor is drawn from a seed derived from its key and shape.

Parity bundles (``tests/parity/``) store only the names and shapes of a foreign model's state dict. Both sides, the
foreign code that made the bundle and our test that checks it, regenerate identical weights from that list, so a
bundle for a 170 M-parameter ViT stays a few kilobytes of manifest plus its inputs and expected outputs.

The draw is scaled like a sensible initialisation so that random networks keep activations in range and produce
varied codes (a network whose every token picks the same code would prove nothing):

- matrices and convolution kernels: normal with std 1 / sqrt(fan_in) (fan_in = product of all dims but the first);
- tokens and embeddings with a leading dim of 1 (``[1, N, D]`` position embeddings, class tokens): std 0.02;
- 1-D ``bias`` / ``beta`` / ``running_mean``: std 0.02 normal;
- other 1-D floats (norm weights, LayerScale gammas, ``running_var``): 1 + 0.1 * normal, clamped positive;
- integer tensors: zeros.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

_OFFSET_SUFFIXES = ("bias", "beta", "running_mean")


def recipe_seed(key: str, shape: Sequence[int], seed: int = 0) -> int:
    """A 63-bit seed from (seed, key, shape); stable across machines, Python versions and processes."""
    text = f"{seed}:{key}:{'x'.join(str(int(s)) for s in shape)}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & (2**63 - 1)


def recipe_tensor(key: str, shape: Sequence[int], dtype: torch.dtype = torch.float32, seed: int = 0) -> Tensor:
    """The tensor named ``key`` of ``shape``: identical wherever it is drawn (CPU generator, float32, then cast)."""
    shape = tuple(int(s) for s in shape)
    if not dtype.is_floating_point:
        return torch.zeros(shape, dtype=dtype)
    g = torch.Generator().manual_seed(recipe_seed(key, shape, seed))
    x = torch.randn(shape, generator=g, dtype=torch.float32)
    if len(shape) >= 2:
        fan_in = math.prod(shape[1:])
        x = x * (0.02 if shape[0] == 1 else 1.0 / math.sqrt(max(fan_in, 1)))
    elif key.rsplit(".", 1)[-1] in _OFFSET_SUFFIXES:
        x = x * 0.02
    else:
        x = (1.0 + 0.1 * x).clamp_min(0.05)
    return x.to(dtype)


def recipe_state_dict(
    manifest: Mapping[str, Sequence[int]], seed: int = 0, dtypes: Mapping[str, torch.dtype] | None = None
) -> dict[str, Tensor]:
    """The state dict whose keys and shapes ``manifest`` lists (``dtypes`` overrides float32 per key)."""
    dtypes = dtypes or {}
    return {k: recipe_tensor(k, shape, dtypes.get(k, torch.float32), seed) for k, shape in manifest.items()}
