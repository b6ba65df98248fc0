"""Compatibility aliases for code written before the data module was split; import from the new modules instead:

* ``xqgan_core.images``: image decoding and cropping (load_rgb, as_rgb, array_to_rgb, to_tensor, check_image_file, square_box, render);
* ``xqgan_core.fallback_dataset``: the fault-tolerant dataset, problem log, random crop / flip draws;
* ``xqgan_core.sources.folder`` and ``xqgan_core.sources.sample``: the built-in data sources.
"""

from __future__ import annotations

from .errors import ConfigError, ImageReadError, NoReadableImageError
from .fallback_dataset import BadImageWarning, FallbackDataset, ProblemLog, coin, random_position
from .images import array_to_rgb, as_rgb, check_image_file, load_rgb, render, square_box, to_tensor
from .sources.folder import DEFAULT_EXTENSIONS, FolderData, FolderImages
from .sources.sample import DEFAULT_SAMPLES, EVAL_VIEWS, KNOWN_SAMPLES, SAMPLE_IMAGES, SampleCrops, SampleData

__all__ = [
    "DEFAULT_EXTENSIONS", "DEFAULT_SAMPLES", "EVAL_VIEWS", "KNOWN_SAMPLES", "SAMPLE_IMAGES",
    "BadImageWarning", "ConfigError", "FallbackDataset", "FolderData", "FolderImages", "ImageReadError",
    "NoReadableImageError", "ProblemLog", "SampleCrops", "SampleData",
    "array_to_rgb", "as_rgb", "check_image_file", "coin", "load_rgb", "random_position", "render", "square_box",
    "to_tensor",
]  # fmt: skip
