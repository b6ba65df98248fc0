"""``xqgan-run sample``: images sampled from a trained generator run, one PNG per sample and a grid with one
labelled row per class, at any scale: the 50 000 images of a gFID evaluation stream to disk batch by batch (nothing
is held in memory), split across ranks under torchrun, and an interrupted job continues with ``--resume``.

>>> written = sample_run("runs/var-tiny", "samples/", classes=[0, 3, 7], n=4, options=SamplingOptions(cfg_scale=2.0))

Sampling settings left at None take the run's ``[sample]`` table (the ones its evaluation grid used).

Reproducibility: batch ``b`` (the sequences ``b * batch_size ...`` of the class-major list: every sample of the
first class, then of the next) draws from its own generator seeded by ``(seed, b)``. The same seed and batch size
give the same images whatever the number of ranks and however often the job was restarted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from .atomic import atomic_path
from .distributed import DistEnv, item_seed, process_group
from .generator_run import GeneratorRun, load_generator_run
from .image_grid import grid_image, save_grid, to_uint8
from .interfaces import Device
from .runfile import SampleSection
from .tokenizer import OutputExistsError

__all__ = ["SamplingOptions", "parse_classes", "sample_batch", "sample_run", "GRID"]

GRID = "grid.png"
DEFAULT_CLASSES = 8  # rows sampled when no classes are asked for
GRID_ROWS, GRID_COLUMNS = 32, 16  # the grid shows at most this many classes x samples (the first ones)


@dataclass(frozen=True)
class SamplingOptions:
    """How to sample; None = the generator run's ``[sample]`` setting."""

    cfg_scale: float | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    batch_size: int = 32

    def resolved(self, defaults: SampleSection) -> SamplingOptions:
        return replace(
            self,
            **{name: getattr(defaults, name) for name in ("cfg_scale", "temperature", "top_k", "top_p", "seed")
               if getattr(self, name) is None},
        )  # fmt: skip


def parse_classes(text: str, num_classes: int | None = None) -> list[int]:
    """``"0,3,7"``, ``"0-9,20"`` (inclusive ranges) or ``"all"`` (needs ``num_classes``) -> class ids in order.
    ValueError naming the bad part."""
    if text.strip() == "all":
        if num_classes is None:
            raise ValueError("--classes all: the number of classes is not known here")
        return list(range(num_classes))
    ids: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        first, sep, last = part.partition("-")
        try:
            lo, hi = (int(first), int(last)) if sep else (int(part), int(part))
        except ValueError:
            raise ValueError(f"--classes {text!r}: {part!r} is not a class id or a range like 0-9") from None
        if hi < lo:
            raise ValueError(f"--classes {text!r}: the range {part!r} is empty")
        ids.extend(range(lo, hi + 1))
    return ids


def sample_batch(run: GeneratorRun, classes: Sequence[int | None], options: SamplingOptions, batch: int) -> Tensor:
    """One image per entry of ``classes`` (None = the null class: unconditional), ``(len(classes), 3, H, W)`` in
    [-1, 1], drawn with the generator of batch number ``batch`` (module docstring)."""
    opts = options.resolved(run.sample)
    device = run.tokenizer.torch_device
    rng = torch.Generator(device=device).manual_seed(item_seed(int(opts.seed or 0), batch))
    null = run.num_classes
    cond = torch.tensor([null if c is None else c for c in classes], dtype=torch.long, device=device)
    with torch.no_grad():
        tokens = run.generator.sample(
            len(cond), cond if run.num_classes else None, cfg_scale=float(opts.cfg_scale),
            temperature=float(opts.temperature), top_k=int(opts.top_k), top_p=float(opts.top_p), generator=rng,
        )  # fmt: skip
        return run.decode(tokens).float().cpu()


def _name(c: int | None) -> str:
    return f"class{c:04d}" if c is not None else "unconditional"


def _refuse_existing(targets: Sequence[Path]) -> None:
    existing = [t for t in targets if t.exists() or t.is_symlink()]
    if existing:
        listed = "\n".join(f"  {t} (exists)" for t in existing[:10]) + ("\n  ..." if len(existing) > 10 else "")
        raise OutputExistsError(f"sample would overwrite {len(existing)} file(s); choose another --out folder, pass "
                                f"--resume to complete an interrupted job or --force to overwrite; nothing was "
                                f"written:\n{listed}")  # fmt: skip


def _write_png(path: Path, pixels: np.ndarray) -> None:
    """Atomically: an interrupted job never leaves a truncated PNG that ``--resume`` would take as done."""
    with atomic_path(path, durable=False) as tmp:
        Image.fromarray(pixels).save(tmp, format="PNG")


def sample_run(
    generator_run: str | Path,
    out_dir: str | Path,
    *,
    classes: Sequence[int] | str | None = None,
    n: int = 4,
    options: SamplingOptions = SamplingOptions(),
    device: Device | str | torch.device | None = None,
    use_ema: bool = True,
    overwrite: bool = False,
    resume: bool = False,
    grid: bool = True,
    progress: bool = False,
    dist_timeout_s: float = 4 * 3600.0,
) -> list[Path]:
    """Sample ``n`` images of each class (ids, or a ``parse_classes`` text such as ``"0-999"`` / ``"all"``; default:
    the first 8 classes; one unconditional row for an unconditional generator) and write
    ``<out>/class0003_000.png``... and, with ``grid``, ``<out>/grid.png`` (the first ``GRID_ROWS`` classes x
    ``GRID_COLUMNS`` samples, read back from the written files); returns every target path, the grid last when
    written.

    Under torchrun every rank samples the batches ``b`` with ``b % world == rank`` on its own device and rank 0
    writes the grid after a barrier. ``resume`` keeps batches whose PNGs all exist; ``overwrite`` redraws
    everything; otherwise existing files are refused before anything is sampled (OutputExistsError). ValueError for
    a class id the run does not have."""
    from .devices import device_named

    env = DistEnv.from_environ()
    if env.distributed:
        device = device if isinstance(device, Device) else device_named(None if device is None else str(device))
    with process_group(device, env, dist_timeout_s):
        return _sample_rank(generator_run, Path(out_dir), classes, n, options, device, use_ema, overwrite, resume,
                            grid, progress, env)  # fmt: skip


def _sample_rank(generator_run: str | Path, out: Path, classes: Sequence[int] | str | None, n: int,
                 options: SamplingOptions, device: Device | str | torch.device | None, use_ema: bool,
                 overwrite: bool, resume: bool, grid: bool, progress: bool, env: DistEnv) -> list[Path]:  # fmt: skip
    run = load_generator_run(generator_run, device=device, use_ema=use_ema)
    if isinstance(classes, str):
        classes = parse_classes(classes, run.num_classes)
    rows: list[int | None]
    if run.num_classes == 0:
        if classes:
            raise ValueError(f"--classes: {generator_run} is an unconditional generator (trained without labels); "
                             "sample it without --classes")  # fmt: skip
        rows = [None]
    else:
        rows = list(classes) if classes else list(range(min(DEFAULT_CLASSES, run.num_classes)))
        bad = [c for c in rows if not 0 <= c < run.num_classes]
        if bad:
            raise ValueError(f"--classes: {bad[:10]} not in 0..{run.num_classes - 1} (the run's {run.num_classes} "
                             "classes)")  # fmt: skip
    wanted = [(c, i) for c in rows for i in range(n)]
    targets = [out / f"{_name(c)}_{i:03d}.png" for c, i in wanted]
    grid_path = [out / GRID] if grid else []
    if not (overwrite or resume):
        _refuse_existing(targets + grid_path)  # every rank checks every file, so all ranks agree
    if env.distributed:
        torch.distributed.barrier()  # no rank writes before every rank has checked
    size = options.batch_size
    batches = [b for b in range(-(-len(wanted) // size)) if b % env.world == env.rank]
    if resume and not overwrite:
        batches = [b for b in batches if not all(t.is_file() for t in targets[b * size : (b + 1) * size])]
    out.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=sum(len(targets[b * size : (b + 1) * size]) for b in batches), unit="img", desc="sample",
               disable=not (progress and env.is_main), dynamic_ncols=True)  # fmt: skip
    for b in batches:
        chunk = slice(b * size, (b + 1) * size)
        pixels = to_uint8(sample_batch(run, [c for c, _ in wanted[chunk]], options, b))
        for path, pic in zip(targets[chunk], pixels):
            _write_png(path, pic)
        bar.update(len(pixels))
    bar.close()
    if env.distributed:
        torch.distributed.barrier()
    if grid and env.is_main:
        _write_grid(out / GRID, run, rows, n)
    return targets + grid_path


def _write_grid(path: Path, run: GeneratorRun, rows: Sequence[int | None], n: int) -> None:
    shown, cols = list(rows[:GRID_ROWS]), min(n, GRID_COLUMNS)
    pixels = np.stack([np.stack([np.asarray(Image.open(path.parent / f"{_name(c)}_{i:03d}.png").convert("RGB"))
                                 for i in range(cols)]) for c in shown])  # fmt: skip
    labels = ["unconditional" if c is None else f"{c}: {run.class_names[c]}" if run.class_names[c] else str(c)
              for c in shown]  # fmt: skip
    save_grid(grid_image(pixels, labels), path)
