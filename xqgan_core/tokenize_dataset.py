"""``xqgan-run tokenize``: run a frozen tokenizer once over a dataset and write token shards with class labels
(``xqgan_core.token_shards``), so generators train on tokens instead of images.

Inputs: an image folder whose class sub-folders are the labels (sorted names -> ids), webdataset tar shards
(``shards/{000..009}.tar``: an image entry and a ``cls`` entry per sample), or the built-in sample photographs
(``--built-in-samples``: seeded random crops, class = the source photograph). Images are centre-cropped and resized
to the tokenizer's resolution as the data sources do for evaluation (``--flip`` adds the mirrored image's tokens).

The work is cut into units, one per output shard (``shard_size`` images of a folder, one input tar each): unit n is
done by rank ``n % world`` under torchrun, written atomically, and skipped when a restarted job finds it written by
the same job (same tokenizer weights, data, resolution and options: ``token_shards.job_fingerprint``). Rank 0
writes ``index.json`` after a barrier, once every shard exists. Unreadable images are reported and skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .devices import device_named
from .distributed import DistEnv, item_seed, process_group
from .errors import ConfigError, ImageReadError, XQGanError
from .images import DEFAULT_MAX_PIXELS, decode_rgb, load_rgb, render, square_box
from .interfaces import Device
from .token_shards import (
    INDEX, LABELS, TokenFolderError, job_fingerprint, layout_to_json, read_shard_meta, shard_name, token_dtype,
    weights_sha256, write_index, write_shard,
)  # fmt: skip
from .tokenizer import Tokenizer

__all__ = ["Decoded", "Inputs", "Report", "TokenizeError", "Unit", "center_view", "finish_index", "folder_units",
           "sample_units", "tokenize", "tokenize_units", "webdataset_units"]  # fmt: skip

#: Image entries of a webdataset sample, in order of preference (lower-cased extensions).
WDS_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "ppm")
DEFAULT_SHARD_SIZE = 5000


class TokenizeError(XQGanError):
    """The tokenization job cannot run as asked (another job's shards in --out, no inputs, ...)."""


@dataclass(frozen=True)
class Decoded:
    """One input, ready to encode: ``image`` (3, R, R) in [-1, 1], or None with ``error`` ("reason") when unreadable."""

    image: Tensor | None
    label: int
    source: str
    error: str | None = None


@dataclass(frozen=True)
class Unit:
    """The inputs of one output shard: ``dataset`` yields ``Decoded`` items (``size`` of them; None = unknown until
    read, e.g. a tar). An iterable dataset is read by at most one loader worker (its items cannot be split)."""

    number: int
    dataset: torch.utils.data.Dataset
    size: int | None


@dataclass
class Inputs:
    """What to tokenize: the units, a description for the job fingerprint and index.json, and the class names
    (None: ids found in the data, named by their number)."""

    units: list[Unit]
    description: dict[str, Any]
    classes: list[str] | None = None


def center_view(img: Any, resolution: int) -> Tensor:
    """The centre square of a PIL image resampled to ``resolution`` (as ``Tokenizer.preprocess`` and evaluation do)."""
    return render(img, square_box(img.width, img.height), resolution)


# ----------------------------------------------------------------------------------------------------------------
# inputs


class _FileViews(torch.utils.data.Dataset):
    def __init__(self, files: Sequence[tuple[str, int]], resolution: int, max_pixels: int) -> None:
        self.files, self.resolution, self.max_pixels = list(files), resolution, max_pixels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Decoded:
        path, label = self.files[i]
        try:
            img = load_rgb(path, draft_size=self.resolution, max_pixels=self.max_pixels)
        except ImageReadError as exc:
            return Decoded(None, label, path, exc.reason or str(exc))
        return Decoded(center_view(img, self.resolution), label, path)


def folder_units(root: str | Path, resolution: int, shard_size: int = DEFAULT_SHARD_SIZE,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> Inputs:  # fmt: skip
    """Every image under ``root`` (sorted by relative path); labels = sorted class sub-folder names."""
    from .sources.folder import DEFAULT_EXTENSIONS, _list_images

    root = Path(root).expanduser()
    try:
        files, classes = _list_images(root, DEFAULT_EXTENSIONS)
    except ConfigError as exc:
        raise TokenizeError("--data: " + "; ".join(p.removeprefix("data.root: ") for p in exc.problems)) from None
    listing = "\n".join(f"{Path(p).relative_to(root).as_posix()}\t{label}" for p, label in files)
    chunks = [files[start : start + shard_size] for start in range(0, len(files), shard_size)]
    units = [Unit(n, _FileViews(chunk, resolution, max_pixels), len(chunk)) for n, chunk in enumerate(chunks)]
    description = {"kind": "folder", "root": str(root.resolve()), "images": len(files), "shard_size": shard_size,
                   "listing_sha256": hashlib.sha256(listing.encode()).hexdigest()}  # fmt: skip
    return Inputs(units, description, classes)


class _SampleViews(torch.utils.data.Dataset):
    """Seeded random crops of the sample photographs: item i is crop ``i`` drawn with key (i, item_seed(seed, i))."""

    def __init__(self, crops: Any, positions: Sequence[int], seed: int) -> None:
        self.crops, self.positions, self.seed = crops, list(positions), seed

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int) -> Decoded:
        pos = self.positions[i]
        item = self.crops[(pos, item_seed(self.seed, pos))]
        photo = item["index"] // self.crops.per_image
        return Decoded(item["image"], photo, f"skimage.data.{self.crops.images[photo][0]} crop {pos}")


def sample_units(resolution: int, crops_per_image: int = 32, seed: int = 0, shard_size: int = DEFAULT_SHARD_SIZE,
                 images: Sequence[str] | None = None) -> Inputs:  # fmt: skip
    """``crops_per_image`` seeded random crops of each training photograph of the ``sample`` data source; the label
    of a crop is its photograph (classes = the photographs' names)."""
    from .registry import build

    table: dict[str, Any] = {"use": "sample", "package": "xqgan-core", "resolution": resolution,
                             "crops_per_image": crops_per_image, "flip": False}  # fmt: skip
    if images:
        table["images"] = list(images)
    crops = build("data", table).train_set()
    classes = [name for name, _, _ in crops.images]
    n = len(crops)
    units = [
        Unit(u, _SampleViews(crops, range(start, min(n, start + shard_size)), seed), min(n, start + shard_size) - start)
        for u, start in enumerate(range(0, n, shard_size))
    ]
    description = {"kind": "sample", "images": classes, "crops_per_image": crops_per_image, "seed": seed,
                   "shard_size": shard_size}  # fmt: skip
    return Inputs(units, description, classes)


class _TarViews(torch.utils.data.IterableDataset):
    def __init__(self, url: str, resolution: int, max_pixels: int) -> None:
        self.url, self.resolution, self.max_pixels = url, resolution, max_pixels

    def __iter__(self) -> Iterator[Decoded]:
        from webdataset.tariterators import tarfile_samples

        try:
            for sample in tarfile_samples([{"url": self.url}]):
                yield self._decoded(sample)
        except Exception as exc:  # noqa: BLE001 - a broken or missing tar: stop the job, naming it
            raise TokenizeError(f"cannot read webdataset shard {self.url}: {type(exc).__name__}: {exc}") from exc

    def _decoded(self, sample: dict[str, Any]) -> Decoded:
        name = f"{self.url}:{sample.get('__key__', '?')}"
        image_key = next((k for k in WDS_IMAGE_KEYS if k in sample), None)
        label = -1
        try:
            label = int(bytes(sample["cls"]).decode().strip())
        except (KeyError, ValueError, UnicodeDecodeError):
            reason = "no 'cls' entry" if "cls" not in sample else f"'cls' is not an integer: {sample['cls'][:20]!r}"
            return Decoded(None, label, name, reason)
        if image_key is None:
            return Decoded(None, label, name, f"no image entry ({', '.join(WDS_IMAGE_KEYS)})")
        try:
            img = decode_rgb(bytes(sample[image_key]), name, draft_size=self.resolution, max_pixels=self.max_pixels)
        except ImageReadError as exc:
            return Decoded(None, label, name, exc.reason or str(exc))
        return Decoded(center_view(img, self.resolution), label, name)


def webdataset_units(pattern: str, resolution: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> Inputs:
    """One unit per tar of ``pattern`` (brace-expanded: ``shards/{000..009}.tar``); class names = the ids found."""
    try:
        from braceexpand import braceexpand
    except ImportError:
        raise TokenizeError(
            "--data: reading webdataset shards needs the webdataset package: pip install 'xqgan-core[webdataset]'"
        ) from None
    urls = list(braceexpand(pattern))
    local = [u for u in urls if "://" not in u and not u.startswith("pipe:")]
    missing = [u for u in local if not Path(u).is_file()]
    if missing:
        raise TokenizeError(f"--data: {len(missing)} of {len(urls)} tar file(s) do not exist: {', '.join(missing[:3])}")
    units = [Unit(n, _TarViews(url, resolution, max_pixels), None) for n, url in enumerate(urls)]
    description = {"kind": "webdataset", "urls": [str(Path(u).resolve()) if u in local else u for u in urls]}
    return Inputs(units, description, None)


# ----------------------------------------------------------------------------------------------------------------
# the job


@dataclass
class Report:
    """What one rank did: shards written now, shards found done, unreadable inputs skipped."""

    written: list[int] = field(default_factory=list)
    reused: list[int] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def _autocast_dtype(device: Device, precision: str) -> torch.dtype | None:
    """``auto``: bf16 where the device supports it, else fp32 (fp16 is never chosen implicitly: its range can move
    latents across codebook boundaries)."""
    dtype = device.autocast_dtype(precision)
    return None if precision == "auto" and dtype != torch.bfloat16 else dtype


def _fingerprint(tokenizer: Tokenizer, resolution: int, flip: bool, inputs: Inputs) -> str:
    layout = layout_to_json(tokenizer.layout_for(resolution, resolution))
    return job_fingerprint(tokenizer_sha256=weights_sha256(tokenizer), resolution=resolution, flip=flip,
                           layout=layout, data=inputs.description)  # fmt: skip


def _check_out(out: Path, job: str) -> bool:
    """True when ``out`` already holds this job's finished index; TokenizeError when it holds another job's files."""
    index = out / INDEX
    if index.is_file():
        try:
            recorded = json.loads(index.read_text(encoding="utf-8")).get("job")
        except (OSError, ValueError):
            recorded = None
        if recorded == job:
            return True
        raise TokenizeError(f"--out {out} already holds a token folder made by another job (other tokenizer, data "
                            "or options); choose another --out folder or delete it")  # fmt: skip
    foreign = [p.name for p in sorted(out.glob("shard-*.safetensors")) if (read_shard_meta(p) or {}).get("job") != job]
    if foreign:
        raise TokenizeError(f"--out {out} holds {len(foreign)} shard(s) of another job or damaged ones "
                            f"({', '.join(foreign[:3])}); choose another --out folder or delete them")  # fmt: skip
    return False


def tokenize_units(
    tokenizer: Tokenizer,
    inputs: Inputs,
    out: str | Path,
    *,
    flip: bool = False,
    batch_size: int = 64,
    workers: int = 0,
    precision: str = "auto",
    rank: int = 0,
    world: int = 1,
    progress: bool = True,
    report: Callable[[str], None] | None = None,
) -> Report:
    """Tokenize this rank's units (unit n belongs to rank ``n % world``) into ``out``; units whose shard this job
    already wrote are skipped. Does not write the index (``finish_index`` does, once every rank is done)."""
    out = Path(out)
    resolution = _resolution(tokenizer)
    job = _fingerprint(tokenizer, resolution, flip, inputs)
    out.mkdir(parents=True, exist_ok=True)
    result = Report()
    if _check_out(out, job):
        return result
    say = report or (lambda line: tqdm.write(line, file=sys.stderr))
    dtype = token_dtype(tokenizer.layout_for(resolution, resolution))
    autocast = _autocast_dtype(tokenizer.device, precision)
    mine = [u for u in inputs.units if u.number % world == rank]
    todo = []
    for unit in mine:
        if (read_shard_meta(out / shard_name(unit.number)) or {}).get("job") == job:
            result.reused.append(unit.number)
        else:
            todo.append(unit)
    sizes = [u.size for u in mine]
    total = sum(s for s in sizes if s is not None) if None not in sizes else None
    done = sum(u.size or 0 for u in mine if u.number in result.reused)
    bar = tqdm(total=total, initial=done, desc="tokenize", unit="img", disable=not progress, dynamic_ncols=True)
    with bar:
        for unit in todo:
            tokens, labels, flipped, skipped = _run_unit(tokenizer, unit, batch_size, workers, autocast, flip, bar, say)
            write_shard(out / shard_name(unit.number), tokens.to(dtype), labels,
                        flipped.to(dtype) if flipped is not None else None, job, skipped)  # fmt: skip
            result.written.append(unit.number)
            result.skipped += skipped
    return result


def _run_unit(
    tokenizer: Tokenizer, unit: Unit, batch_size: int, workers: int, autocast: torch.dtype | None, flip: bool,
    bar: Any, say: Callable[[str], None],
) -> tuple[Tensor, Tensor, Tensor | None, list[str]]:  # fmt: skip
    iterable = isinstance(unit.dataset, torch.utils.data.IterableDataset)
    loader = torch.utils.data.DataLoader(
        unit.dataset, batch_size=batch_size, num_workers=min(workers, 1) if iterable else workers, collate_fn=list
    )
    tokens: list[Tensor] = []
    flipped: list[Tensor] = []
    labels: list[int] = []
    skipped: list[str] = []
    layout = tokenizer.layout_for(_resolution(tokenizer), _resolution(tokenizer))
    empty = torch.zeros(0, layout.length, layout.tokens_per_step, dtype=torch.int64)
    for batch in loader:
        good = [d for d in batch if d.image is not None]
        for d in batch:
            if d.image is None:
                skipped.append(f"{d.source}: {d.error}")
                say(f"skipping {d.source}: {d.error}")
        if good:
            images = torch.stack([d.image for d in good])
            tokens.append(_encode(tokenizer, images, autocast))
            if flip:  # a pass of its own: the originals' tokens do not depend on the flipped batch
                flipped.append(_encode(tokenizer, images.flip(-1), autocast))
            labels += [d.label for d in good]
        bar.update(len(batch))
    return (
        torch.cat(tokens) if tokens else empty,
        torch.tensor(labels, dtype=torch.int64),
        (torch.cat(flipped) if flipped else empty) if flip else None,
        skipped,
    )


def _encode(tokenizer: Tokenizer, images: Tensor, autocast: torch.dtype | None) -> Tensor:
    with torch.no_grad(), tokenizer.device.autocast(autocast):
        return tokenizer.encode(images, as_sequence=True).cpu()


def _resolution(tokenizer: Tokenizer) -> int:
    if not tokenizer.resolution:
        raise TokenizeError(f"{tokenizer.checkpoint}: the tokenizer's run file has no data.resolution to tokenize at")
    return int(tokenizer.resolution)


def finish_index(tokenizer: Tokenizer, inputs: Inputs, out: str | Path, *, flip: bool, tokenizer_run: str) -> Path:
    """Write ``out/index.json`` once every unit's shard exists (rank 0, after every rank finished); returns its path."""
    from safetensors import safe_open

    out = Path(out)
    resolution = _resolution(tokenizer)
    job = _fingerprint(tokenizer, resolution, flip, inputs)
    if _check_out(out, job):
        return out / INDEX
    shards, skipped, missing = [], [], []
    top_label = -1
    for unit in inputs.units:
        path = out / shard_name(unit.number)
        meta = read_shard_meta(path)
        if meta is None or meta["job"] != job:
            missing.append(path.name)
            continue
        shards.append({"file": path.name, "count": meta["count"]})
        skipped += meta["skipped"]
        if meta["count"]:
            with safe_open(str(path), framework="pt") as f:
                top_label = max(top_label, int(f.get_tensor(LABELS).max()))
    if missing:
        raise TokenFolderError(
            f"{out}: {len(missing)} shard(s) are missing ({', '.join(missing[:3])}): a rank failed? Run the same "
            "command again to finish them (written shards are kept)."
        )
    classes = inputs.classes if inputs.classes is not None else [str(i) for i in range(top_label + 1)]
    if top_label >= len(classes):
        raise TokenizeError(f"{out}: label {top_label} found, but only {len(classes)} classes are known")
    record = {
        "tokenizer": {"run": tokenizer_run, "checkpoint": str(Path(str(tokenizer.checkpoint)).resolve()),
                      "weights": str(Path(str(tokenizer.weights)).resolve()),
                      "sha256": weights_sha256(tokenizer)},  # fmt: skip
        "layout": layout_to_json(tokenizer.layout_for(resolution, resolution)),
        "dtype": str(token_dtype(tokenizer.layout_for(resolution, resolution))).removeprefix("torch."),
        "resolution": resolution,
        "flip": flip,
        "data": inputs.description,
        "classes": classes,
        "shards": shards,
        "count": sum(s["count"] for s in shards),
        "skipped": skipped,
        "job": job,
    }
    return write_index(out, record)


# ----------------------------------------------------------------------------------------------------------------
# the command


def default_workers() -> int:
    """Image-decoding workers when none are asked for: up to 4, never more than the CPUs this process may use (more
    only slow the encoder down, and torch's DataLoader warns about them)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(4, usable)


def tokenize(
    tokenizer_run: str,
    out: str | Path,
    *,
    data: str | None = None,
    built_in_samples: bool = False,
    crops_per_image: int = 32,
    seed: int = 0,
    flip: bool = False,
    batch_size: int = 64,
    workers: int | None = None,
    device: str | None = None,
    precision: str = "auto",
    shard_size: int = DEFAULT_SHARD_SIZE,
    use_ema: bool = True,
    progress: bool = True,
    dist_timeout_s: float = 4 * 3600.0,
    filename: str | None = None,
) -> Path | None:
    """``xqgan-run tokenize``: the whole job on this process's rank (every rank under torchrun). Returns the index
    path on rank 0, None on the other ranks."""
    import torch.distributed as dist

    env = DistEnv.from_environ()
    dev = device_named(device)
    with process_group(dev, env, dist_timeout_s):  # generous: ranks wait for the slowest one at the barrier
        tok = Tokenizer.from_pretrained(tokenizer_run, filename=filename, device=dev, use_ema=use_ema)
        resolution = _resolution(tok)
        if built_in_samples:
            inputs = sample_units(resolution, crops_per_image, seed, shard_size)
        elif data is None:
            raise TokenizeError("give --data (an image folder or webdataset tar shards) or --built-in-samples")
        elif Path(data).expanduser().is_dir():
            inputs = folder_units(data, resolution, shard_size, tok.max_pixels)
        elif ".tar" in data or "{" in data:
            inputs = webdataset_units(data, resolution, tok.max_pixels)
        else:
            raise TokenizeError(f"--data {data}: neither a folder of images nor webdataset tar shards (*.tar)")
        if workers is None:
            workers = default_workers()
        tokenize_units(tok, inputs, out, flip=flip, batch_size=batch_size, workers=workers, precision=precision,
                       rank=env.rank, world=env.world, progress=progress and env.is_main)  # fmt: skip
        if env.distributed:
            dist.barrier()
        if not env.is_main:
            return None
        return finish_index(tok, inputs, out, flip=flip, tokenizer_run=tokenizer_run)


