"""The ``sample`` data source: photographs shipped with scikit-image, the default run's data (nothing to download).

Training items are random square crops at several scales of the non-held-out images; evaluation uses fixed views
(``EVAL_VIEWS``) of the held-out images only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..config import between, config, non_empty, option, positive, require_checked
from ..errors import ConfigError
from ..fallback_dataset import FallbackDataset, Item, ProblemLog, coin, random_position, uniform
from ..images import array_to_rgb, failure_reason, render, square_box
from ..interfaces import DataSource


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

    def _load(self, i: int, rng: torch.Generator | None) -> Item:
        _name, label, img = self.images[i // self.per_image]
        if self.views is not None:
            scale, position = self.views[i % self.per_image]
            flip = False
        else:
            # Never crop below the output size when the image allows it: upsampled crops only teach blur.
            lo = min(1.0, max(self.min_scale, self.resolution / min(img.size)))
            scale = lo + (1.0 - lo) * uniform(rng)
            position = random_position(rng)
            flip = self.flip and coin(rng)
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
        require_checked(cfg, "data")
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
                self._problems.report(f"skimage.data.{name}", failure_reason(exc))
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

    def class_names(self) -> Sequence[str]:
        """One class per photograph (``images``, in order; held-out ones included): label = its position."""
        return tuple(dict.fromkeys(self.config.images))
