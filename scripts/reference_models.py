"""Build the reference XQ-GAN code's ViT tokenizer (lxa9867/ImageFolder, ``tokenizer/tokenizer_image``) on a CPU.

For parity bundles (``scripts/make_parity_bundle.py``) and side-by-side benchmarks only: nothing in the xqgan
package or its tests imports this file, and the reference code is never copied into this repository. Point it at a
work tree of the reference repository you checked out yourself, e.g.::

    git -C /work/.mirror/lxa9867+ImageFolder/repo archive HEAD | tar -x -C /tmp/ref-imagefolder

and run it with an environment that has what the reference needs (torch, timm 1.0.9, peft, einops), e.g.
``/work/refenv/bin/python``.

Workarounds applied (the reference assumes CUDA, DDP, network access and webdataset):

* its repository-level ``datasets`` package (which imports webdataset, and shadows Hugging Face's ``datasets``) is
  replaced by a stub that provides only the two normalisation modules the tokenizer imports;
* ``create_model`` in its DINOv2 wrapper is forced to ``pretrained=False`` (weights come from a state dict);
* the semantic / detail guides (teachers that would be downloaded) are off;
* :func:`ensure_process_group` starts a one-process gloo group, which the reference's training forward needs
  (``all_reduce`` of code hits); encoding / decoding (``encode_indices``, ``decode_indices``) make no dist calls.

Usage::

    from reference_models import build_reference_vit_tokenizer
    model = build_reference_vit_tokenizer("/tmp/ref-imagefolder", size="B")   # MSVR10P2-like, eval mode, CPU
    indices = encode_indices(model, images)        # images in [-1, 1], (B, 3, 256, 256)
    recon = decode_indices(model, indices)         # (B, 3, 256, 256) in [-1, 1]
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "CONSTANT_SUFFIXES",
    "MSVR10P2_ARGS",
    "build_reference_vit_tokenizer",
    "decode_indices",
    "encode_indices",
    "ensure_process_group",
    "import_reference",
    "is_constant",
    "load_reference_state",
    "reference_model_args",
    "reconstruct",
]

#: timm names of the DINOv2 trunks the reference accepts, by our size letter
VIT_NAMES = {
    "S": "vit_small_patch14_dinov2.lvd142m",
    "B": "vit_base_patch14_dinov2.lvd142m",
    "L": "vit_large_patch14_dinov2.lvd142m",
}

#: ModelArgs of the released MSVR10P2-4096 (SC) tokenizer, minus the trunk names and the guides
MSVR10P2_ARGS: dict[str, Any] = {
    "enc_type": "dinov2",
    "dec_type": "dinov2",
    "codebook_size": 4096,
    "codebook_embed_dim": 32,
    "codebook_l2_norm": True,
    "product_quant": 2,
    "num_latent_tokens": 121,
    "v_patch_nums": [1, 1, 2, 3, 3, 4, 5, 6, 8, 11],
    "share_quant_resi": 4,
    "abs_pos_embed": True,
    "codebook_drop": 0.1,
    "start_drop": 3,
    "lfq": False,
}


def import_reference(repo: str | Path) -> types.ModuleType:
    """The reference's ``tokenizer.tokenizer_image.xqgan_model`` module, imported from the work tree ``repo`` with
    the workarounds above (idempotent)."""
    repo = Path(repo).resolve()
    if not (repo / "tokenizer" / "tokenizer_image" / "xqgan_model.py").is_file():
        raise FileNotFoundError(f"{repo} is not a work tree of lxa9867/ImageFolder (no tokenizer/tokenizer_image)")
    if str(repo) not in sys.path:
        sys.path.insert(0, str(repo))  # its top-level `dist`, `tokenizer`, ... packages
    if "datasets" not in sys.modules or getattr(sys.modules["datasets"], "__file__", None) != "<reference-stub>":
        sys.modules["datasets"] = _datasets_stub(repo / "datasets" / "normalize.py")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its ViT file re-registers timm's model names (one warning each)
        from tokenizer.tokenizer_image import xqgan_model  # type: ignore[import-not-found]
        from tokenizer.tokenizer_image.dino_enc import dinov2  # type: ignore[import-not-found]
    if not getattr(dinov2.create_model, "_never_pretrained", False):
        dinov2.create_model = _never_pretrained(dinov2.create_model)
        xqgan_model.create_model = _never_pretrained(xqgan_model.create_model)
    return xqgan_model


def _datasets_stub(normalize_py: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("_reference_datasets_normalize", normalize_py)
    assert spec is not None and spec.loader is not None
    normalize = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(normalize)
    stub = types.ModuleType("datasets")
    stub.__file__ = "<reference-stub>"
    stub.Normalize = normalize.Normalize  # type: ignore[attr-defined]
    stub.Denormalize = normalize.Denormalize  # type: ignore[attr-defined]
    return stub


def _never_pretrained(create_model: Any) -> Any:
    def create(name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
        return create_model(name, pretrained=False, **kwargs)

    create._never_pretrained = True  # type: ignore[attr-defined]
    return create


def reference_model_args(size: str = "B", **overrides: Any) -> dict[str, Any]:
    """MSVR10P2-like ModelArgs for a ViT-``size`` encoder and decoder (S, B or L), guides off, plus ``overrides``."""
    if size not in VIT_NAMES:
        raise ValueError(f"size must be one of {sorted(VIT_NAMES)}, got {size!r}")
    args = {
        **MSVR10P2_ARGS,
        "encoder_model": VIT_NAMES[size],
        "decoder_model": VIT_NAMES[size],
        "semantic_guide": "none",
        "detail_guide": "none",
    }
    args.update(overrides)
    return args


def build_reference_vit_tokenizer(
    repo: str | Path,
    size: str = "B",
    state_dict: Mapping[str, Tensor] | None = None,
    train: bool = False,
    **overrides: Any,
) -> nn.Module:
    """The reference's ``VQModel`` (ViT encoder/decoder, multi-scale product VQ by default) on the CPU.

    ``state_dict``: weights to load (strict except for the constant buffers ``*.lvl1LC`` / ``*.scaler``, which
    keep the module's own values). ``train``: training mode (the training
    forward also needs :func:`ensure_process_group`); eval mode otherwise.
    """
    xm = import_reference(repo)
    args = reference_model_args(size, **overrides)
    model = xm.VQModel(xm.ModelArgs(**args))
    if state_dict is not None:
        load_reference_state(model, state_dict)
    model.train(train)
    return model


#: buffers that are constants of the architecture (set from the constructor's args), not weights: the level
#: indices of the ViT tokens and the LFQ/BSQ code value per scale
CONSTANT_SUFFIXES = ("lvl1LC", "scaler")


def is_constant(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in CONSTANT_SUFFIXES


def load_reference_state(model: nn.Module, state_dict: Mapping[str, Tensor]) -> None:
    """Load the weights into ``model``; its constant buffers (:data:`CONSTANT_SUFFIXES`) keep the model's values."""
    own = model.state_dict()
    weights = {k: v for k, v in state_dict.items() if not is_constant(k)}
    missing = sorted(set(own) - set(weights) - {k for k in own if is_constant(k)})
    unexpected = sorted(set(weights) - set(own))
    if missing or unexpected:
        raise KeyError(f"state dict does not fit the reference model: missing {missing[:5]}, "
                       f"unexpected {unexpected[:5]}")
    model.load_state_dict(weights, strict=False)


def ensure_process_group() -> None:
    """A one-process gloo group (the reference's training forward all-reduces code hits and reads the world size)."""
    import torch.distributed as dist

    if dist.is_available() and not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        dist.init_process_group("gloo", rank=0, world_size=1)


def _branch_latents(model: nn.Module, images: Tensor) -> list[Tensor]:
    """The encoder's latents split into the product branches, each ``(B, C, K, K)`` (as the reference's own
    ``img_to_reconstructed_img`` does)."""
    f = model.encode(images)  # (B, C, P*K^2, 1) for the ViT path with PQ
    p = model.product_quant
    if p == 1:
        return [f]
    b, _, length, _ = f.shape
    k = int(round((length // p) ** 0.5))
    return [part.reshape(b, -1, k, k) for part in f.chunk(p, dim=2)]


def _quantizers(model: nn.Module) -> list[nn.Module]:
    return list(model.quantizes) if model.product_quant > 1 else [model.quantize]


@torch.no_grad()
def encode_indices(model: nn.Module, images: Tensor) -> list[list[Tensor]]:
    """``indices[branch][scale]``: ``(B, s*s)`` int64, row-major, the reference's own ``idx_Bl`` layout (one scale
    of 16 x 16 for the single-scale VQ)."""
    v_patch_nums = model.v_patch_nums if len(model.v_patch_nums) > 1 else None
    b = images.shape[0]
    return [
        [idx.reshape(b, -1) for idx in q.f_to_idxBl_or_fhat(f, to_fhat=False, v_patch_nums=v_patch_nums)]
        for q, f in zip(_quantizers(model), _branch_latents(model, images))
    ]


@torch.no_grad()
def reconstruct(model: nn.Module, images: Tensor) -> Tensor:
    """The reference's own reconstruction path (``img_to_reconstructed_img``): encode, quantize every scale,
    decode the full ``f_hat``; clamped to [-1, 1]."""
    return model.img_to_reconstructed_img(images, last_one=True)


@torch.no_grad()
def decode_indices(model: nn.Module, indices: list[list[Tensor]]) -> Tensor:
    """Images from ``indices[branch][scale]`` (``(B, s*s)``) via the reference's ``embed_to_fhat`` + ``fhat_to_img``."""
    f_hats = []
    for q, per_scale in zip(_quantizers(model), indices):
        b = per_scale[0].shape[0]
        codes = []
        for idx in per_scale:
            side = int(round(idx.shape[1] ** 0.5))
            codes.append(q.embedding(idx.view(b, side, side)).permute(0, 3, 1, 2))
        f_hats.append(q.embed_to_fhat(codes, all_to_max_scale=True, last_one=True))
    return model.fhat_to_img(torch.cat(f_hats, dim=1))


if __name__ == "__main__":  # a smoke run: python scripts/reference_models.py REPO [S|B]
    import time

    repo_arg, size_arg = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "S")
    torch.manual_seed(0)
    t0 = time.perf_counter()
    m = build_reference_vit_tokenizer(repo_arg, size=size_arg)
    params = sum(p.numel() for p in m.parameters()) / 1e6
    print(f"built ViT-{size_arg} in {time.perf_counter() - t0:.1f}s, {params:.1f} M params")
    x = torch.rand(1, 3, 256, 256) * 2 - 1
    t0 = time.perf_counter()
    idx = encode_indices(m, x)
    y = decode_indices(m, idx)
    print(f"encode+decode {time.perf_counter() - t0:.1f}s; scales {[i.shape[1] for i in idx[0]]}; "
          f"max |decode(indices) - reconstruct| = {(y - reconstruct(m, x)).abs().max().item():.2e}")
