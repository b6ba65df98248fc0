"""Built-in image sources: ``folder`` (a directory of images) and ``sample`` (photographs shipped with scikit-image).

Both produce items ``{"image": float tensor (3, R, R) in [-1, 1], "label": int, "index": int}`` through the same
helpers: a square crop box is chosen in the source image's own coordinates and resampled once to R x R (bicubic,
antialiased by PIL when shrinking), which equals "resize the shorter side to R, then crop" without resizing the
whole image first.

Broken files never stop a run: they are reported once (a ``BadImageWarning`` naming path and reason), collected for
``problems()`` and skipped, the item falling back to the next readable image. Reports made inside DataLoader worker
processes reach the main process through a small append-only log file, so ``problems()`` sees them too.

Random choices (crop position, scale, flip) draw from torch's global RNG, which the engine seeds and DataLoader
re-seeds per worker, so a run is reproducible from its seed.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import uuid
import warnings
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .config import at_least, between, config, non_empty, option, positive
from .errors import ConfigError, ImageReadError, NoReadableImageError  # noqa: F401  (re-exported: raised here)
from .interfaces import DataSource

Box = tuple[float, float, float, float]
Item = dict[str, Any]

DEFAULT_EXTENSIONS = ("jpg", "jpeg", "png", "bmp", "webp", "tif", "tiff")


class BadImageWarning(UserWarning):
    """An image file could not be read and is skipped."""


# ----------------------------------------------------------------------------------------------------------------
# Shared helpers


def load_rgb(path: str | os.PathLike[str], draft_size: int | None = None) -> Image.Image:
    """Decode an image file into an 8-bit RGB PIL image, raising ``ImageReadError`` ("path: reason") on failure.

    EXIF orientation is applied. ``draft_size`` lets JPEG decoding shrink by a power of two (DCT scaling) while
    keeping both sides >= ``draft_size``: much faster for large photos that are resized down anyway.
    """
    name = os.fspath(path)
    try:
        if os.path.getsize(name) == 0:
            raise ImageReadError(f"{name}: empty file (0 bytes)", name, "empty file (0 bytes)")
        with Image.open(name) as im:
            if draft_size is not None and im.format in ("JPEG", "MPO"):
                im.draft("RGB", (draft_size, draft_size))
            im.load()
            return as_rgb(_exif_upright(im))
    except ImageReadError:
        raise
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError, struct.error, ...)
        reason = _reason(exc)
        raise ImageReadError(f"{name}: {reason}", name, reason) from exc


def as_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB: 16-bit and float data are rescaled (not clipped), transparency is composited on
    white (the hidden colour under transparent pixels is arbitrary), CMYK/palette/grayscale are converted."""
    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return im
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        peak = float(arr.max()) if arr.size else 0.0
        if mode == "F":
            scale = 1.0 if peak <= 1.0 else peak  # float images are usually [0, 1]; otherwise stretch to the peak
        else:
            scale = 65535.0 if peak <= 65535 else peak  # "I" comes from 16-bit PNG/TIFF/PGM in practice
        arr8 = np.clip(np.rint(arr / scale * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, "L").convert("RGB")
    if mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return im.convert("RGB")


def array_to_rgb(arr: np.ndarray) -> Image.Image:
    """A numpy image (H, W) or (H, W, C) of bool / uint8 / uint16 / float in [0, 1] -> 8-bit RGB PIL image."""
    a = np.asarray(arr)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif a.dtype == np.uint16:
        a = np.rint(a / 257.0).astype(np.uint8)
    elif a.dtype.kind == "f":
        a = np.rint(np.clip(a, 0.0, 1.0) * 255.0).astype(np.uint8)
    elif a.dtype != np.uint8:
        a = np.clip(a, 0, 255).astype(np.uint8)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim == 2:
        return Image.fromarray(a, "L").convert("RGB")
    if a.ndim == 3 and a.shape[2] in (3, 4):
        return as_rgb(Image.fromarray(np.ascontiguousarray(a), "RGB" if a.shape[2] == 3 else "RGBA"))
    raise ValueError(f"expected an image array (H, W) or (H, W, 1|3|4), got shape {a.shape}")


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float tensor (3, H, W) in [-1, 1]."""
    # Converted in numpy: torch's multi-threaded uint8->float kernel is far slower on such small images.
    arr = np.asarray(as_rgb(img), dtype=np.uint8).transpose(2, 0, 1).astype(np.float32, order="C")
    arr /= 127.5
    arr -= 1.0
    return torch.from_numpy(arr)


def square_box(width: int, height: int, scale: float = 1.0, position: tuple[float, float] = (0.5, 0.5)) -> Box:
    """A square box of side ``scale * min(width, height)``; ``position`` places it in the free space
    ((0, 0) top-left, (0.5, 0.5) centre, (1, 1) bottom-right). Float coordinates: PIL resamples sub-pixel boxes."""
    side = scale * min(width, height)
    left = position[0] * (width - side)
    top = position[1] * (height - side)
    return (left, top, left + side, top + side)


def render(img: Image.Image, box: Box, resolution: int, flip: bool = False) -> torch.Tensor:
    """Resample ``box`` of ``img`` to ``resolution`` x ``resolution`` (bicubic), optionally mirror it, as a tensor."""
    out = img.resize((resolution, resolution), Image.Resampling.BICUBIC, box=box)
    if flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return to_tensor(out)


def random_position() -> tuple[float, float]:
    u = torch.rand(2)
    return (float(u[0]), float(u[1]))


def coin() -> bool:
    return bool(torch.rand(()) < 0.5)


def check_image_file(path: str) -> str | None:
    """Cheap up-front check of one file: None if it looks readable, else the reason.

    PIL's ``verify()`` checks PNG chunk CRCs but not JPEG bodies, so JPEGs are decoded at 1/8 scale instead: the
    whole entropy-coded stream is still read (a truncated body fails) at a fraction of a full decode's cost.
    """
    try:
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
        with Image.open(path) as im:
            if im.format in ("JPEG", "MPO"):
                im.draft("RGB", (1, 1))
                im.load()
            else:
                im.verify()
    except Exception as exc:
        return _reason(exc)
    return None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError):
        return "file not found"
    if isinstance(exc, UnidentifiedImageError):
        return "not a recognised image format (PIL cannot identify it)"
    if isinstance(exc, Image.DecompressionBombError):
        return f"image too large ({exc})"
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _exif_upright(im: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(im) or im
    except Exception:  # a broken EXIF block should not lose an otherwise good image
        return im


class ProblemLog:
    """Unreadable sources, reported once each, shared between the main process and DataLoader workers.

    Every report is appended as one JSON line to a private temp file (created only when a problem occurs, removed
    when the owning object is collected), so a worker's findings reach ``entries()`` in the main process.
    """

    def __init__(self) -> None:
        self._owner = os.getpid()
        self._file = os.path.join(tempfile.gettempdir(), f"xqgan-data-problems-{self._owner}-{uuid.uuid4().hex}.jsonl")
        self._seen: dict[str, str] = {}
        weakref.finalize(self, _remove_log, self._file, self._owner)

    def report(self, source: str, reason: str) -> None:
        if source in self._seen:
            return
        self._seen[source] = reason
        if source in dict(self._shared()):  # another process has already warned about it
            return
        try:
            with open(self._file, "a", encoding="utf-8") as f:
                f.write(json.dumps([source, reason]) + "\n")
        except OSError:
            pass  # an unwritable temp dir only costs cross-process visibility
        warnings.warn(BadImageWarning(f"skipping {source}: {reason}"), stacklevel=3)

    def entries(self) -> list[str]:
        merged = dict(self._seen)
        for source, reason in self._shared():
            merged.setdefault(source, reason)
        return [f"{source}: {reason}" for source, reason in merged.items()]

    def _shared(self) -> list[tuple[str, str]]:
        try:
            with open(self._file, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except OSError:
            return []
        out = []
        for line in lines:
            try:
                source, reason = json.loads(line)
            except ValueError:
                continue  # a line being written concurrently
            out.append((source, reason))
        return out


def _remove_log(path: str, owner: int) -> None:
    if os.getpid() == owner:  # forked workers inherit this finalizer; only the creator deletes
        try:
            os.remove(path)
        except OSError:
            pass


class FallbackDataset(torch.utils.data.Dataset):
    """A dataset whose items may fail to load: a failure is reported once and the next readable item is served
    (its own ``index`` in the item dict).

    Subclasses implement ``_load(i) -> Item`` raising ``ImageReadError`` and ``_source(i)`` for messages.
    """

    def __init__(self, size: int, problems: ProblemLog, what: str) -> None:
        self._size = size
        self._problems = problems
        self._bad: set[int] = set()
        self._what = what

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, index: int) -> Item:
        if not -self._size <= index < self._size:
            raise IndexError(f"index {index} out of range for {self._size} items")
        index %= self._size
        for step in range(self._size):  # bounded: each item is tried at most once
            j = (index + step) % self._size
            if j in self._bad:
                continue
            try:
                return self._load(j)
            except ImageReadError as exc:
                self._bad.add(j)
                self._problems.report(exc.path or self._source(j), exc.reason or str(exc))
        raise NoReadableImageError(
            f"none of the {self._size} images of {self._what} could be read; see the warnings above for each file"
        )

    def _load(self, i: int) -> Item:
        raise NotImplementedError

    def _source(self, i: int) -> str:
        return f"item {i}"


# ----------------------------------------------------------------------------------------------------------------
# folder


class FolderImages(FallbackDataset):
    """Images from a list of files: shorter side to ``resolution``, square crop, optional horizontal flip."""

    def __init__(
        self,
        files: Sequence[tuple[str, int]],
        resolution: int,
        crop: Literal["center", "random"],
        flip: bool,
        problems: ProblemLog,
        what: str,
    ) -> None:
        super().__init__(len(files), problems, what)
        self.files = list(files)
        self.resolution = resolution
        self.crop = crop
        self.flip = flip

    def _source(self, i: int) -> str:
        return self.files[i][0]

    def _load(self, i: int) -> Item:
        path, label = self.files[i]
        img = load_rgb(path, draft_size=self.resolution)
        position = random_position() if self.crop == "random" else (0.5, 0.5)
        box = square_box(img.width, img.height, 1.0, position)
        image = render(img, box, self.resolution, flip=self.flip and coin())
        return {"image": image, "label": label, "index": i}


class FolderData(DataSource):
    """Images in a folder, flat or one sub-folder per class (searched recursively); a seeded held-out split."""

    plugin_api = 1

    @config
    class Config:
        root: str = option(help="Folder of images: flat, or one sub-folder per class (searched recursively).")
        resolution: int = option(256, help="Side of the square images produced (shorter side resized, then cropped).", validator=positive())
        crop: Literal["center", "random"] = option("random", help="Crop of training images; evaluation always crops the centre.")
        flip: bool = option(True, help="Random horizontal flip of training images (never in evaluation).")
        holdout: float = option(
            0.05,
            help="Fraction of images held out for evaluation (at least 1 when there are >= 2; 0 = evaluate on training images).",
            validator=between(0.0, 0.9),
        )
        split_seed: int = option(0, help="Seed of the permutation that picks held-out images (and the max_images subset).")
        extensions: tuple[str, ...] = option(
            DEFAULT_EXTENSIONS, help="File extensions read as images (case-insensitive).", validator=non_empty()
        )
        max_images: int = option(0, help="Use at most this many images, a seeded random subset (0 = all).", validator=at_least(0))
        verify: bool = option(
            True, help="Check every file when the source is built and drop unreadable ones (costs one cheap read per file)."
        )

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        cfg = self.config
        self._problems = ProblemLog()
        self.root = Path(cfg.root).expanduser()
        files, self.classes = _list_images(self.root, cfg.extensions)
        order = [files[i] for i in np.random.default_rng(cfg.split_seed).permutation(len(files))]
        wanted = cfg.max_images or len(order)
        chosen = self._verified(order, wanted) if cfg.verify else order[:wanted]
        if not chosen:
            shown = "; ".join(self._problems.entries()[:3])
            problem = f"data.root: none of the {len(files)} image files under {self.root} could be read ({shown})"
            raise ConfigError([problem])
        n_eval = 0
        if cfg.holdout > 0 and len(chosen) >= 2:
            n_eval = min(len(chosen) - 1, max(1, round(cfg.holdout * len(chosen))))
        self.eval_files = sorted(chosen[:n_eval]) or sorted(chosen)  # no held-out images: evaluate on training ones
        self.train_files = sorted(chosen[n_eval:])

    def _verified(self, order: list[tuple[str, int]], wanted: int) -> list[tuple[str, int]]:
        """Check files in split order until ``wanted`` good ones are found (threads: PIL decodes without the GIL)."""
        good: list[tuple[str, int]] = []
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            start = 0
            while start < len(order) and len(good) < wanted:
                chunk = order[start : start + max(64, 2 * (wanted - len(good)))]
                start += len(chunk)
                for item, reason in zip(chunk, pool.map(check_image_file, [p for p, _ in chunk])):
                    if reason is None:
                        good.append(item)
                    else:
                        self._problems.report(item[0], reason)
        return good[:wanted]

    def train_set(self) -> torch.utils.data.Dataset:
        c = self.config
        what = f"the training split of {self.root}"
        return FolderImages(self.train_files, c.resolution, c.crop, c.flip, self._problems, what)

    def eval_set(self) -> torch.utils.data.Dataset:
        c = self.config
        what = f"the held-out split of {self.root}"
        return FolderImages(self.eval_files, c.resolution, "center", False, self._problems, what)

    def problems(self) -> Sequence[str]:
        return self._problems.entries()


def _list_images(root: Path, extensions: Sequence[str]) -> tuple[list[tuple[str, int]], list[str]]:
    """(path, label) of every image under ``root`` sorted by relative path, and the class names.

    The class of a file is its first-level sub-folder ("" for files directly in ``root``); labels index the sorted
    class names, so a flat folder has the single label 0. Hidden files and folders (".name") are skipped: they are
    typically macOS "._x.jpg" resource forks, not images.
    """
    if not root.exists():
        raise ConfigError([f"data.root: folder {root} does not exist"])
    if not root.is_dir():
        raise ConfigError([f"data.root: {root} is not a folder"])
    exts = {e.lower().lstrip(".") for e in extensions}
    found: list[tuple[str, str]] = []  # (relative posix path, class name)
    ignored = 0
    visited: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in visited:  # a symlink loop
            dirnames[:] = []
            continue
        visited.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel_dir = Path(dirpath).relative_to(root)
        cls = rel_dir.parts[0] if rel_dir.parts else ""
        for name in filenames:
            if name.startswith("."):
                continue
            if name.rsplit(".", 1)[-1].lower() in exts and "." in name:
                found.append(((rel_dir / name).as_posix(), cls))
            else:
                ignored += 1
    if not found:
        other = f"; {ignored} other file(s) ignored" if ignored else ""
        raise ConfigError(
            [f"data.root: no images ({', '.join(sorted(exts))}) found under {root} (searched recursively{other})"]
        )
    found.sort()
    classes = sorted({cls for _, cls in found})
    label = {cls: i for i, cls in enumerate(classes)}
    return [(str(root / rel), label[cls]) for rel, cls in found], classes


# ----------------------------------------------------------------------------------------------------------------
# sample


def _skimage_loader(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        if name in ("motorcycle_left", "motorcycle_right"):
            left, right, _disparity = skimage.data.stereo_motorcycle()
            return left if name == "motorcycle_left" else right
        return getattr(skimage.data, name)()

    return load


#: Single images of ``skimage.data`` (the ones marked * need a download through ``pooch`` and are skipped offline).
SAMPLE_IMAGES: tuple[str, ...] = (
    "astronaut", "brick", "camera", "cat", "cell", "chelsea", "checkerboard", "clock", "coffee", "coins",
    "colorwheel", "eagle*", "grass", "gravel", "horse", "hubble_deep_field", "immunohistochemistry", "logo",
    "microaneurysms", "moon", "motorcycle_left", "motorcycle_right", "page", "retina", "rocket", "text",
)  # fmt: skip
KNOWN_SAMPLES = tuple(n.rstrip("*") for n in SAMPLE_IMAGES)

#: Real photographs and scans that ship inside the scikit-image wheel (no download). "cat" is left out: it is
#: the same photo as "chelsea".
DEFAULT_SAMPLES: tuple[str, ...] = (
    "astronaut", "camera", "coffee", "chelsea", "rocket", "motorcycle_left", "motorcycle_right",
    "hubble_deep_field", "immunohistochemistry", "retina", "text", "page", "coins", "moon", "brick", "grass",
    "gravel", "cell", "colorwheel", "clock",
)  # fmt: skip

#: Evaluation views of each held-out image: the full centre square, then half-size squares at the four corners
#: and the centre, as (scale, position) for ``square_box``.
EVAL_VIEWS: tuple[tuple[float, tuple[float, float]], ...] = (
    (1.0, (0.5, 0.5)),
    (0.5, (0.0, 0.0)),
    (0.5, (1.0, 0.0)),
    (0.5, (0.0, 1.0)),
    (0.5, (1.0, 1.0)),
    (0.5, (0.5, 0.5)),
)


def _shrink(img: Image.Image, limit: int) -> Image.Image:
    """Downscale so the shorter side is at most ``limit``: even the smallest crop keeps 2x the output's pixels,
    and workers copy (and crops resample) far fewer of them."""
    short = min(img.size)
    if short <= limit:
        return img
    size = (max(1, round(img.width * limit / short)), max(1, round(img.height * limit / short)))
    return img.resize(size, Image.Resampling.BICUBIC)


class SampleCrops(FallbackDataset):
    """Square crops of in-memory images: random (scale, position, flip) for training, fixed views for evaluation."""

    def __init__(
        self,
        images: Sequence[tuple[str, int, Image.Image]],
        resolution: int,
        problems: ProblemLog,
        *,
        crops_per_image: int = 1,
        min_scale: float = 1.0,
        flip: bool = False,
        views: Sequence[tuple[float, tuple[float, float]]] | None = None,
    ) -> None:
        self.per_image = len(views) if views is not None else crops_per_image
        super().__init__(len(images) * self.per_image, problems, "the sample images")
        self.images = list(images)
        self.resolution = resolution
        self.min_scale = min_scale
        self.flip = flip
        self.views = views

    def _source(self, i: int) -> str:
        return f"skimage.data.{self.images[i // self.per_image][0]}"

    def _load(self, i: int) -> Item:
        _name, label, img = self.images[i // self.per_image]
        if self.views is not None:
            scale, position = self.views[i % self.per_image]
            flip = False
        else:
            # Never crop below the output size when the image allows it: upsampled crops only teach blur.
            lo = min(1.0, max(self.min_scale, self.resolution / min(img.size)))
            scale = lo + (1.0 - lo) * float(torch.rand(()))
            position = random_position()
            flip = self.flip and coin()
        box = square_box(img.width, img.height, scale, position)
        return {"image": render(img, box, self.resolution, flip), "label": label, "index": i}


class SampleData(DataSource):
    """Photographs shipped with scikit-image: the default run's data, nothing to download.

    Training items are random square crops at several scales of the non-held-out images; evaluation uses fixed
    views (``EVAL_VIEWS``) of the held-out images only. ``label`` is the image's position in ``images``.
    """

    plugin_api = 1

    @config
    class Config:
        resolution: int = option(64, help="Side of the square crops produced.", validator=positive())
        images: tuple[str, ...] = option(
            DEFAULT_SAMPLES,
            help=f"skimage.data images to use; any of: {', '.join(SAMPLE_IMAGES)} (* needs a download).",
            validator=non_empty(),
        )
        holdout_images: tuple[str, ...] = option(
            ("chelsea", "text", "retina"), help="Images kept out of training, used only for evaluation.", validator=non_empty()
        )
        crops_per_image: int = option(16, help="Random training crops per image and epoch.", validator=positive())
        min_scale: float = option(
            0.35, help="Smallest training crop side as a fraction of the image's shorter side.", validator=between(0.05, 1.0)
        )
        flip: bool = option(True, help="Random horizontal flip of training crops.")

        def check(self) -> list[str]:
            known = ", ".join(KNOWN_SAMPLES)
            problems = [f"images: unknown image {n!r}; known: {known}" for n in self.images if n not in KNOWN_SAMPLES]
            problems += [
                f"holdout_images: {n!r} is not listed in images" for n in self.holdout_images if n not in self.images
            ]
            if not set(self.images) - set(self.holdout_images):
                problems.append("holdout_images: every image is held out; none is left for training")
            return problems

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        cfg = self.config
        bad = cfg.check()
        if bad:
            raise ConfigError([f"data.{p}" for p in bad])
        try:
            import skimage.data  # noqa: F401
        except ImportError as exc:
            raise ConfigError([f"data.use: 'sample' needs scikit-image (pip install scikit-image): {exc}"]) from None
        self._problems = ProblemLog()
        loaded: list[tuple[str, int, Image.Image]] = []
        for label, name in enumerate(dict.fromkeys(cfg.images)):
            try:
                img = array_to_rgb(_skimage_loader(name)())
                loaded.append((name, label, _shrink(img, math.ceil(2 * cfg.resolution / cfg.min_scale))))
            except Exception as exc:  # e.g. pooch missing or offline for the downloadable ones
                self._problems.report(f"skimage.data.{name}", _reason(exc))
        held = set(cfg.holdout_images)
        self._train = [x for x in loaded if x[0] not in held]
        self._eval = [x for x in loaded if x[0] in held]
        for split, items in (("training", self._train), ("held-out", self._eval)):
            if not items:
                shown = "; ".join(self._problems.entries()[:3])
                raise ConfigError([f"data: none of the {split} sample images could be loaded ({shown})"])

    @property
    def train_names(self) -> list[str]:
        return [name for name, _, _ in self._train]

    @property
    def eval_names(self) -> list[str]:
        return [name for name, _, _ in self._eval]

    def train_set(self) -> torch.utils.data.Dataset:
        c = self.config
        return SampleCrops(
            self._train,
            c.resolution,
            self._problems,
            crops_per_image=c.crops_per_image,
            min_scale=c.min_scale,
            flip=c.flip,
        )

    def eval_set(self) -> torch.utils.data.Dataset:
        return SampleCrops(self._eval, self.config.resolution, self._problems, views=EVAL_VIEWS)

    def problems(self) -> Sequence[str]:
        return self._problems.entries()
