"""LPIPS (VGG16 trunk) for the perceptual loss and the LPIPS metric.

The ``lpips`` package ships its calibrated linear heads; its VGG16 trunk is torchvision's ImageNet file. The trunk
is built randomly initialised (``pnet_rand=True``: torchvision constructs ``vgg16`` without weights, so lpips
itself never downloads) and then filled from a local torchvision VGG16 state dict: the run file's
``loss.lpips_weights``, else the torch hub cache file. When the cache file is missing and the machine is online,
it is downloaded the way torchvision does (into the hub cache, SHA-256 prefix checked, moved into place only when
complete). Offline (no network, or ``XQGAN_OFFLINE=1`` / ``HF_HUB_OFFLINE=1``, which skip the attempt so tests never
wait on a network timeout) ``load_lpips`` returns None and says once how to switch LPIPS on, unless the caller
requires it (``loss.require_perceptual``): then it raises, saying where the file goes.

Importing this module does not import ``lpips`` or torchvision; that happens on the first ``load_lpips``.
"""

from __future__ import annotations

import os
import socket
import sys
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .errors import CheckpointError

__all__ = [
    "VGG16_FILE",
    "VGG16_SHA256_PREFIX",
    "VGG16_URL",
    "download_checked",
    "download_vgg16",
    "hub_cache_path",
    "is_offline",
    "load_lpips",
    "Perceptual",
]

#: torchvision's ImageNet VGG16 checkpoint (``VGG16_Weights.IMAGENET1K_V1``), the trunk LPIPS was calibrated on.
VGG16_FILE = "vgg16-397923af.pth"
VGG16_URL = f"https://download.pytorch.org/models/{VGG16_FILE}"
#: torchvision's convention: the file name carries the first hex digits of the file's SHA-256.
VGG16_SHA256_PREFIX = "397923af"

#: Environment switches that mean "never try the network" (ours, and the Hugging Face one our tests already set).
OFFLINE_VARIABLES = ("XQGAN_OFFLINE", "HF_HUB_OFFLINE")
#: Seconds a stalled connection may block before the download is given up (the run then continues without LPIPS).
DOWNLOAD_TIMEOUT_S = 30.0

_LAYOUT = "does not match the torchvision VGG16 layout (features.* / classifier.* keys, or features only)"

# Said once per process: every evaluation and every loss construction would otherwise repeat it.
_missing_warned = False


def hub_cache_path() -> Path:
    """Where torchvision would have cached the VGG16 file: ``$TORCH_HOME/hub/checkpoints/vgg16-397923af.pth``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE


def is_offline() -> bool:
    """True when ``XQGAN_OFFLINE`` or ``HF_HUB_OFFLINE`` is set to a true value (1, true, yes, on)."""
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on") for name in OFFLINE_VARIABLES)


def download_checked(url: str, destination: Path, sha256_prefix: str, timeout_s: float = DOWNLOAD_TIMEOUT_S) -> None:
    """Fetch ``url`` to ``destination`` as torch.hub does: a partial file, SHA-256 prefix checked, then moved.

    Raises OSError (no network, HTTP error, timeout) or RuntimeError (hash mismatch; nothing is left behind).
    """
    destination.parent.mkdir(parents=True, exist_ok=True)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout_s)  # torch.hub's urlopen has no timeout of its own
    try:
        torch.hub.download_url_to_file(url, str(destination), hash_prefix=sha256_prefix, progress=sys.stderr.isatty())
    finally:
        socket.setdefaulttimeout(previous)


def download_vgg16(destination: Path, url: str = VGG16_URL, timeout_s: float = DOWNLOAD_TIMEOUT_S) -> None:
    """Fetch the VGG16 file to ``destination`` as torchvision does (``download_checked``)."""
    download_checked(url, destination, VGG16_SHA256_PREFIX, timeout_s)


def _fetch_into_cache(path: Path) -> str | None:
    """Try to download the VGG16 file to ``path``; None on success, else why it is not there."""
    if is_offline():
        names = " / ".join(f"{n}=1" for n in OFFLINE_VARIABLES)
        return f"not downloaded: offline mode ({names})"
    print(f"Downloading the LPIPS VGG16 backbone {VGG16_URL} to {path}", file=sys.stderr)
    try:
        download_vgg16(path, VGG16_URL)  # looked up at call time (tests point it at a local file)
    except (OSError, RuntimeError) as exc:  # URLError and timeouts are OSErrors; a hash mismatch a RuntimeError
        return f"download from {VGG16_URL} failed: {exc}"
    return None


def _where_it_goes() -> str:
    return (
        f"get torchvision's ImageNet VGG16 file '{VGG16_FILE}' ({VGG16_URL}) and either "
        f'set `lpips_weights = "/path/to/{VGG16_FILE}"` in the [loss] table of the run file (key loss.lpips_weights), '
        f"or put it at {hub_cache_path()} (the torch hub cache; set TORCH_HOME to move it)"
    )


def _warn_missing(reason: str) -> None:
    global _missing_warned
    if _missing_warned:
        return
    _missing_warned = True
    warnings.warn(
        f"LPIPS backbone weights not found ({reason}): the perceptual loss and the LPIPS metric are switched off. "
        f"To switch them on, {_where_it_goes()}.",
        UserWarning,
        stacklevel=3,
    )


def _short(keys: Any, limit: int = 8) -> str:
    keys = sorted(keys)
    more = f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def read_weights_only(path: Path, layout: str) -> dict[str, Tensor]:
    """Read a state dict without executing code: safetensors, or torch.load restricted to tensors. ``layout`` names
    the expected network in errors (``"torchvision vgg16"``). Shared by every loader of downloaded weights."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path), device="cpu")
        else:
            with warnings.catch_warnings():
                # torch's note about an unusual pickle protocol; the load either succeeds or is refused below.
                warnings.filterwarnings("ignore", message=r"Detected pickle protocol", category=UserWarning)
                # mmap keeps the ~500 MB classifier of a whole-model file out of memory; it needs the zip format.
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as exc:  # pickle.UnpicklingError (refused object), RuntimeError, OSError, SafetensorError
        raise CheckpointError(
            f"{path}: cannot be read as a weights-only {layout} state dict (arbitrary pickled objects are refused): "
            f"{exc}"
        ) from exc
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors ({layout} layout), got {type(state).__name__}")
    return dict(state)


def _features_only(state: Mapping[str, Tensor], path: Path) -> dict[str, Tensor]:
    """Whole-model keys (``features.*`` + ``classifier.*``) or features-only keys (``0.weight``...) -> features."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("features.") for k in state):
        stray = [k for k in state if not k.startswith(("features.", "classifier."))]
        if stray:
            raise CheckpointError(f"{path}: {_LAYOUT}; unexpected keys: {_short(stray)}")
        return {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
    return dict(state)


def _trunk_mapping(trunk: nn.Module) -> dict[str, str]:
    """lpips trunk key (``slice3.10.weight``) -> torchvision features key (``10.weight``).

    Taken from the built module, so it follows whatever slicing the installed lpips uses.
    """
    return {key: key.split(".", 1)[1] for key in trunk.state_dict()}


def _build_lpips() -> nn.Module:
    import lpips

    with warnings.catch_warnings():
        # lpips still passes torchvision's deprecated `pretrained=` argument; that is not the user's concern.
        warnings.filterwarnings("ignore", message=r".*(pretrained|weight enum).*", category=UserWarning)
        # pretrained=True: the calibrated linear heads, read from files inside the lpips package.
        # pnet_rand=True: torchvision builds vgg16 with weights=None, so no download is attempted.
        return lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)


def load_lpips(weights_path: str | Path | None, device: Any = "cpu", required: bool = False) -> nn.Module | None:
    """The frozen ``lpips.LPIPS`` VGG module with its trunk loaded from a local file, or None if there is none.

    Looks in order at ``weights_path`` (a torchvision vgg16 state dict, whole model or ``features`` only;
    ``.safetensors`` or a torch file read with ``weights_only=True``), then at ``hub_cache_path()``, downloading it
    there when online. A configured ``weights_path`` that does not exist is an error rather than a silent fallback.
    Without any file: one warning and None, or, with ``required`` (``loss.require_perceptual``), a CheckpointError
    that says where the file goes. ``device`` is a torch device, a string, or an xqgan ``Device`` component.

    Raises CheckpointError if the file cannot be read safely or does not match the VGG16 layout.
    """
    if weights_path:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise CheckpointError(f"{path}: LPIPS backbone file (loss.lpips_weights) not found")
    else:
        path = hub_cache_path()
        reason = None if path.is_file() else _fetch_into_cache(path)
        if reason is not None:
            if required:
                raise CheckpointError(
                    f"loss.require_perceptual = true, but the LPIPS VGG16 backbone file is missing ({reason}). "
                    f"Before training, {_where_it_goes()}."
                )
            _warn_missing(reason)
            return None

    features = _features_only(read_weights_only(path, "torchvision vgg16"), path)
    module = _build_lpips()
    trunk: nn.Module = module.net
    mapping = _trunk_mapping(trunk)
    expected = {tv_key: trunk.state_dict()[lp_key].shape for lp_key, tv_key in mapping.items()}
    # features.30 is VGG's last max-pool (no parameters); any other key unknown to the trunk is a different net.
    missing = set(expected) - set(features)
    unexpected = set(features) - set(expected)
    if missing or unexpected:
        parts = [f"missing keys: {_short(missing)}"] if missing else []
        parts += [f"unexpected keys: {_short(unexpected)}"] if unexpected else []
        raise CheckpointError(f"{path}: {_LAYOUT}; " + "; ".join(parts))
    bad_shapes = [
        f"{k} {tuple(features[k].shape)} != {tuple(shape)}" for k, shape in expected.items() if features[k].shape != shape
    ]
    if bad_shapes:
        raise CheckpointError(f"{path}: {_LAYOUT}; mismatched shapes: {_short(bad_shapes)}")
    trunk.load_state_dict({lp_key: features[tv_key] for lp_key, tv_key in mapping.items()}, strict=True)

    module.eval()
    module.requires_grad_(False)
    return module.to(getattr(device, "torch_device", device))


class Perceptual(nn.Module):
    """Per-image LPIPS distance: ``forward(x, y)`` with images (B, 3, H, W) in [-1, 1] -> (B,).

    Differentiable in the images (for the loss), never in its own weights. The wrapped module stays in eval mode
    even when a parent module is switched to training, so its dropout never makes the loss noisy.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.lpips = module
        self.lpips.eval()
        self.lpips.requires_grad_(False)

    def train(self, mode: bool = True) -> Perceptual:
        super().train(mode)
        self.lpips.eval()
        return self

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        if x.shape != y.shape:
            raise ValueError(f"Perceptual: images differ in shape, {tuple(x.shape)} vs {tuple(y.shape)}")
        return self.lpips(x, y).reshape(x.shape[0])
