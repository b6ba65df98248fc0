"""Convert released checkpoints of the XQ-GAN reference code (lxa9867/ImageFolder, ``qiuk6/XQ-GAN`` on the hub)
into xqgan run folders: the ViT (SC) tokenizers MSVR10P2, MSBR10P2 and VP2.

A reference checkpoint is a torch file ``{"model": state_dict, "ema": state_dict, "args": argparse.Namespace,
...optimizer / discriminator states}``, read through :func:`xqgan_core.convert.read_foreign_checkpoint` (no pickled
code runs). Its ``args`` decide the architecture: the run file starts from the matching SC preset in ``configs/``
(multi-scale VQ: MSVR10P2, multi-scale LFQ/BSQ: MSBR10P2, one scale: VP2) with the sizes, scales and codebook of
the checkpoint written over it, and ``init = ""`` (the weights come from the file, never from DINOv2).

How the reference's modules map onto ours (checked numerically: ``tests/test_parity_reference.py``):

* ``encoder.model.*`` (its timm DINOv2 ViT re-patched to 16 px) -> ``encoder.trunk.*``; ``latent_tokens`` ->
  ``latent_queries``; ``lvl_embed`` -> ``level_embed``. The reference resamples the position embedding to the
  K x K query grid on every forward (bicubic, antialiased), as our encoder does.
* ``quant_conv`` / ``post_quant_conv`` (1x1 convolutions over the token axis) -> ``encoder.project`` /
  ``decoder.project_in`` (the same matrices as linear maps).
* ``quantizes.{i}`` (one per product branch) -> ``quantizer.branches.{i}`` (``quantize`` -> ``quantizer`` without
  product quantization): its codebook -> ``code.embedding`` (VQ), its ``quant_resi`` convs -> ``phi``.
* ``decoder.model.*`` -> ``decoder.trunk.*``; ``mask_token``; ``lvl_embed`` -> ``level_embed``;
  ``to_pixel.model`` -> ``to_pixels``.
* dropped: the level-index buffers ``lvl1LC`` (constants of the architecture), the usage statistics
  ``ema_vocab_hit_SV``, the LFQ ``scaler`` (checked to be the BSQ/LFQ code value first), and the training-only
  teachers and heads ``semantic_model``, ``detail_model``, ``sem_linear``.

Inference is what must match (and does: indices exactly, images to ~3e-6, ViT-B). Training options the reference
does not store keep the preset's conventions (e.g. the commitment averaged over scales, see the preset's header);
the multi-scale VQ is set to search by cosine whatever ``codebook_l2_norm`` says, as the reference's always does.

Refused with an error naming the cause: LoRA-wrapped (peft) weights, ``abs_pos_embed = False`` (learned latent
position embeddings instead of the resampled ViT ones), CNN backbones, DINOv2 with registers or giant trunks, an
image size other than 256, LFQ code scales other than 1, and any key no rule knows.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch

from . import checkpoint as ckpt
from .convert import (
    _check_fits,
    _expected_shapes,
    _listing,
    _rename,
    _run_name_for,
    _sha256,
    read_conversion_source,
)
from .errors import CheckpointError
from .registry import Registry

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "PRESETS",
    "REFERENCE_RULES",
    "convert_reference",
    "from_reference_keys",
    "looks_like_reference_checkpoint",
    "reference_run_config",
    "to_reference_keys",
]

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
PRESETS = {
    "multiscale-vq": CONFIGS / "xqgan-sc-msvr10p2-4096.toml",
    "multiscale-binary": CONFIGS / "xqgan-sc-msbr10p2-16384.toml",
    "single-scale-vq": CONFIGS / "xqgan-sc-vp2-16384.toml",
}

# The reference's DINOv2 trunks by timm name stem: (width, depth, heads). Giant (SwiGLU MLP) and the register
# variants have no counterpart in our trunk.
_TRUNKS = {
    "vit_small_patch14_dinov2": (384, 12, 6),
    "vit_base_patch14_dinov2": (768, 12, 12),
    "vit_large_patch14_dinov2": (1024, 24, 16),
}

# Reference key (regex with named groups) -> ours. {q} is the quantizer prefix: "quantizes.{i}." with product
# quantization, "quantize." without; it becomes "quantizer.branches.{i}." / "quantizer.".
REFERENCE_RULES: tuple[tuple[str, str], ...] = (
    (r"encoder\.model\.(?P<rest>.+)", "encoder.trunk.{rest}"),
    (r"encoder\.latent_tokens", "encoder.latent_queries"),
    (r"encoder\.lvl_embed\.weight", "encoder.level_embed.weight"),
    (r"quant_conv\.(?P<p>weight|bias)", "encoder.project.{p}"),
    (r"post_quant_conv\.(?P<p>weight|bias)", "decoder.project_in.{p}"),
    (r"(?P<q>quantizes\.\d+\.|quantize\.)embedding\.weight", "{q}embedding.weight"),
    (r"(?P<q>quantizes\.\d+\.|quantize\.)quant_resi\.qresi_ls\.(?P<k>\d+)\.(?P<p>weight|bias)", "{q}phi.{k}.{p}"),
    (r"(?P<q>quantizes\.\d+\.|quantize\.)quant_resi\.qresi\.(?P<p>weight|bias)", "{q}phi.0.{p}"),
    (r"(?P<q>quantizes\.\d+\.|quantize\.)quant_resi\.(?P<k>\d+)\.(?P<p>weight|bias)", "{q}phi.{k}.{p}"),
    (r"decoder\.model\.(?P<rest>.+)", "decoder.trunk.{rest}"),
    (r"decoder\.mask_token", "decoder.mask_token"),
    (r"decoder\.lvl_embed\.weight", "decoder.level_embed.weight"),
    (r"decoder\.to_pixel\.model\.(?P<p>weight|bias)", "decoder.to_pixels.{p}"),
)
_RULES = [(re.compile(src), dst) for src, dst in REFERENCE_RULES]

# Dropped on purpose (see the module doc).
_IGNORED = re.compile(
    r"(encoder|decoder)\.lvl1LC"
    r"|(quantizes\.\d+\.|quantize\.)(ema_vocab_hit_SV|scaler|codebook_used)"
    r"|(semantic_model|detail_model|sem_linear)\..+"
)
# What peft leaves in the keys of a LoRA-wrapped module.
_PEFT = re.compile(r"\.base_model\.model\.|\.lora_[AB]\.|\.lora_embedding_|\.base_layer\.|\.modules_to_save\.")
# 1x1 convolutions that are linear maps in our modules.
_SQUEEZED = ("encoder.project.weight", "decoder.project_in.weight")

_WEIGHT_ENTRIES = ("ema", "model")
_TRAINING_ONLY = frozenset({"optimizer", "discriminator", "optimizer_disc", "steps", "args", "epoch"})


# Ours -> the reference's keys (the inverse of REFERENCE_RULES for the layouts we write; PhiPartiallyShared's
# "qresi_ls" for the phi convs): for exporting and for tests that need a reference-format file of any size.
_BACKWARD = [
    (re.compile(src), dst)
    for src, dst in (
        (r"encoder\.trunk\.(?P<rest>.+)", "encoder.model.{rest}"),
        (r"encoder\.latent_queries", "encoder.latent_tokens"),
        (r"encoder\.level_embed\.weight", "encoder.lvl_embed.weight"),
        (r"encoder\.project\.(?P<p>weight|bias)", "quant_conv.{p}"),
        (r"decoder\.project_in\.(?P<p>weight|bias)", "post_quant_conv.{p}"),
        (r"quantizer\.branches\.(?P<i>\d+)\.(code\.)?embedding\.weight", "quantizes.{i}.embedding.weight"),
        (r"quantizer\.(code\.)?embedding\.weight", "quantize.embedding.weight"),
        (r"quantizer\.branches\.(?P<i>\d+)\.phi\.(?P<k>\d+)\.(?P<p>weight|bias)",
         "quantizes.{i}.quant_resi.qresi_ls.{k}.{p}"),
        (r"quantizer\.phi\.(?P<k>\d+)\.(?P<p>weight|bias)", "quantize.quant_resi.qresi_ls.{k}.{p}"),
        (r"decoder\.trunk\.(?P<rest>.+)", "decoder.model.{rest}"),
        (r"decoder\.mask_token", "decoder.mask_token"),
        (r"decoder\.level_embed\.weight", "decoder.lvl_embed.weight"),
        (r"decoder\.to_pixels\.(?P<p>weight|bias)", "decoder.to_pixel.model.{p}"),
    )
]


def to_reference_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our TokenizerModel's state dict (a vit / pq / msrq or vq run) in the reference's layout: renamed, the
    projections as 1x1 convolutions; keys the reference has no place for (vq usage counters) are left out."""
    renamed, _ = _rename(state, _BACKWARD)
    out = {}
    for old, new in renamed.items():
        tensor = state[old]
        out[new] = tensor[:, :, None, None] if new in ("quant_conv.weight", "post_quant_conv.weight") else tensor
    return out


def looks_like_reference_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a zip-format torch file whose state dicts name the reference ViT's latent tokens, read
    from the pickle's bytes without unpickling anything (the format sniff of ``Tokenizer.from_pretrained``)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            return bool(pickles) and b"encoder.latent_tokens" in archive.read(pickles[0])
    except (OSError, zipfile.BadZipFile):
        return False


def from_reference_keys(
    state: Mapping[str, torch.Tensor], product_quant: int, source: str = "the reference state dict"
) -> dict[str, torch.Tensor]:
    """A reference ``VQModel`` state dict renamed (and 1x1 convolutions reshaped) to our TokenizerModel's keys."""
    peft = sorted(k for k in state if _PEFT.search(k) or "lora_" in k)
    if peft:
        raise CheckpointError(
            f"{source} holds LoRA-wrapped (peft) weights ({_listing(peft, 3)}): merge the adapters into the base "
            "weights first (peft's merge_and_unload on the reference model, then save its state_dict), then convert"
        )
    renamed, unmatched = _rename(state, _RULES)
    unknown = sorted(k for k in unmatched if not _IGNORED.fullmatch(k))
    if unknown:
        raise CheckpointError(
            f"{source} has {len(unknown)} key(s) the reference ViT tokenizer layout does not have: "
            f"{_listing(unknown)}. Is it an XQ-GAN SC (ViT) checkpoint of lxa9867/ImageFolder?"
        )
    prefix = "quantizer.branches.{i}." if product_quant > 1 else "quantizer."
    out = {}
    for old, new in renamed.items():
        m = re.match(r"quantizes\.(\d+)\.|quantize\.", new)
        if m:
            if (m.group(1) is None) != (product_quant == 1):
                raise CheckpointError(f"{source}: key {old} does not fit args.product_quant = {product_quant}")
            new = prefix.format(i=m.group(1)) + new[m.end():]
        tensor = state[old]
        if new in _SQUEEZED:
            if tensor.ndim != 4 or tensor.shape[2:] != (1, 1):
                raise CheckpointError(f"{source}: {old} must be a 1x1 convolution, got shape {tuple(tensor.shape)}")
            tensor = tensor.reshape(tensor.shape[0], tensor.shape[1])
        out[new] = tensor
    return out


def reference_run_config(args: Any, source: str | Path) -> tuple[dict[str, Any], Path]:
    """The run file (as a TOML dict) for a checkpoint trained with ``args``, and the preset it starts from."""
    arg = _ArgReader(args, source)
    if arg.get("enc_type", "cnn") != "dinov2" or arg.get("dec_type", "cnn") != "dinov2":
        raise CheckpointError(
            f"{source}: args.enc_type = {arg.get('enc_type', 'cnn')!r}, args.dec_type = {arg.get('dec_type', 'cnn')!r}:"
            " only the ViT (dinov2) tokenizers of the reference are supported (XQ-GAN-SC); its CNN tokenizers have "
            "LlamaGen's layout (`xqgan-run convert llamagen`)"
        )
    if not arg.get("abs_pos_embed", False):
        raise CheckpointError(
            f"{source}: args.abs_pos_embed = False (learned latent position embeddings) is not supported: our vit "
            "encoder/decoder give the latent tokens the ViT's position embedding resampled to K x K "
            "(abs_pos_embed = True, as in every released SC tokenizer)"
        )
    for flag in ("use_rope", "cond_latent"):
        if arg.get(flag, False):
            raise CheckpointError(f"{source}: args.{flag} = True is not supported by the vit decoder")
    if int(arg.get("image_size", 256)) != 256:
        raise CheckpointError(
            f"{source}: args.image_size = {arg.get('image_size')}: the reference ViT tokenizer only runs at 256 px "
            "(its level-index buffer assumes 16 x 16 patches)"
        )
    enc = _trunk(arg.get("encoder_model"), "encoder_model", source)
    dec = _trunk(arg.get("decoder_model"), "decoder_model", source)
    p = int(arg.require("product_quant"))
    c = int(arg.require("codebook_embed_dim"))
    v = int(arg.require("codebook_size"))
    scales = [int(s) for s in arg.require("v_patch_nums")]
    k = math.isqrt(int(arg.require("num_latent_tokens")))
    if k * k != int(arg.require("num_latent_tokens")):
        raise CheckpointError(f"{source}: args.num_latent_tokens = {arg.get('num_latent_tokens')} is not a square")
    multiscale = len(scales) > 1
    if multiscale and scales[-1] != k:
        raise CheckpointError(f"{source}: args.v_patch_nums must end at sqrt(num_latent_tokens) = {k}, got {scales}")
    binary = multiscale and bool(arg.get("lfq", False))

    if binary:
        preset = PRESETS["multiscale-binary"]
        if v != 2**c:
            raise CheckpointError(f"{source}: LFQ/BSQ needs codebook_size = 2^codebook_embed_dim, got {v} and {c}")
        spherical = bool(arg.get("codebook_l2_norm", True))
        code: dict[str, Any] = {"use": "bsq" if spherical else "lfq", "bits": c}
        if "entropy_loss_ratio" in arg.values:  # training only: the reference's entropy weight
            code["entropy_weight"] = float(arg.get("entropy_loss_ratio"))
    else:
        preset = PRESETS["multiscale-vq" if multiscale else "single-scale-vq"]
        # the multi-scale VQ searches by cosine whatever codebook_l2_norm says (its using_znorm is never set);
        # the single-scale one follows codebook_l2_norm
        l2 = True if multiscale else bool(arg.get("codebook_l2_norm", True))
        code = {"use": "vq", "codebook_size": v, "dim": c, "l2_norm": l2}
        if not multiscale and "commit_loss_beta" in arg.values:  # training only; the multi-scale VQ keeps 0.25
            code["beta"] = float(arg.get("commit_loss_beta"))
    data = tomllib.loads(preset.read_text(encoding="utf-8"))
    branch = data["quantizer"]["branch"] if data["quantizer"].get("use") == "pq" else data["quantizer"]
    if multiscale:
        branch = dict(branch)
        inner = {k_: v_ for k_, v_ in branch.get("code", {}).items() if k_ == "entropy_weight"}
        branch.update(scales=scales, phi_count=int(arg.get("share_quant_resi", 4)), phi_gamma=0.5,
                      normalize_input=binary and code["use"] == "bsq", code={**inner, **code})
    else:
        branch = {**{k_: v_ for k_, v_ in branch.items() if k_ == "beta"}, **code}
    data["quantizer"] = {"use": "pq", "branches": p, "branch": branch} if p > 1 else branch
    for part, (width, depth, heads) in (("encoder", enc), ("decoder", dec)):
        data[part].update(embed_dim=width, depth=depth, num_heads=heads, init="", image_size=256, patch_size=16)
    data["encoder"].update(latent_size=k, branches=p, out_dim=p * c)
    data["decoder"].update(in_dim=p * c)
    data.setdefault("data", {})["resolution"] = 256
    return data, preset


class _ArgReader:
    """``args`` attributes (argparse.Namespace or a mapping), with errors naming the missing one."""

    def __init__(self, args: Any, source: str | Path) -> None:
        if args is None:
            raise CheckpointError(
                f"{source} has no 'args' (the training script's argparse.Namespace), which says how the tokenizer "
                "was built; a reference checkpoint without it cannot be converted"
            )
        self.values = dict(args) if isinstance(args, Mapping) else vars(args)
        self.source = source

    def get(self, name: str, default: Any = None) -> Any:
        return self.values.get(name, default)

    def require(self, name: str) -> Any:
        if name not in self.values:
            raise CheckpointError(f"{self.source}: its args lack '{name}'")
        return self.values[name]


def _trunk(name: Any, arg: str, source: str | Path) -> tuple[int, int, int]:
    stem = str(name or "").split(".")[0]
    if stem not in _TRUNKS:
        raise CheckpointError(
            f"{source}: args.{arg} = {name!r} is not supported; the vit plugin reproduces "
            f"{', '.join(sorted(_TRUNKS))} (no registers, no giant)"
        )
    return _TRUNKS[stem]


def _check_binary_scaler(state: Mapping[str, torch.Tensor], bits: int, spherical: bool, where: str) -> None:
    """LFQ/BSQ codes are +-scaler[si] per scale; ours are +-1/sqrt(bits) (bsq) or +-1 (lfq) at every scale."""
    value = 1 / math.sqrt(bits) if spherical else 1.0
    for key, tensor in state.items():
        if key.endswith("scaler") and not torch.allclose(tensor.float(), torch.full_like(tensor.float(), value)):
            raise CheckpointError(
                f"{where}: {key} = {tensor.tolist()}: codes scaled per scale (args.scale != 1) are not supported; "
                f"bsq/lfq codes are +-{value:.4g} at every scale"
            )


def convert_reference(
    source: str | Path,
    out_dir: str | Path,
    preset: str | Path | None = None,
    name: str | None = None,
    weights: Literal["ema", "model"] | None = None,
) -> Path:
    """Convert a reference XQ-GAN (ViT) checkpoint into a run folder at ``out_dir``; return the checkpoint folder.

    ``weights``: which state dict becomes the tokenizer's ``model.safetensors``: ``"ema"`` (the default when the file
    has one) or ``"model"``. ``preset``: ignored unless given, then used instead of the preset chosen from the args
    (its encoder/quantizer/decoder sizes are still set from the args). Everything is checked (names and shapes
    against the model the run file builds) before anything is written.
    """
    source, out_dir = Path(source), Path(out_dir)
    data = read_conversion_source(source, out_dir, "reference", _WEIGHT_ENTRIES, _TRAINING_ONLY)
    entry = weights or ("ema" if "ema" in data else "model")
    if entry not in _WEIGHT_ENTRIES:
        raise CheckpointError(f"weights must be 'ema' or 'model', got {entry!r}")
    if entry not in data:
        raise CheckpointError(f"{source} has no '{entry}' weights (it has: {', '.join(map(str, data))})")

    run, chosen = reference_run_config(data.get("args"), source)
    if preset is not None:
        chosen = Path(preset)
        base = tomllib.loads(chosen.read_text(encoding="utf-8"))
        base.update({k: run[k] for k in ("encoder", "quantizer", "decoder")})
        run = base
    run_name = name or _run_name_for(source, prefix="reference")
    registry = Registry.from_dict(run, overrides=[f"run.name={run_name}"], source=str(chosen))

    state = data[entry]
    where = f"{source} ['{entry}']"
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{where} is not a state dict of tensors")
    arg = _ArgReader(data.get("args"), source)
    if arg.get("lfq", False) and len(arg.get("v_patch_nums", [])) > 1:
        _check_binary_scaler(state, int(arg.get("codebook_embed_dim")), bool(arg.get("codebook_l2_norm", True)), where)
    converted = _nest_codes(from_reference_keys(state, int(arg.require("product_quant")), where), registry)
    _check_fits(converted, _expected_shapes(registry), where, chosen)
    meta = {
        "converted_from": {
            "format": "reference", "file": str(source.resolve()), "sha256": _sha256(source), "weights": entry,
            "args": {k: v for k, v in arg.values.items() if isinstance(v, (bool, int, float, str, list, tuple))},
        },
        "preset": str(chosen),
    }
    return ckpt.save_checkpoint(
        out_dir, 0, {"model": converted}, state={}, run_toml=registry.to_toml(with_provenance=True), meta=meta, keep=1
    )


def _nest_codes(state: dict[str, torch.Tensor], registry: Registry) -> dict[str, torch.Tensor]:
    """Multi-scale branches keep their codebook in the nested quantizer (``code.``); single-scale vq branches are
    the vq itself."""
    q = registry.config.quantizer
    branch = q.config.branch if q.use == "pq" else q
    if branch.use != "msrq":
        return state
    nested = re.compile(r"^(quantizer\.(?:branches\.\d+\.)?)embedding\.")
    return {nested.sub(r"\1code.embedding.", k): v for k, v in state.items()}
