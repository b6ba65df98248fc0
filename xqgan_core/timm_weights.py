"""Loading timm ViT weights (a trunk to train, a frozen teacher, a discriminator's feature network): from a local
file or a timm model name through the Hugging Face cache. Shared by every plugin built on timm ViTs; needs timm
(``xqgan-core[timm]``).

Pickled code is never executed: ``.pt`` / ``.pth`` files are read with ``torch.load(weights_only=True)``. The file's
patch embedding and position embedding are resampled to the trunk's patch size and grid by timm's own checkpoint
filter (``resample_patch_embed`` / ``resample_abs_pos_embed``, as timm does when it loads pretrained weights).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from timm.models import get_pretrained_cfg
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import Tensor

from xqgan_core.errors import ConfigError

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth")
#: ``init = "dinov2"``: the DINOv2 (LVD-142M) checkpoint whose width matches ``embed_dim``
DINOV2_BY_WIDTH = {
    384: "vit_small_patch14_dinov2.lvd142m",
    768: "vit_base_patch14_dinov2.lvd142m",
    1024: "vit_large_patch14_dinov2.lvd142m",
}


def load_trunk_weights(trunk: VisionTransformer, init: str, key: str, skip: tuple[str, ...] = ()) -> None:
    """Fill ``trunk`` from ``init`` ('' = keep the random init). ``key`` names the option in errors (``encoder.init``);
    parameters whose names start with one of ``skip`` are neither loaded nor required (the decoder's patch_embed)."""
    if not init:
        return
    path = Path(init).expanduser()
    if path.suffix in WEIGHT_SUFFIXES or path.exists():
        state = read_state_dict(path, key)
    else:
        state = read_state_dict(cached_hub_file(resolve_name(init, trunk.embed_dim, key), key), key)
    state = checkpoint_filter_fn(state, trunk)
    state = {k: v for k, v in state.items() if not k.startswith(("head.", "fc_norm.", *skip))}
    try:
        missing, unexpected = trunk.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches: the file's architecture differs from the options
        raise ConfigError([f"{key} = {init!r}: the weights do not fit the trunk's options ({e})"]) from e
    missing = [k for k in missing if not k.startswith(skip)]
    if missing or unexpected:
        raise ConfigError([
            f"{key} = {init!r}: the weights do not fit the trunk's options (embed_dim, depth, num_heads, layer_scale): "
            f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
        ])


def read_state_dict(path: Path, key: str) -> dict[str, Tensor]:
    if not path.is_file():
        raise ConfigError([f"{key}: weights file {str(path)!r} does not exist"])
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling refused or unreadable: say which file
        raise ConfigError([f"{key}: cannot read {str(path)!r} as plain tensors (weights_only=True): {e}"]) from e
    if isinstance(state, dict):
        for wrapper in ("model", "state_dict"):  # common checkpoint wrappers
            if isinstance(state.get(wrapper), dict):
                state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ConfigError([f"{key}: {str(path)!r} does not hold a state dict of tensors"])
    return state


def resolve_name(name: str, embed_dim: int, key: str) -> str:
    if name == "dinov2":
        if embed_dim not in DINOV2_BY_WIDTH:
            raise ConfigError([f"{key} = 'dinov2' needs embed_dim 384, 768 or 1024 (S/B/L), got {embed_dim}"])
        return DINOV2_BY_WIDTH[embed_dim]
    return name


def cached_hub_file(name: str, key: str) -> Path:
    """The weights file of timm model ``name`` in the Hugging Face cache (downloaded there when online)."""
    from huggingface_hub import constants, hf_hub_download

    cfg = get_pretrained_cfg(name)
    if cfg is None or not cfg.hf_hub_id:
        raise ConfigError([
            f"{key} = {name!r} is neither an existing file ({', '.join(WEIGHT_SUFFIXES)}) nor a timm model name "
            f"with weights on the Hugging Face hub (e.g. 'vit_base_patch14_dinov2.lvd142m' or 'dinov2')"
        ])
    repo, filename = cfg.hf_hub_id, cfg.hf_hub_filename or "model.safetensors"
    try:
        return Path(hf_hub_download(repo, filename))
    except Exception as e:  # noqa: BLE001 - offline without a cached copy, no network, missing file
        where = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}"
        offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
        raise ConfigError([
            f"{key} = {name!r}: no weights at {where} ({repo}/{filename}){offline} and they could not be "
            f"downloaded: {type(e).__name__}. Download them on a machine with network access into that cache, "
            f"or set {key} to a local .safetensors file"
        ]) from e
