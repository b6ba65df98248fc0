"""The Inception-v3 network of FID, Inception Score and precision/recall: torch-fidelity's port of the TensorFlow
graph the standard evaluators use (ADM's ``evaluator.py``, TTUR), with its weights read safely from a local file.

Where the weights come from, in order:

1. an explicit file (``xqgan-run fid --inception-weights PATH``, ``load_inception(weights=PATH)``), else
2. the file named by ``$XQGAN_INCEPTION_WEIGHTS``, else
3. torch-fidelity's own cache location ``$TORCH_HOME/hub/checkpoints/weights-inception-2015-12-05-6726825d.pth``
   (``inception_cache_path()``; what ``torch.hub.load_state_dict_from_url`` uses), downloaded there when the
   machine is online (SHA-256 prefix checked, moved into place only when complete). Offline (no network, or
   ``XQGAN_OFFLINE=1`` / ``HF_HUB_OFFLINE=1``) the error names that path.

torch-fidelity itself would read the file with ``torch.load(weights_only=False)`` (pickled code could run). We read
it ourselves (``.safetensors``, or ``torch.load(weights_only=True)``: tensors only) and hand the state dict to
torch-fidelity's constructor in place of its download, so the network is the library's own, unchanged.

Needs the ``fid`` extra: ``pip install 'xqgan-core[fid]'`` (torch-fidelity). Importing this module does not import it.
"""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from torch import Tensor, nn

from .errors import CheckpointError, XQGanError
from .perceptual import OFFLINE_VARIABLES, download_checked, is_offline, read_weights_only

__all__ = [
    "INCEPTION_FILE",
    "INCEPTION_SHA256_PREFIX",
    "INCEPTION_URL",
    "WEIGHTS_VARIABLE",
    "Inception",
    "inception_cache_path",
    "load_inception",
    "resolve_inception_weights",
    "to_uint8",
]

#: torch-fidelity's conversion of the TF Inception graph (2015-12-05) that FID/IS are defined with.
INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
INCEPTION_FILE = INCEPTION_URL.rsplit("/", 1)[1]
#: torch.hub's convention: the hex digits after the last "-" of the name begin the file's SHA-256.
INCEPTION_SHA256_PREFIX = "6726825d"
#: Environment variable naming a local weights file (used when no explicit file is given).
WEIGHTS_VARIABLE = "XQGAN_INCEPTION_WEIGHTS"
#: torch-fidelity's name of the feature extractor and of the two outputs we use.
EXTRACTOR_NAME = "inception-v3-compat"
POOL_FEATURES = "2048"  # pool_3: FID and precision/recall
LOGITS = "logits_unbiased"  # IS (torch-fidelity's choice, as in the TF reference)

# The constructor swap below patches a module attribute: one construction at a time.
_CONSTRUCTION_LOCK = threading.Lock()


def _fidelity_module() -> Any:
    try:
        import torch_fidelity.feature_extractor_inceptionv3 as module
    except ImportError as exc:
        raise XQGanError(
            "FID, Inception Score and precision/recall need torch-fidelity: pip install 'xqgan-core[fid]' "
            f"(torch-fidelity==0.4.0) ({exc})"
        ) from exc
    return module


def inception_cache_path() -> Path:
    """Where torch-fidelity caches its Inception file: ``$TORCH_HOME/hub/checkpoints/<INCEPTION_FILE>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


def _where_it_goes() -> str:
    return (
        f"put torch-fidelity's Inception-v3 file '{INCEPTION_FILE}' ({INCEPTION_URL}) at {inception_cache_path()} "
        f"(the torch hub cache; set TORCH_HOME to move it), or pass --inception-weights PATH / set "
        f"{WEIGHTS_VARIABLE}=PATH"
    )


def resolve_inception_weights(weights: str | Path | None = None) -> Path:
    """The weights file to use (see the module docstring), downloading it into the cache when online.

    Raises CheckpointError when a named file does not exist, or when none is cached and it cannot be downloaded.
    """
    named = weights or os.environ.get(WEIGHTS_VARIABLE, "").strip()
    if named:
        path = Path(named).expanduser()
        if not path.is_file():
            origin = "" if weights else f" (from {WEIGHTS_VARIABLE})"
            raise CheckpointError(f"{path}: Inception weights file{origin} not found")
        return path
    path = inception_cache_path()
    if path.is_file():
        return path
    if is_offline():
        reason = "offline mode: " + " / ".join(f"{n}=1" for n in OFFLINE_VARIABLES)
    else:
        print(f"Downloading the FID Inception-v3 weights {INCEPTION_URL} to {path}", flush=True)
        try:
            download_checked(INCEPTION_URL, path, INCEPTION_SHA256_PREFIX)
            return path
        except (OSError, RuntimeError) as exc:  # no network / HTTP error / timeout / hash mismatch
            reason = f"download failed: {exc}"
    raise CheckpointError(f"the Inception-v3 weights for FID are missing ({reason}); {_where_it_goes()}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def to_uint8(images: Tensor) -> Tensor:
    """Images in [-1, 1] -> uint8 as the reference evaluation saves them: ``clamp(127.5 * x + 128)``, truncated."""
    return (images.detach().float() * 127.5 + 128).clamp(0, 255).to(torch.uint8)


@dataclass
class Inception:
    """The loaded network and where its weights came from (FID values are only comparable with the same file)."""

    net: nn.Module
    weights: Path
    sha256: str

    @property
    def official(self) -> bool:
        """True for torch-fidelity's published file (the numbers papers report)."""
        return self.sha256.startswith(INCEPTION_SHA256_PREFIX)

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @torch.no_grad()
    def features(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """uint8 images (B, 3, H, W), any size (resized to 299 inside, as TF did) -> (pool (B, 2048), logits
        (B, 1008)), float32 on the CPU."""
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"Inception.features: expected uint8 images (B, 3, H, W), got {images.dtype} "
                             f"{tuple(images.shape)}")
        pool, logits = self.net(images.to(self.device))
        return pool.float().cpu(), logits.float().cpu()

    def describe(self) -> dict[str, Any]:
        return {"path": str(self.weights), "sha256": self.sha256, "official": self.official}


def load_inception(weights: str | Path | None = None, device: str | torch.device = "cpu") -> Inception:
    """torch-fidelity's ``FeatureExtractorInceptionV3`` filled from ``resolve_inception_weights(weights)``.

    Raises CheckpointError when the file is missing, unsafe to read, or not that network's layout.
    """
    module = _fidelity_module()
    path = resolve_inception_weights(weights)
    state = read_weights_only(path, "torch-fidelity's Inception-v3")

    def handed_over(url: str, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        return state  # instead of torch-fidelity's download + unrestricted torch.load

    with _CONSTRUCTION_LOCK, mock.patch.object(module, "load_state_dict_from_url", handed_over):
        try:
            net = module.FeatureExtractorInceptionV3(EXTRACTOR_NAME, [POOL_FEATURES, LOGITS])
        except RuntimeError as exc:  # load_state_dict: missing / unexpected keys, shape mismatches
            raise CheckpointError(f"{path}: not torch-fidelity's Inception-v3 layout: {exc}") from exc
    return Inception(net=net.to(device).eval(), weights=path, sha256=_sha256(path))
