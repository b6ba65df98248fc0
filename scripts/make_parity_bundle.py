"""Write a parity bundle (``tests/parity/<name>/``): a foreign model's outputs on fixed inputs with recipe weights.

    python scripts/make_parity_bundle.py reference-msvr --reference-repo /tmp/ref-imagefolder  # with /work/refenv
    python scripts/make_parity_bundle.py llamagen-vq16 --reference-repo /tmp/ref-llamagen       # needs torch only

The foreign code is imported from a work tree the user points to (never committed here) and run on the CPU with
weights drawn by ``xqgan_core.testing.recipe_weights`` from the names and shapes of its own state dict, so our
test (``tests/test_parity_reference.py`` ...) regenerates the same weights from the manifest, converts them with
our real converter and compares. Bundle layout (see ``tests/parity/README.md``)::

    manifest.json         {"source", "model", "seed", "keys", "dtypes", "tolerances", "made_by", ...}
    expected.safetensors  inputs as uint8 images (N, 3, H, W), expected indices (int64, the foreign layout),
                          expected images (float32 in [-1, 1])

Each bundle is one function in ``BUNDLES``; this file needs only torch, numpy, PIL, safetensors and scikit-image
(the sample photos) beside what the foreign code needs: it loads the recipe module by path, so the xqgan package
need not be installed in the environment that runs the foreign code.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

ROOT = Path(__file__).resolve().parent.parent
PARITY = ROOT / "tests" / "parity"
#: sample photos of scikit-image (shipped in its wheel) used as inputs
SAMPLE_PHOTOS = ("astronaut", "coffee")


def _recipe() -> Any:
    """``xqgan_core/testing/recipe_weights.py`` loaded by path (no xqgan package import)."""
    path = ROOT / "xqgan_core" / "testing" / "recipe_weights.py"
    spec = importlib.util.spec_from_file_location("_recipe_weights", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sample_images(size: int, names: tuple[str, ...] = SAMPLE_PHOTOS) -> Tensor:
    """``(N, 3, size, size)`` uint8: the centre square of each photo, resized (bicubic) to ``size``."""
    import skimage.data

    out = []
    for name in names:
        img = Image.fromarray(np.asarray(getattr(skimage.data, name)())).convert("RGB")
        side = min(img.size)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        img = img.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
        out.append(torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1))
    return torch.stack(out)


def to_model_range(images: Tensor) -> Tensor:
    """uint8 -> float32 in [-1, 1] as ``x / 127.5 - 1`` (xqgan's ``images.to_tensor`` and the reference's
    Normalize(0.5, 0.5) of ToTensor agree on it)."""
    return images.float() / 127.5 - 1.0


def _shapes_and_dtypes(state: dict[str, Tensor]) -> tuple[dict[str, list[int]], dict[str, str]]:
    keys = {k: list(v.shape) for k, v in state.items()}
    dtypes = {k: str(v.dtype).removeprefix("torch.") for k, v in state.items() if not v.dtype.is_floating_point}
    return keys, dtypes


def _write(name: str, manifest: dict[str, Any], tensors: dict[str, Tensor], out: Path | None) -> Path:
    from safetensors.torch import save_file

    folder = out or PARITY / name
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "expected.safetensors"))
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return folder


def _git_commit(repo: Path, given: str | None) -> str:
    if given:
        return given
    try:
        return subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        marker = repo / ".commit"
        return marker.read_text().strip() if marker.is_file() else "unknown (pass --reference-commit)"


# ----------------------------------------------------------------------------------------------------------------
# reference-*: the reference XQ-GAN code's ViT (SC) tokenizers: MSVR10P2 (committed), MSBR10P2 and VP2 layouts

#: name -> (quantizer described, ModelArgs overrides of the MSVR10P2 defaults in scripts/reference_models.py)
REFERENCE_LAYOUTS: dict[str, tuple[str, dict[str, Any]]] = {
    "reference-msvr": ("MSVR10P2-4096: 2 branches x 10-scale residual VQ, 4096 codes of dim 32", {}),
    "reference-msbr": ("MSBR10P2-16384: 2 branches x 10-scale residual BSQ, 14 bits",
                       {"lfq": True, "codebook_size": 16384, "codebook_embed_dim": 14}),
    "reference-vp2": ("VP2-16384: 2 branches x one 16 x 16 VQ, 16384 codes of dim 32",
                      {"v_patch_nums": [16], "num_latent_tokens": 256, "codebook_size": 16384}),
}


def _reference_index_margin(ref: Any, model: Any, x: Tensor) -> float:
    """The smallest gap behind any of the reference's code choices on ``x``: best minus second-best cosine (VQ), or
    the smallest |coordinate| of a searched residual (LFQ/BSQ signs). Rounding differences below it cannot flip an
    index, so it says how much the exact index check tolerates."""
    import torch.nn.functional as F

    gaps = []
    multiscale = len(model.v_patch_nums) > 1
    for q, f in zip(ref._quantizers(model), ref._branch_latents(model, x)):
        binary = not hasattr(q, "embedding")
        if binary and q.using_znorm:
            f = F.normalize(f, dim=1)
        f_hats = q.f_to_idxBl_or_fhat(f, to_fhat=True, v_patch_nums=model.v_patch_nums if multiscale else None)
        for k, pn in enumerate(model.v_patch_nums if multiscale else [f.shape[-1]]):
            rest = f if k == 0 or not multiscale else f - f_hats[k - 1]
            rest = F.interpolate(rest, size=(pn, pn), mode="area").permute(0, 2, 3, 1).reshape(-1, f.shape[1])
            if binary:
                gaps.append(rest.abs().min())
            else:
                top2 = (F.normalize(rest, dim=1) @ F.normalize(q.embedding.weight, dim=1).t()).topk(2, dim=1).values
                gaps.append((top2[:, 0] - top2[:, 1]).min())
    return float(min(gaps))


def make_reference(name: str, repo: Path, seed: int, size: str, commit: str | None, out: Path | None) -> Path:
    """The reference's ``VQModel`` (DINOv2-style ViT-``size`` encoder/decoder, the quantizer of ``name`` in
    :data:`REFERENCE_LAYOUTS`) with recipe weights; its encoder's latents, every branch's indices per scale
    (``f_to_idxBl_or_fhat``) and its reconstructions (``img_to_reconstructed_img``)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import reference_models as ref

    quantizer, overrides = REFERENCE_LAYOUTS[name]
    recipe = _recipe()
    model = ref.build_reference_vit_tokenizer(repo, size=size, **overrides)
    own = model.state_dict()
    constants = {k: v.tolist() for k, v in own.items() if ref.is_constant(k)}  # written as they are, not drawn
    keys, dtypes = _shapes_and_dtypes({k: v for k, v in own.items() if k not in constants})
    weights = recipe.recipe_state_dict(keys, seed, {k: getattr(torch, d) for k, d in dtypes.items()})
    ref.load_reference_state(model, weights)
    model.eval()

    images = sample_images(256)
    x = to_model_range(images)
    with torch.no_grad():
        latents = torch.cat(ref._branch_latents(model, x), dim=1)  # (N, P*C, K, K), branch-major channel groups
        indices = ref.encode_indices(model, x)
        recon = ref.reconstruct(model, x)
        margin = _reference_index_margin(ref, model, x)
    tensors: dict[str, Tensor] = {"images": images, "latents": latents.float(), "reconstructions": recon.float()}
    for b, per_scale in enumerate(indices):
        for s, idx in enumerate(per_scale):
            tensors[f"indices.branch{b}.scale{s}"] = idx.long()
    args = ref.reference_model_args(size, **overrides)
    manifest = {
        "source": {"repo": "https://github.com/lxa9867/ImageFolder", "commit": _git_commit(repo, commit),
                   "code": "tokenizer/tokenizer_image/xqgan_model.py (VQModel), quant.py, lookup_free_quantize.py, "
                           "dino_enc/"},
        "model": {
            "what": f"reference VQModel, ViT-{size} (DINOv2 layout, 16-px patches, 256 px) encoder and decoder, "
                    f"{quantizer}, semantic/detail guides off, eval mode",
            "args": args,
            "checkpoint_args": {**args, "image_size": 256},
        },
        "seed": seed,
        "keys": keys,
        "dtypes": dtypes,
        "constants": {"what": "buffers set from the args (level indices, LFQ code values): a checkpoint holds them "
                              "as they are", "dtypes": {k: str(own[k].dtype).removeprefix("torch.") for k in constants},
                      "values": constants},
        "inputs": {"images": f"skimage.data {', '.join(SAMPLE_PHOTOS)}: centre square, bicubic to 256, uint8",
                   "scaling": "x / 127.5 - 1"},
        "expected": {
            "latents": "encoder + quant_conv output (N, P*C, K, K), channel group i = branch i",
            "indices.branch{i}.scale{k}": "quantizes[i].f_to_idxBl_or_fhat(..., to_fhat=False)[k]: (N, s*s) int64",
            "reconstructions": "img_to_reconstructed_img(x): (N, 3, 256, 256) float32, clamped to [-1, 1]",
        },
        "tolerances": {"latents_max_abs": 1e-4, "images_max_abs": 1e-4, "indices": "exact"},
        "notes": {
            "index_margin": margin,
            "distinct_indices_last_scale": [int(per_scale[-1].unique().numel()) for per_scale in indices],
            "reconstructions_saturated": float((recon.abs() >= 1).float().mean()),
        },
        "made_by": f"scripts/make_parity_bundle.py {name} --reference-repo PATH --size {size}",
    }
    return _write(name, manifest, tensors, out)


# ----------------------------------------------------------------------------------------------------------------
# llamagen-vq16: LlamaGen's VQ-16 CNN tokenizer (the layout of its released vq_ds16_c2i.pt and of our XQ-GAN-V preset)

#: the CNN is size-agnostic: 128 px (8 x 8 tokens per photo) keeps the parity test fast
LLAMAGEN_VQ16_SIZE = 128


def make_llamagen_vq16(repo: Path, seed: int, size: str, commit: str | None, out: Path | None) -> Path:
    """LlamaGen's own ``VQ_models["VQ-16"]()`` (``tokenizer/tokenizer_image/vq_model.py``: codebook 16384 x 8,
    l2-normalised) with recipe weights: the latents its quantizer sees, the codes it picks and the images its
    ``decode_code`` makes from them. ``size`` (a ViT size) does not apply."""
    del size
    path = repo / "tokenizer" / "tokenizer_image" / "vq_model.py"
    if not path.is_file():
        raise SystemExit(f"{path}: no such file; --reference-repo must be a work tree of FoundationVision/LlamaGen "
                         "(its tokenizer/ folder is enough: git -C MIRROR archive HEAD tokenizer | tar -x -C DIR)")
    spec = importlib.util.spec_from_file_location("_llamagen_vq_model", path)  # the file alone needs only torch
    assert spec is not None and spec.loader is not None
    vq_model = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(vq_model)

    model = vq_model.VQ_models["VQ-16"]().eval()
    keys, dtypes = _shapes_and_dtypes(model.state_dict())
    model.load_state_dict(_recipe().recipe_state_dict(keys, seed, {k: getattr(torch, d) for k, d in dtypes.items()}))

    images = sample_images(LLAMAGEN_VQ16_SIZE)
    with torch.no_grad():
        latents = model.quant_conv(model.encoder(to_model_range(images)))
        _, _, (_, _, indices) = model.quantize(latents)
        n, c, h, w = latents.shape
        decoded = model.decode_code(indices, shape=(n, c, h, w))
        # the smallest gap between a token's best and second-best cosine: the noise the exact index check absorbs
        cosines = F.normalize(latents.permute(0, 2, 3, 1).reshape(-1, c), dim=1) @ F.normalize(
            model.quantize.embedding.weight, dim=1).t()
        top2 = cosines.topk(2, dim=1).values
    manifest = {
        "source": {"repo": "https://github.com/FoundationVision/LlamaGen", "commit": _git_commit(repo, commit),
                   "code": "tokenizer/tokenizer_image/vq_model.py (VQ_models['VQ-16'])"},
        "model": {"what": "LlamaGen VQModel VQ-16 (ModelArgs defaults), eval mode", "args": asdict(model.config)},
        "seed": seed,
        "keys": keys,
        "dtypes": dtypes,
        "inputs": {"images": f"skimage.data {', '.join(SAMPLE_PHOTOS)}: centre square, bicubic to "
                             f"{LLAMAGEN_VQ16_SIZE}, uint8", "scaling": "x / 127.5 - 1"},
        "expected": {
            "latents": "quant_conv(encoder(x)): (N, 8, h, w), the quantizer's input",
            "indices": "quantize(latents) min_encoding_indices: (N*h*w,) int64, flat in (n, y, x) order",
            "decoded": "decode_code(indices): (N, 3, H, W) float32, the decoder output as is (not clamped)",
        },
        "tolerances": {"latents_max_abs": 1e-4, "images_max_abs": 1e-4, "indices": "exact"},
        "notes": {"tokens": indices.numel(), "distinct_indices": int(indices.unique().numel()),
                  "index_margin": float((top2[:, 0] - top2[:, 1]).min()),
                  "decoded_range": [float(decoded.min()), float(decoded.max())]},
        "made_by": "scripts/make_parity_bundle.py llamagen-vq16 --reference-repo PATH",
    }
    tensors = {"images": images, "latents": latents, "indices": indices, "decoded": decoded}
    return _write("llamagen-vq16", manifest, tensors, out)


# ----------------------------------------------------------------------------------------------------------------
# reference-stylegan-maskgit: the reference's (and LlamaGen's) MaskGIT-style StyleGAN discriminator

#: 16 px: two down blocks at the reference's fixed 512 channels (21 M parameters), a fast test
STYLEGAN_MASKGIT_SIZE = 16


def make_reference_stylegan_maskgit(repo: Path, seed: int, size: str, commit: str | None, out: Path | None) -> Path:
    """The reference's ``discriminator_stylegan.Discriminator(image_size=16)`` (needs kornia) with recipe weights,
    except its fixed [1,2,1] blur taps, and its logits for the sample photos. ``size`` does not apply."""
    del size
    path = repo / "tokenizer" / "tokenizer_image" / "discriminator_stylegan.py"
    if not path.is_file():
        raise SystemExit(f"{path}: no such file; --reference-repo must be a work tree of lxa9867/ImageFolder")
    spec = importlib.util.spec_from_file_location("_reference_stylegan", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "filter2d"):
        raise SystemExit("the reference's StyleGAN discriminator needs kornia: pip install kornia")

    model = module.Discriminator(image_size=STYLEGAN_MASKGIT_SIZE).eval()
    own = model.state_dict()
    blur_taps = {k: v.clone() for k, v in own.items() if k.endswith("downsample.0.f")}  # written as they are
    keys, dtypes = _shapes_and_dtypes({k: v for k, v in own.items() if k not in blur_taps})
    weights = _recipe().recipe_state_dict(keys, seed, {k: getattr(torch, d) for k, d in dtypes.items()})
    model.load_state_dict({**weights, **blur_taps})
    images = sample_images(STYLEGAN_MASKGIT_SIZE)
    with torch.no_grad():
        logits = model(to_model_range(images))
    manifest = {
        "source": {"repo": "https://github.com/lxa9867/ImageFolder", "commit": _git_commit(repo, commit),
                   "code": "tokenizer/tokenizer_image/discriminator_stylegan.py (Discriminator)"},
        "model": {"what": "reference MaskGIT-style StyleGAN discriminator, eval mode",
                  "args": {"image_size": STYLEGAN_MASKGIT_SIZE, "input_nc": 3, "channel_multiplier": 1},
                  "parameters": sum(p.numel() for p in model.parameters()),
                  "parameters_at_256": sum(p.numel() for p in module.Discriminator(image_size=256).parameters())},
        "seed": seed,
        "keys": keys,
        "dtypes": dtypes,
        "constants": {"what": "the [1,2,1] blur taps, a buffer set by the constructor", "values":
                      {k: v.tolist() for k, v in blur_taps.items()},
                      "dtypes": {k: str(v.dtype).removeprefix("torch.") for k, v in blur_taps.items()}},
        "inputs": {"images": f"skimage.data {', '.join(SAMPLE_PHOTOS)}: centre square, bicubic to "
                             f"{STYLEGAN_MASKGIT_SIZE}, uint8", "scaling": "x / 127.5 - 1"},
        "expected": {"logits": "Discriminator(x): (N, 1) float32"},
        "tolerances": {"logits_max_abs": 1e-5},
        "made_by": "scripts/make_parity_bundle.py reference-stylegan-maskgit --reference-repo PATH",
    }
    return _write("reference-stylegan-maskgit", manifest, {"images": images, "logits": logits}, out)


# ----------------------------------------------------------------------------------------------------------------
# reference-dino-disc: the reference's DINO discriminator (VAR's DinoDisc: frozen DINO ViT-S/16 + 5 heads)


def make_reference_dino_disc(repo: Path, seed: int, size: str, commit: str | None, out: Path | None) -> Path:
    """The reference's ``discriminator_dino.DinoDisc`` built by its own constructor, its DINO download answered with
    recipe weights, its heads then given recipe weights too; its logits for the sample photos at 224 px in eval
    mode (no random crop at 224). Needs the repository root on the path (``dist.py``) and torchvision. ``size``
    does not apply."""
    del size
    folder = repo / "tokenizer" / "tokenizer_image"
    if not (folder / "discriminator_dino.py").is_file() or not (repo / "dist.py").is_file():
        raise SystemExit(f"{folder}/discriminator_dino.py or {repo}/dist.py missing: --reference-repo must be a "
                         "work tree of lxa9867/ImageFolder")
    sys.path[:0] = [str(repo), str(folder)]
    import discriminator_dino as ref  # the foreign module, from the work tree

    recipe = _recipe()
    trunk_keys, trunk_dtypes = _shapes_and_dtypes(
        {k: v for k, v in ref.FrozenDINOSmallNoDrop().state_dict().items() if not k.startswith("x_")})
    # drawn under the manifest's names (``trunk.*``, ``heads.*``): the recipe seeds each tensor by its key
    download = {k.removeprefix("trunk."): v for k, v in
                recipe.recipe_state_dict({f"trunk.{k}": v for k, v in trunk_keys.items()}, seed).items()}
    original = torch.hub.load_state_dict_from_url
    torch.hub.load_state_dict_from_url = lambda *a, **k: {name: v.clone() for name, v in download.items()}
    try:
        model = ref.DinoDisc(device="cpu").eval()
    finally:
        torch.hub.load_state_dict_from_url = original
    head_keys, head_dtypes = _shapes_and_dtypes(model.heads.state_dict())
    model.heads.load_state_dict({k.removeprefix("heads."): v for k, v in
                                 recipe.recipe_state_dict({f"heads.{k}": v for k, v in head_keys.items()}, seed).items()})
    images = sample_images(224)
    with torch.no_grad():
        logits = model(to_model_range(images))
    keys = {**{f"trunk.{k}": v for k, v in trunk_keys.items()}, **{f"heads.{k}": v for k, v in head_keys.items()}}
    manifest = {
        "source": {"repo": "https://github.com/lxa9867/ImageFolder", "commit": _git_commit(repo, commit),
                   "code": "tokenizer/tokenizer_image/discriminator_dino.py (DinoDisc, FrozenDINOSmallNoDrop)"},
        "model": {"what": "reference DinoDisc (DINO ViT-S/16 trunk, heads on patch embedding + blocks 2, 5, 8, 11, "
                          "kernel 9, local batch norm 'bn', spectral norm), eval mode, 224 px input",
                  "args": {"ks": 9, "depth": 12, "key_depths": [2, 5, 8, 11], "norm_type": "bn", "norm_eps": 1e-6,
                           "using_spec_norm": True},
                  "head_parameters": sum(p.numel() for p in model.heads.parameters())},
        "seed": seed,
        "keys": keys,
        "dtypes": {**{f"trunk.{k}": v for k, v in trunk_dtypes.items()},
                   **{f"heads.{k}": v for k, v in head_dtypes.items()}},
        "weights": "trunk.*: the state dict its DINO download returns (timm ViT key names; it zeroes the key bias, "
                   "which does not change attention); heads.*: its heads' state dict",
        "inputs": {"images": f"skimage.data {', '.join(SAMPLE_PHOTOS)}: centre square, bicubic to 224, uint8",
                   "scaling": "x / 127.5 - 1"},
        "expected": {"logits": "DinoDisc(x): (N, 5 * 196) float32"},
        "tolerances": {"logits_max_abs": 1e-3},
        "notes": {"gelu": "the reference's ViT blocks use the tanh approximation of GELU, timm's (and DINO's) the "
                          "exact one: compare with tanh GELU swapped in for an exact architecture check"},
        "made_by": "scripts/make_parity_bundle.py reference-dino-disc --reference-repo PATH",
    }
    return _write("reference-dino-disc", manifest, {"images": images, "logits": logits}, out)


# name -> maker(repo, seed, size, commit, out); one function per foreign model
BUNDLES: dict[str, Callable[..., Path]] = {
    **{name: functools.partial(make_reference, name) for name in REFERENCE_LAYOUTS},
    "llamagen-vq16": make_llamagen_vq16,
    "reference-stylegan-maskgit": make_reference_stylegan_maskgit,
    "reference-dino-disc": make_reference_dino_disc,
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("name", choices=sorted(BUNDLES))
    p.add_argument("--reference-repo", required=True, type=Path, help="work tree of the foreign code base")
    p.add_argument("--reference-commit", default=None, help="its commit, when the work tree is not a git checkout")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", default="B", help="ViT size for the reference bundles (S, B)")
    p.add_argument("--out", type=Path, default=None, help="bundle folder (default: tests/parity/<name>)")
    ns = p.parse_args(argv)
    torch.manual_seed(ns.seed)
    started = time.perf_counter()
    folder = BUNDLES[ns.name](ns.reference_repo, ns.seed, ns.size, ns.reference_commit, ns.out)
    print(f"wrote {folder} in {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
