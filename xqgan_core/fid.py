"""FID, Inception Score and precision/recall (generation: gFID; reconstruction: rFID) through torch-fidelity.

* Features: torch-fidelity's Inception-v3 (``xqgan_core.inception``), pool_3 (2048) for FID and precision/recall,
  the unbiased logits (1008) for the Inception Score. Images enter as uint8 (B, 3, H, W) at their own size;
  the network resizes them to 299 the way the TF graph did.
* FID: ``|mu_1 - mu_2|^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2))`` from torch-fidelity (float64 statistics).
* IS: torch-fidelity's, 10 splits (fewer when there are fewer than 10 images), shuffled with its seed 2020.
* Precision/recall (Kynkaanniemi et al. 2019): torch-fidelity's k-NN balls (k = 3) computed on the Inception
  pool_3 features, as ADM's evaluator does (torch-fidelity's own default would use VGG16 features).

Reference statistics (``ReferenceStats``) come from an ``.npz`` in ADM's format (``VIRTUAL_imagenet256_labeled.npz``
holds ``mu``, ``sigma`` (pool_3 statistics), ``mu_s``, ``sigma_s`` (spatial mixed_6 statistics, for sFID) and
``arr_0`` (the reference images, uint8 NHWC)): we read ``mu`` and ``sigma``, and ``arr_0`` only when precision/recall
are asked for (its images are run through the network). Or they are computed from a folder of images and can be
saved as an ``.npz`` with the same ``mu``/``sigma`` keys plus our own ``pool_features`` (per-image pool_3 features,
for precision/recall without the images), ``count`` and ``inception_sha256`` (the weights they were computed with;
a file made with other weights is refused, since the numbers would not be comparable).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from .atomic import atomic_path, write_text_atomic
from .errors import XQGanError
from .images import DEFAULT_MAX_PIXELS, load_rgb, square_box
from .inception import Inception, load_inception, to_uint8
from .sources.folder import DEFAULT_EXTENSIONS

__all__ = [
    "FeatureSet",
    "ReconstructionFid",
    "ReferenceStats",
    "folder_features",
    "frechet_distance",
    "generation_metrics",
    "image_files",
    "inception_score",
    "load_reference",
    "precision_recall",
    "format_table",
    "write_json",
]

#: Keys of ADM's reference ``.npz`` that we read (the rest, ``mu_s``/``sigma_s``, are sFID's and ignored).
ADM_MEAN, ADM_COVARIANCE, ADM_IMAGES = "mu", "sigma", "arr_0"
#: Our additions to the same file format (absent from ADM's files).
POOL_KEY, COUNT_KEY, WEIGHTS_KEY = "pool_features", "count", "inception_sha256"
PRC_NEIGHBORHOOD = 3
#: Not samples: the labelled grid ``xqgan-run sample`` writes next to its PNGs (``sample_images.GRID``).
SKIPPED_NAMES = frozenset({"grid.png"})
ISC_SPLITS = 10


class FidError(XQGanError):
    """Reference or image folder unusable for FID (the message names the file and what is wrong)."""


# -- features ---------------------------------------------------------------------------------------------------------
@dataclass
class FeatureSet:
    """Inception features of a set of images: pool_3 (N, 2048) and logits (N, 1008), float32 on the CPU."""

    pool: Tensor
    logits: Tensor

    def __len__(self) -> int:
        return int(self.pool.shape[0])


class FeatureCollector:
    """Runs batches of uint8 images through the network and keeps their features."""

    def __init__(self, inception: Inception) -> None:
        self.inception = inception
        self._pool: list[Tensor] = []
        self._logits: list[Tensor] = []

    def add(self, images_uint8: Tensor) -> None:
        pool, logits = self.inception.features(images_uint8)
        self._pool.append(pool)
        self._logits.append(logits)

    def result(self) -> FeatureSet:
        if not self._pool:
            return FeatureSet(torch.zeros(0, 2048), torch.zeros(0, 1008))
        return FeatureSet(torch.cat(self._pool), torch.cat(self._logits))


def image_files(folder: str | Path) -> list[Path]:
    """Every image under ``folder`` (recursively; hidden entries and ``SKIPPED_NAMES`` skipped), sorted by
    relative path."""
    root = Path(folder)
    if not root.is_dir():
        raise FidError(f"{root}: not a folder of images")
    exts = {f".{e}" for e in DEFAULT_EXTENSIONS}
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [Path(dirpath) / n for n in filenames
                  if not n.startswith(".") and n not in SKIPPED_NAMES and Path(n).suffix.lower() in exts]
    if not found:
        raise FidError(f"{root}: no images ({', '.join(DEFAULT_EXTENSIONS)}) found (searched recursively)")
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


class _UInt8Images(torch.utils.data.Dataset):
    """uint8 (3, H, W) per file: as stored, or (``resolution``) the centre square resampled to that size
    (bicubic, antialiased when shrinking: the same crop as the ``folder`` data source's evaluation set)."""

    def __init__(self, files: Sequence[Path], resolution: int | None, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.files = list(files)
        self.resolution = resolution
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Tensor:
        img = load_rgb(self.files[i], draft_size=self.resolution, max_pixels=self.max_pixels)
        if self.resolution:
            box = square_box(img.width, img.height)
            img = img.resize((self.resolution, self.resolution), Image.Resampling.BICUBIC, box=box)
        return torch.from_numpy(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy())


def _stack_same_size(items: list[Tensor]) -> Tensor:
    shapes = {tuple(t.shape) for t in items}
    if len(shapes) > 1:
        raise FidError(f"images of different sizes in one folder ({sorted(shapes)[:3]}...): pass --resolution N "
                       "(centre crops resampled to N x N)")
    return torch.stack(items)


def folder_features(
    folder: str | Path,
    inception: Inception,
    *,
    batch_size: int = 50,
    resolution: int | None = None,
    workers: int = 0,
    progress: bool = True,
) -> FeatureSet:
    """Inception features of every image under ``folder`` (see ``image_files``)."""
    files = image_files(folder)
    loader = torch.utils.data.DataLoader(_UInt8Images(files, resolution), batch_size=batch_size, shuffle=False,
                                         num_workers=workers, collate_fn=_stack_same_size)
    collector = FeatureCollector(inception)
    with tqdm(total=len(files), desc=f"inception {Path(folder).name}", unit="img", disable=not progress) as bar:
        for batch in loader:
            collector.add(batch)
            bar.update(batch.shape[0])
    return collector.result()


def _array_features(images_nhwc: np.ndarray, inception: Inception, batch_size: int, progress: bool) -> FeatureSet:
    collector = FeatureCollector(inception)
    for start in tqdm(range(0, len(images_nhwc), batch_size), desc="inception arr_0", disable=not progress):
        chunk = np.ascontiguousarray(images_nhwc[start : start + batch_size].transpose(0, 3, 1, 2))
        collector.add(torch.from_numpy(chunk))
    return collector.result()


# -- reference statistics ---------------------------------------------------------------------------------------------
@dataclass
class ReferenceStats:
    """pool_3 statistics of a reference set (float64), optionally its per-image features (precision/recall)."""

    mu: np.ndarray
    sigma: np.ndarray
    pool: np.ndarray | None = None
    count: int | None = None
    inception_sha256: str | None = None
    source: str = ""

    @classmethod
    def from_features(cls, features: FeatureSet, inception: Inception, source: str = "") -> ReferenceStats:
        if len(features) < 2:
            raise FidError(f"{source or 'reference'}: FID statistics need at least 2 images, got {len(features)}")
        pool = features.pool.double().numpy()
        return cls(mu=pool.mean(axis=0), sigma=np.cov(pool, rowvar=False), pool=features.pool.numpy(),
                   count=len(features), inception_sha256=inception.sha256, source=source)

    def save(self, path: str | Path) -> Path:
        """An ``.npz`` with ADM's ``mu``/``sigma`` keys (+ ours, see the module docstring), written atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, np.ndarray] = {ADM_MEAN: self.mu, ADM_COVARIANCE: self.sigma}
        if self.pool is not None:
            arrays[POOL_KEY] = self.pool.astype(np.float32)
        if self.count is not None:
            arrays[COUNT_KEY] = np.array(self.count, dtype=np.int64)
        if self.inception_sha256:
            arrays[WEIGHTS_KEY] = np.array(self.inception_sha256)
        with atomic_path(path, suffix=".npz") as tmp:  # np.savez adds .npz to a name without it
            np.savez(tmp, **arrays)
        return path


def _read_npz(path: Path, inception: Inception, need_features: bool, batch_size: int, progress: bool) -> ReferenceStats:
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as exc:  # not a zip, truncated, pickled object arrays
        raise FidError(f"{path}: cannot be read as an .npz of plain arrays: {exc}") from exc
    with data:
        keys = set(data.files)
        if ADM_MEAN not in keys or ADM_COVARIANCE not in keys:
            raise FidError(f"{path}: expected ADM's reference keys '{ADM_MEAN}' and '{ADM_COVARIANCE}' (pool_3 "
                           f"statistics), found {sorted(keys)}")
        sha = str(data[WEIGHTS_KEY]) if WEIGHTS_KEY in keys else None
        if sha is not None and sha != inception.sha256:
            raise FidError(f"{path}: computed with other Inception weights (sha256 {sha[:12]}...) than "
                           f"{inception.weights} ({inception.sha256[:12]}...): recompute it with these weights")
        mu, sigma = data[ADM_MEAN].astype(np.float64), data[ADM_COVARIANCE].astype(np.float64)
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise FidError(f"{path}: '{ADM_MEAN}' {mu.shape} and '{ADM_COVARIANCE}' {sigma.shape} are not a mean "
                           "and its covariance")
        pool = data[POOL_KEY] if POOL_KEY in keys else None
        count = int(data[COUNT_KEY]) if COUNT_KEY in keys else None
        if need_features and pool is None:
            if ADM_IMAGES not in keys:
                raise FidError(f"{path}: precision/recall need per-image features ('{POOL_KEY}') or the reference "
                               f"images ('{ADM_IMAGES}'); this file has neither ({sorted(keys)})")
            pool = _array_features(data[ADM_IMAGES], inception, batch_size, progress).pool.numpy()
            count = len(pool)
    return ReferenceStats(mu=mu, sigma=sigma, pool=pool, count=count, inception_sha256=sha, source=str(path))


def load_reference(
    reference: str | Path,
    inception: Inception,
    *,
    need_features: bool = False,
    batch_size: int = 50,
    resolution: int | None = None,
    workers: int = 0,
    progress: bool = True,
) -> ReferenceStats:
    """Reference statistics from an ``.npz`` (ADM's format or ours) or computed from a folder of images."""
    path = Path(reference)
    if path.is_dir():
        features = folder_features(path, inception, batch_size=batch_size, resolution=resolution, workers=workers,
                                   progress=progress)
        return ReferenceStats.from_features(features, inception, source=str(path))
    if not path.is_file():
        raise FidError(f"{path}: no such reference (an .npz of statistics or a folder of images)")
    return _read_npz(path, inception, need_features, batch_size, progress)


# -- metrics ----------------------------------------------------------------------------------------------------------
def frechet_distance(a: ReferenceStats, b: ReferenceStats) -> float:
    """FID between two sets of pool_3 statistics (torch-fidelity's formula, in float64)."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    if a.mu.shape != b.mu.shape:
        raise FidError(f"statistics of different sizes: {a.mu.shape} ({a.source}) vs {b.mu.shape} ({b.source})")
    stats = [{"mu": s.mu.astype(np.float64), "sigma": s.sigma.astype(np.float64)} for s in (a, b)]
    return float(fid_statistics_to_metric(stats[0], stats[1], verbose=False)[KEY_METRIC_FID])


def inception_score(logits: Tensor, splits: int = ISC_SPLITS) -> tuple[float, float]:
    """(mean, std) of the Inception Score over ``splits`` splits (at most one per image)."""
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric

    if logits.shape[0] < 1:
        raise FidError("the Inception Score needs at least one image")
    out = isc_features_to_metric(logits, splits=min(splits, logits.shape[0]), shuffle=True, rng_seed=2020)
    return float(out[KEY_METRIC_ISC_MEAN]), float(out[KEY_METRIC_ISC_STD])


def precision_recall(generated_pool: Tensor, reference_pool: Tensor | np.ndarray,
                     neighborhood: int = PRC_NEIGHBORHOOD, device: str | torch.device = "cpu") -> dict[str, float]:
    """Improved precision / recall / F-score of generated vs reference pool_3 features (k-NN balls, k = 3).

    Distances are computed on ``device`` in blocks of 10,000 rows (torch-fidelity's low-memory path: 50k x 50k
    images never hold the whole distance matrix)."""
    from torch_fidelity.metric_prc import prc_features_to_metric

    reference = torch.as_tensor(np.asarray(reference_pool), dtype=torch.float32, device=device)
    smallest = min(len(generated_pool), len(reference))
    if smallest <= neighborhood:
        raise FidError(f"precision/recall with k = {neighborhood} need more than {neighborhood} images per side, "
                       f"got {len(generated_pool)} generated and {len(reference)} reference")
    out = prc_features_to_metric(generated_pool.float().to(device), reference, prc_neighborhood=neighborhood,
                                 prc_batch_size=10000, save_cpu_ram=True, verbose=False)
    return {"precision": float(out["precision"]), "recall": float(out["recall"]), "f_score": float(out["f_score"])}


def generation_metrics(
    generated: str | Path,
    reference: str | Path,
    *,
    inception: Inception | None = None,
    inception_weights: str | Path | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 50,
    isc: bool = False,
    prc: bool = False,
    resolution: int | None = None,
    save_reference: str | Path | None = None,
    workers: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """gFID of the images under ``generated`` against ``reference`` (``.npz`` or folder), with the Inception
    Score (``isc``) and precision/recall (``prc``). ``resolution`` centre-crops the images of a reference folder
    to that size (generated images are taken as they are); ``save_reference`` writes the reference statistics computed from a folder."""
    net = inception or load_inception(inception_weights, device)
    ref = load_reference(reference, net, need_features=prc, batch_size=batch_size, resolution=resolution,
                         workers=workers, progress=progress)
    if save_reference is not None:
        if not Path(reference).is_dir():
            raise FidError(f"--save-ref: {reference} is already a statistics file, not a folder of images")
        ref.save(save_reference)
    feats = folder_features(generated, net, batch_size=batch_size, workers=workers, progress=progress)
    gen = ReferenceStats.from_features(feats, net, source=str(generated))
    out: dict[str, Any] = {"fid": frechet_distance(gen, ref)}
    if isc:
        out["isc_mean"], out["isc_std"] = inception_score(feats.logits)
    if prc:
        assert ref.pool is not None  # need_features=True
        out.update(precision_recall(feats.pool, ref.pool, device=net.device))
    out.update({"images": len(feats), "reference": str(reference), "reference_images": ref.count,
                "inception": net.describe()})
    return out


# -- rFID -------------------------------------------------------------------------------------------------------------
@dataclass
class ReconstructionFid:
    """rFID over an evaluation pass: reconstructions against the originals of the same pass (default) or against
    given reference statistics. Images enter in [-1, 1] and are quantised as the reference code saves them
    (``inception.to_uint8``)."""

    inception: Inception
    reference: ReferenceStats | None = None
    _recons: FeatureCollector = field(init=False)
    _originals: FeatureCollector | None = field(init=False)

    def __post_init__(self) -> None:
        self._recons = FeatureCollector(self.inception)
        self._originals = FeatureCollector(self.inception) if self.reference is None else None

    def update(self, originals: Tensor, reconstructions: Tensor) -> None:
        self._recons.add(to_uint8(reconstructions))
        if self._originals is not None:
            self._originals.add(to_uint8(originals))

    def compute(self) -> dict[str, float]:
        recon = ReferenceStats.from_features(self._recons.result(), self.inception, source="reconstructions")
        if self._originals is not None:
            ref = ReferenceStats.from_features(self._originals.result(), self.inception, source="originals")
        else:
            assert self.reference is not None
            ref = self.reference
        return {"rfid": frechet_distance(recon, ref)}


def write_json(metrics: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(path, json.dumps(metrics, indent=2) + "\n")


def format_table(metrics: dict[str, Any], names: Iterable[str] = ("fid", "isc_mean", "isc_std", "precision",
                                                                   "recall", "f_score", "images",
                                                                   "reference_images")) -> str:
    rows = [(n, metrics[n]) for n in names if metrics.get(n) is not None]
    width = max(len(n) for n, _ in rows)
    return "\n".join(f"{n:<{width}}  {v:.4f}" if isinstance(v, float) else f"{n:<{width}}  {v}" for n, v in rows)
