"""Using a trained tokenizer: load it from a checkpoint, encode images to indices, decode, reconstruct, evaluate.

>>> tok = Tokenizer.from_checkpoint("runs/default")          # out_dir, checkpoint folder, or a file inside it
>>> x = tok.preprocess("photo.jpg").unsqueeze(0)              # (1, 3, R, R) in [-1, 1], R = the run's resolution
>>> indices = tok.encode(x)                                   # e.g. (1, R/8, R/8) int64 for the vq quantizer
>>> images = tok.decode(indices)                              # (1, 3, R, R) in [-1, 1]
>>> seq = tok.encode(x, as_sequence=True)                     # (1, L, K) tokens, laid out by tok.token_layout
>>> images = tok.decode(seq, as_sequence=True)

The model is rebuilt from the checkpoint's own ``run.toml`` (the resolved run file), so the architecture always
matches what was trained; only the tables the tokenizer needs are validated (encoder, quantizer, decoder,
adapters and the engine's plain sections). Device, discriminators, aligners, hooks, the generator and the data
source are training-time choices: a checkpoint trained on an HPU with a PatchGAN loads on a CPU machine that has
neither plugin installed.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from . import checkpoint as ckpt
from .devices import auto_device
from .errors import CheckpointError, ConfigError, ImageReadError, XQGanError
from .evaluation import evaluate
from .images import DEFAULT_MAX_PIXELS, as_rgb, load_rgb, render, square_box, to_tensor
from .interfaces import Device, Indices
from .token_layout import TokenLayout
from .model import TokenizerModel
from .perceptual import Perceptual, load_lpips
from .registry import Registry, build

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["Tokenizer", "reconstruct_files", "evaluate_folder", "OutputExistsError"]

# Run-file tables that only matter while training; left out so inference does not need their plugins.
_TRAINING_ONLY = ("device", "data", "discriminators", "aligners", "hooks", "generator")


class Tokenizer:
    """A trained tokenizer in eval mode on one device. Every method runs under ``torch.no_grad``."""

    def __init__(
        self,
        model: TokenizerModel,
        device: Device,
        resolution: int | None = None,
        *,
        checkpoint: Path | None = None,
        weights: Path | None = None,
        registry: Registry | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.model = model.eval().to(device.torch_device)
        self.device = device
        self.resolution = resolution
        self.checkpoint = checkpoint  # the checkpoint folder it came from (None if built directly)
        self.weights = weights  # the weight file actually loaded: ema.safetensors or model.safetensors
        self.registry = registry  # the checkpoint's run file (tokenizer tables only)
        self.max_pixels = max_pixels  # image files with more pixels are refused (decompression bombs)

    # -- loading -------------------------------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(
        cls, path: str | Path, device: Device | str | torch.device | None = None, use_ema: bool = True
    ) -> Tokenizer:
        """Load a checkpoint folder, a file inside it, or a run's out_dir (its latest checkpoint).

        ``use_ema`` picks ``ema.safetensors`` when the run kept an EMA, else ``model.safetensors`` is used.
        ``device``: an xqgan Device, a name (``"cpu"``, ``"cuda"``, ``"hpu"``), a torch.device, or None for the
        best available one. Raises CheckpointError if nothing loadable is there or the weights do not fit the
        run file's architecture, ConfigError/PluginError if the run file names components that are not installed.
        """
        # a run's out_dir: its newest checkpoint that loads (a damaged one is skipped with a warning)
        return ckpt.load_from(path, lambda folder: cls._from_folder(folder, device, use_ema))

    @classmethod
    def _from_folder(cls, folder: Path, device: Device | str | torch.device | None, use_ema: bool) -> Tokenizer:
        run_file = folder / ckpt.RUN
        try:
            data = tomllib.loads(run_file.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise CheckpointError(f"cannot read {run_file}: {exc}") from exc
        if not all(data.get(k) for k in ("encoder", "quantizer", "decoder")):
            raise CheckpointError(
                f"{folder} is not a tokenizer checkpoint: its run.toml lacks [encoder], [quantizer] or [decoder]"
            )
        data_table = data.get("data") if isinstance(data.get("data"), Mapping) else {}
        resolution = data_table.get("resolution")
        max_pixels = data_table.get("max_pixels")
        kept = {k: v for k, v in data.items() if k not in _TRAINING_ONLY}
        registry = Registry.from_dict(kept, source=str(run_file))

        cfg = registry.config
        model = TokenizerModel(cfg.encoder.build(), cfg.quantizer.build(), cfg.decoder.build())
        adapters = [spec.build() for spec in cfg.adapters]
        for adapter in adapters:  # e.g. LoRA adds parameters: the layout must match the saved one
            model = adapter.apply(model)
        weights = ckpt.load_tokenizer_weights(model, folder, use_ema)
        for adapter in adapters:  # then fold them into plain weights: inference pays nothing for them
            model = adapter.merge(model)
        return cls(
            model,
            _as_device(device),
            resolution if _is_int(resolution) else None,
            checkpoint=folder,
            weights=weights,
            registry=registry,
            max_pixels=max_pixels if _is_int(max_pixels) and max_pixels > 0 else DEFAULT_MAX_PIXELS,
        )

    # -- properties ----------------------------------------------------------------------------------------------
    @property
    def downsample(self) -> int:
        """The encoder's pixels per token side (convolutional encoders: an H x W image gives (H / downsample) x
        (W / downsample) tokens). The token grid itself is ``latent_grid(H, W)``: encoders with latent queries (vit)
        have a fixed grid."""
        return self.model.downsample

    def latent_grid(self, height: int, width: int) -> tuple[int, int]:
        """The (h, w) token grid of a ``height x width`` image; ValueError for a size the encoder does not accept."""
        return self.model.latent_grid(height, width)

    @property
    def codebook_size(self) -> int:
        return int(self.model.quantizer.codebook_size)

    @property
    def torch_device(self) -> torch.device:
        return self.device.torch_device

    @property
    def token_layout(self) -> TokenLayout:
        """The token layout of an image at the run's resolution (``encode(..., as_sequence=True)`` gives
        ``(B, layout.length, layout.tokens_per_step)``). For other sizes: ``layout_for(height, width)``."""
        if self.resolution is None:
            raise ValueError("this tokenizer has no run resolution: use layout_for(height, width) with the image size")
        return self.layout_for(self.resolution, self.resolution)

    def layout_for(self, height: int, width: int) -> TokenLayout:
        """The token layout of an image of ``height x width`` pixels (a size the encoder accepts: ``latent_grid``)."""
        return self.model.quantizer.token_layout(*self.latent_grid(height, width))

    # -- images <-> indices --------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images: Tensor, as_sequence: bool = False) -> Indices:
        """Images (B, 3, H, W) in [-1, 1] of a size the encoder accepts (``latent_grid``) -> indices (on the model's device).

        ``as_sequence=False``: the quantizer's own index shape (``QuantOut.indices``). ``as_sequence=True``: one
        ``(B, L, K)`` int64 token sequence, laid out by ``layout_for(H, W)`` (``token_layout`` at the run's
        resolution): L steps, K tokens per step (product branches, residual levels).
        """
        images = self._check_images(images)
        indices = self.model.encode(images)
        if not as_sequence:
            return indices
        return self.layout_for(*images.shape[-2:]).to_sequence(indices)

    @torch.no_grad()
    def decode(self, indices: Indices, as_sequence: bool = False, layout: TokenLayout | None = None) -> Tensor:
        """Indices as returned by ``encode`` -> images (B, 3, H, W) clamped to [-1, 1].

        A ``(B, L, K)`` token sequence is decoded with ``as_sequence=True`` (laid out as ``token_layout``, the
        run's resolution) or with the ``layout`` it was made with (``layout_for(H, W)``).
        """
        if as_sequence or layout is not None:
            if not isinstance(indices, Tensor):
                raise ValueError(f"a token sequence is one (B, L, K) tensor, got {type(indices).__name__}")
            indices = (layout or self.token_layout).from_sequence(indices)
        return self.model.decode(_to(indices, self.torch_device)).float().clamp(-1, 1)

    @torch.no_grad()
    def reconstruct(self, images: Tensor) -> Tensor:
        """``decode(encode(images))``: what the tokenizer keeps of the images, clamped to [-1, 1]."""
        return self.decode(self.encode(images))

    @torch.no_grad()
    def preprocess(self, image: Image.Image | str | Path, resolution: int | None = None) -> Tensor:
        """A PIL image or an image file -> (3, R, R) in [-1, 1], as the data sources do for evaluation: the
        centre square, resampled to R = ``resolution`` or the run's resolution.

        With neither, the image keeps its size if the encoder accepts it (``latent_grid``), else it is centre-cropped
        to multiples of ``downsample``; ValueError if the encoder does not accept that either.
        An unreadable file raises ``ImageReadError`` ("path: reason").
        """
        size = resolution or self.resolution
        if isinstance(image, Image.Image):
            img = as_rgb(image)
        else:
            img = load_rgb(image, draft_size=size, max_pixels=self.max_pixels)
        if size:
            return render(img, square_box(img.width, img.height), size)
        if _accepts(self.model, img.height, img.width):
            return to_tensor(img)
        d = self.downsample
        w, h = img.width // d * d, img.height // d * d
        if w == 0 or h == 0:
            raise ValueError(f"image of {img.width}x{img.height} px is smaller than the downsampling factor {d}")
        self.latent_grid(h, w)  # raises, naming the sizes the encoder accepts
        left, top = (img.width - w) // 2, (img.height - h) // 2
        return to_tensor(img.crop((left, top, left + w, top + h)))

    def _check_images(self, images: Tensor) -> Tensor:
        if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"expected images as a (B, 3, H, W) tensor in [-1, 1], got {shape}")
        self.latent_grid(*images.shape[-2:])  # raises, naming the sizes the encoder accepts
        return images.to(self.torch_device, torch.float32)

    def __repr__(self) -> str:
        return (
            f"Tokenizer(checkpoint={str(self.checkpoint)!r}, weights={self.weights.name if self.weights else None!r}, "
            f"device={self.torch_device}, resolution={self.resolution}, downsample={self.downsample}, "
            f"codebook_size={self.codebook_size})"
        )

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        *,
        filename: str | None = None,
        revision: str | None = None,
        hf_cache_dir: str | Path | None = None,
        format: str = "auto",
        preset: str | Path | None = None,
        device: Device | str | torch.device | None = None,
        use_ema: bool = True,
    ) -> Tokenizer:
        """Load a run / checkpoint folder (as ``from_checkpoint``), a foreign checkpoint file (``format``, e.g. a
        LlamaGen VQ ``.pt``, converted once into the xqgan cache with ``preset``), ``filename`` of a Hugging
        Face repo id, or (without ``filename``) the run folder a repo id holds, through the hub's cache
        (``revision``, ``hf_cache_dir``). See :mod:`xqgan_core.pretrained`."""
        from .pretrained import resolve_pretrained

        path = resolve_pretrained(
            name_or_path, filename=filename, revision=revision, hf_cache_dir=hf_cache_dir, format=format, preset=preset
        )
        return cls.from_checkpoint(path, device=device, use_ema=use_ema)


# ----------------------------------------------------------------------------------------------------------------
# CLI helpers: xqgan-run reconstruct / xqgan-run eval


def reconstruct_files(
    checkpoint: str | Path,
    images: Sequence[str | Path],
    out_dir: str | Path,
    use_ema: bool = True,
    *,
    batch_size: int = 8,
    device: Device | str | torch.device | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Reconstruct image files; for each, write ``<out>/<stem>.png`` (original | reconstruction, side by side)
    and ``<out>/<stem>_recon.png``. Returns the written paths in input order.

    OutputExistsError (before anything is loaded or written) when an output would replace an input image (always)
    or an existing file (unless ``overwrite``).

    Unreadable files are reported on stderr as "path: reason" and skipped; XQGanError if none could be read.
    Colliding stems (``a/x.jpg``, ``b/x.png``) get ``-2``, ``-3``... suffixes instead of overwriting each other.
    """
    out = Path(out_dir)
    names = _unique_stems([Path(p).stem for p in images])  # over every input: names do not depend on readability
    _refuse_clashes(images, [out / f"{n}{suffix}.png" for n in names for suffix in ("", "_recon")], overwrite)
    tok = Tokenizer.from_checkpoint(checkpoint, device=device, use_ema=use_ema)
    loaded: list[tuple[str, Tensor]] = []
    kept: list[str] = []
    for path, name in zip(images, names):
        try:
            loaded.append((str(path), tok.preprocess(path)))
            kept.append(name)
        except (ImageReadError, ValueError) as exc:
            reason = str(exc) if isinstance(exc, ImageReadError) else f"{path}: {exc}"
            print(reason, file=sys.stderr)
    if not loaded:
        raise XQGanError(f"none of the {len(images)} image(s) could be read; nothing was written")

    out.mkdir(parents=True, exist_ok=True)
    recons: list[Tensor | None] = [None] * len(loaded)
    # batch images of equal size (all of them when the run has a resolution)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, (_, x) in enumerate(loaded):
        by_shape.setdefault(tuple(x.shape), []).append(i)
    for members in by_shape.values():
        for start in range(0, len(members), max(1, batch_size)):
            chunk = members[start : start + max(1, batch_size)]
            batch = torch.stack([loaded[i][1] for i in chunk])
            for i, r in zip(chunk, tok.reconstruct(batch).cpu()):
                recons[i] = r

    written: list[Path] = []
    for (_, original), recon, name in zip(loaded, recons, kept):
        assert recon is not None
        pair = torch.cat([original, recon], dim=2)  # along the width: original | reconstruction
        written.append(_save_png(pair, out / f"{name}.png"))
        written.append(_save_png(recon, out / f"{name}_recon.png"))
    return written


def evaluate_folder(
    checkpoint: str | Path,
    data_root: str | Path,
    max_images: int = 0,
    batch_size: int = 8,
    use_ema: bool = True,
    *,
    resolution: int | None = None,
    lpips_weights: str | Path | None = None,
    device: Device | str | torch.device | None = None,
    progress: bool = True,
    rfid: bool = False,
    reference: str | Path | None = None,
    inception_weights: str | Path | None = None,
) -> dict[str, float]:
    """Metrics of a checkpoint on every image under ``data_root`` (centre crops at the run's resolution).

    ``max_images`` > 0 evaluates a seeded random subset of that many images. Returns psnr, ssim, lpips (only
    when the LPIPS backbone weights are available: ``lpips_weights``, else the run's ``loss.lpips_weights`` if that
    file exists here, else the torch hub cache), utilization, var_usage, perplexity and images. With ``rfid`` (or
    a ``reference``: an ``.npz`` of statistics or a folder, centre-cropped at the same resolution) also ``rfid``,
    the FID of the reconstructions against the originals (or that reference); see ``xqgan_core.fid``.
    """
    tok = Tokenizer.from_checkpoint(checkpoint, device=device, use_ema=use_ema)
    size = resolution or tok.resolution
    if not size:
        raise XQGanError(
            f"{tok.checkpoint}: the run file has no data.resolution; pass the evaluation resolution explicitly"
        )
    try:
        # holdout 0: every image is an evaluation image; eval_set() crops the centre and never flips
        source = build("data", {"use": "folder", "package": "xqgan-core", "root": str(data_root),
                                "resolution": int(size), "holdout": 0.0, "max_images": max_images,
                                "max_pixels": tok.max_pixels})
    except ConfigError as exc:  # about the folder given on the command line, not about a run file
        raise XQGanError(f"cannot evaluate on {data_root}: " + "; ".join(exc.problems)) from None
    dataset = source.eval_set()

    weights = lpips_weights
    if weights is None and tok.registry is not None:
        configured = tok.registry.config.loss.lpips_weights
        weights = configured if configured and Path(configured).expanduser().is_file() else None
    module = load_lpips(weights or None, tok.torch_device)  # None (with one warning) without backbone weights
    perceptual = Perceptual(module).to(tok.torch_device) if module is not None else None

    fid = None
    if rfid or reference is not None:
        from .fid import ReconstructionFid, load_reference
        from .inception import load_inception

        net = load_inception(inception_weights, tok.torch_device)
        ref = None if reference is None else load_reference(reference, net, resolution=int(size), progress=progress)
        fid = ReconstructionFid(net, ref)

    model = tok.device.wrap_for_eval(tok.model)
    metrics, _ = evaluate(model, dataset, tok.device, batch_size=batch_size, perceptual=perceptual, progress=progress,
                          rfid=fid)
    return metrics


# ----------------------------------------------------------------------------------------------------------------


def _as_device(device: Device | str | torch.device | None) -> Device:
    if device is None:
        return auto_device()
    if isinstance(device, Device):
        return device
    name = device.type if isinstance(device, torch.device) else str(device).split(":")[0]
    return build("device", name)


def _accepts(model: TokenizerModel, height: int, width: int) -> bool:
    try:
        model.latent_grid(height, width)
    except ValueError:
        return False
    return True


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _to(indices: Indices, device: torch.device) -> Indices:
    if isinstance(indices, (list, tuple)):
        return type(indices)(_to(i, device) for i in indices)
    return indices.to(device)


class OutputExistsError(XQGanError):
    """An output file of ``reconstruct`` would replace an input image or an existing file."""


def _refuse_clashes(images: Sequence[str | Path], targets: list[Path], overwrite: bool) -> None:
    inputs = {Path(p).resolve() for p in images}
    replaced_inputs = [t for t in targets if t.resolve() in inputs]
    existing = [t for t in targets if (t.exists() or t.is_symlink()) and t.resolve() not in inputs]
    if replaced_inputs or (existing and not overwrite):
        lines = [f"  {t} (an input image)" for t in replaced_inputs]
        lines += [f"  {t} (exists)" for t in existing if not overwrite]
        fix = "choose another --out folder" + ("" if replaced_inputs else " or pass --force to overwrite")
        raise OutputExistsError(f"reconstruct would overwrite {len(lines)} file(s); {fix}; nothing was written:\n"
                                + "\n".join(lines))


def _unique_stems(stems: list[str]) -> list[str]:
    """Output names such that no ``<name>.png`` or ``<name>_recon.png`` of one image overwrites another's."""
    taken: set[str] = set()
    out = []
    for stem in stems:
        name, n = stem, 1
        while name in taken or f"{name}_recon" in taken:
            n += 1
            name = f"{stem}-{n}"
        taken.update((name, f"{name}_recon"))
        out.append(name)
    return out


def _save_png(image: Tensor, path: Path) -> Path:
    arr = ((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    Image.fromarray(np.ascontiguousarray(arr)).save(path, format="PNG")
    return path
