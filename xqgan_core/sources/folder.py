"""The ``folder`` data source: images in a folder, flat or one sub-folder per class, with a seeded held-out split."""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from ..config import at_least, between, config, non_empty, option, positive, require_checked
from ..errors import ConfigError
from ..fallback_dataset import FallbackDataset, Item, ProblemLog, coin, random_position
from ..images import DEFAULT_MAX_PIXELS, check_image_file, load_rgb, render, square_box
from ..interfaces import DataSource

DEFAULT_EXTENSIONS = ("jpg", "jpeg", "png", "bmp", "webp", "tif", "tiff")


class FolderImages(FallbackDataset):
    """Images from a list of files: shorter side to ``resolution`` (or to a random size in ``resize_range``), square
    crop of ``resolution``, optional horizontal flip. Random draws, in this order: size, crop position, flip."""

    def __init__(
        self,
        files: Sequence[tuple[str, int]],
        resolution: int,
        crop: Literal["center", "random"],
        flip: bool,
        problems: ProblemLog,
        what: str,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        resize_range: tuple[int, int] | None = None,
    ) -> None:
        super().__init__(len(files), problems, what)
        self.files = list(files)
        self.resolution = resolution
        self.crop = crop
        self.flip = flip
        self.max_pixels = max_pixels
        self.resize_range = resize_range

    def _source(self, i: int) -> str:
        return self.files[i][0]

    def _load(self, i: int, rng: torch.Generator | None) -> Item:
        path, label = self.files[i]
        # Decode at least as large as the biggest resize, so the crop is never upsampled from a JPEG draft.
        draft = self.resize_range[1] if self.resize_range else self.resolution
        img = load_rgb(path, draft_size=draft, max_pixels=self.max_pixels)
        scale = 1.0
        if self.resize_range:  # shorter side resized to s, then a resolution crop = a box of resolution / s of it
            lo, hi = self.resize_range
            scale = self.resolution / int(torch.randint(lo, hi + 1, (), generator=rng))
        position = random_position(rng) if self.crop == "random" else (0.5, 0.5)
        box = square_box(img.width, img.height, scale, position)
        image = render(img, box, self.resolution, flip=self.flip and coin(rng))
        return {"image": image, "label": label, "index": i}


def _pair_or_empty(_inst: Any, _attr: Any, value: Sequence[int]) -> None:
    if value and (len(value) != 2 or not 0 < value[0] <= value[1]):
        raise ValueError(f"must be [] or [lo, hi] with 0 < lo <= hi, got {list(value)!r}")


class FolderData(DataSource):
    """Images in a folder, flat or one sub-folder per class (searched recursively); a seeded held-out split."""

    plugin_api = 1

    @config
    class Config:
        root: str = option(help="Folder of images: flat, or one sub-folder per class (searched recursively).")
        resolution: int = option(256, help="Side of the square images produced (shorter side resized, then cropped).", validator=positive())
        crop: Literal["center", "random"] = option("random", help="Crop of training images; evaluation always crops the centre.")
        flip: bool = option(True, help="Random horizontal flip of training images (never in evaluation).")
        resize_range: tuple[int, ...] = option(
            (),
            help="[lo, hi]: resize the shorter side of each training image to a random integer size in lo..hi "
            "(inclusive) before the crop of `resolution` (the XQ-GAN reference uses [256, 320] at 256 px); "
            "[] = resize to `resolution` (no scale augmentation). Evaluation always resizes to `resolution`.",
            validator=_pair_or_empty,
        )
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
        max_pixels: int = option(
            DEFAULT_MAX_PIXELS,
            help="Skip (and report) images with more pixels than this, judged from the file header before decoding: "
            "a guard against decompression bombs. The default is PIL's own limit (about 13400 x 13400).",
            validator=positive(),
        )
        verify: bool = option(
            True, help="Check every file when the source is built and drop unreadable ones (costs one cheap read per file)."
        )

        def check(self) -> list[str]:
            if self.resize_range and self.resize_range[0] < self.resolution:
                lo = self.resize_range[0]
                return [f"resize_range: the smallest size ({lo}) must be >= resolution ({self.resolution})"]
            return []

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        cfg = self.config
        require_checked(cfg, "data")
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
        check = partial(check_image_file, max_pixels=self.config.max_pixels)
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            start = 0
            while start < len(order) and len(good) < wanted:
                chunk = order[start : start + max(64, 2 * (wanted - len(good)))]
                start += len(chunk)
                for item, reason in zip(chunk, pool.map(check, [p for p, _ in chunk])):
                    if reason is None:
                        good.append(item)
                    else:
                        self._problems.report(item[0], reason)
        return good[:wanted]

    def train_set(self) -> torch.utils.data.Dataset:
        c = self.config
        what = f"the training split of {self.root}"
        resize = (c.resize_range[0], c.resize_range[1]) if c.resize_range else None
        return FolderImages(self.train_files, c.resolution, c.crop, c.flip, self._problems, what, c.max_pixels, resize)

    def eval_set(self) -> torch.utils.data.Dataset:
        c = self.config
        what = f"the held-out split of {self.root}"
        return FolderImages(self.eval_files, c.resolution, "center", False, self._problems, what, c.max_pixels)

    def problems(self) -> Sequence[str]:
        return self._problems.entries()

    def class_names(self) -> Sequence[str]:
        """The class sub-folders in label order; none for a flat folder (its images are unlabelled)."""
        return () if self.classes == [""] else tuple(self.classes)


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
