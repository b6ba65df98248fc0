"""``xqgan-run sample``: images sampled from a trained generator run, one PNG per sample and a grid with one
labelled row per class.

>>> written = sample_run("runs/var-tiny", "samples/", classes=[0, 3, 7], n=4, options=SamplingOptions(cfg_scale=2.0))

Sampling settings left at None take the run's ``[sample]`` table (the ones its evaluation grid used).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from .generator_run import GeneratorRun, load_generator_run
from .interfaces import Device
from .runfile import SampleSection
from .tokenizer import OutputExistsError

__all__ = ["SamplingOptions", "sample_classes", "labelled_grid", "sample_run", "GRID"]

GRID = "grid.png"
DEFAULT_CLASSES = 8  # rows sampled when no classes are asked for


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


def sample_classes(run: GeneratorRun, classes: Sequence[int | None], n: int, options: SamplingOptions) -> Tensor:
    """``n`` images per entry of ``classes`` (None = the null class: unconditional), ``(len(classes), n, 3, H, W)``
    in [-1, 1]. Every sequence comes from one seeded generator, drawn in batches of ``options.batch_size``."""
    opts = options.resolved(run.sample)
    device = run.tokenizer.torch_device
    rng = torch.Generator(device=device).manual_seed(int(opts.seed or 0))
    null = run.num_classes
    wanted = torch.tensor([null if c is None else c for c in classes for _ in range(n)], dtype=torch.long)
    images = []
    with torch.no_grad():
        for start in range(0, len(wanted), opts.batch_size):
            cond = wanted[start : start + opts.batch_size].to(device)
            tokens = run.generator.sample(
                len(cond), cond if run.num_classes else None, cfg_scale=float(opts.cfg_scale),
                temperature=float(opts.temperature), top_k=int(opts.top_k), top_p=float(opts.top_p), generator=rng,
            )  # fmt: skip
            images.append(run.decode(tokens).float().cpu())
    out = torch.cat(images)
    return out.view(len(classes), n, *out.shape[1:])


def labelled_grid(images: Tensor, labels: Sequence[str], gutter: int = 2) -> Image.Image:
    """``(rows, n, 3, H, W)`` images in [-1, 1] as one picture: a row per entry of ``labels``, the label on its left."""
    rows, n, _, h, w = images.shape
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = max((int(probe.textlength(label, font=font)) for label in labels), default=0)
    row_h = max(h, 12)
    margin = text_w + 3 * gutter if text_w else 0
    canvas = Image.new("RGB", (margin + n * (w + gutter) + gutter, rows * (row_h + gutter) + gutter), "white")
    draw = ImageDraw.Draw(canvas)
    pixels = _to_uint8(images)
    for r in range(rows):
        y = gutter + r * (row_h + gutter)
        if labels[r]:  # vertically centred by its box (text anchors need FreeType fonts)
            top, bottom = draw.textbbox((0, 0), labels[r], font=font)[1::2]
            draw.text((gutter, y + (row_h - (bottom - top)) // 2 - top), labels[r], fill="black", font=font)
        for c in range(n):
            canvas.paste(Image.fromarray(pixels[r, c]), (margin + gutter + c * (w + gutter), y + (row_h - h) // 2))
    return canvas


def _to_uint8(images: Tensor) -> np.ndarray:
    """``(..., 3, H, W)`` in [-1, 1] -> ``(..., H, W, 3)`` uint8."""
    arr = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return np.ascontiguousarray(arr.movedim(-3, -1).numpy())


def _targets(out: Path, classes: Sequence[int | None], n: int) -> list[Path]:
    names = [f"class{c:04d}" if c is not None else "unconditional" for c in classes]
    return [out / f"{name}_{i:03d}.png" for name in names for i in range(n)] + [out / GRID]


def _refuse_existing(targets: Sequence[Path], overwrite: bool) -> None:
    existing = [t for t in targets if t.exists() or t.is_symlink()]
    if existing and not overwrite:
        listed = "\n".join(f"  {t} (exists)" for t in existing[:10]) + ("\n  ..." if len(existing) > 10 else "")
        raise OutputExistsError(f"sample would overwrite {len(existing)} file(s); choose another --out folder or pass "
                                f"--force to overwrite; nothing was written:\n{listed}")  # fmt: skip


def sample_run(
    generator_run: str | Path,
    out_dir: str | Path,
    *,
    classes: Sequence[int] | None = None,
    n: int = 4,
    options: SamplingOptions = SamplingOptions(),
    device: Device | str | torch.device | None = None,
    use_ema: bool = True,
    overwrite: bool = False,
) -> list[Path]:
    """Sample ``n`` images of each class (default: the first 8 classes; one unconditional row for an unconditional
    generator) and write ``<out>/class0003_000.png``... and ``<out>/grid.png``; returns the written paths, grid last.

    ValueError for a class id the run does not have; OutputExistsError (before sampling) when a PNG exists and
    ``overwrite`` is off."""
    run = load_generator_run(generator_run, device=device, use_ema=use_ema)
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
            raise ValueError(f"--classes: {bad} not in 0..{run.num_classes - 1} (the run's {run.num_classes} classes)")
    out = Path(out_dir)
    targets = _targets(out, rows, n)
    _refuse_existing(targets, overwrite)
    images = sample_classes(run, rows, n, options)
    out.mkdir(parents=True, exist_ok=True)
    pixels = _to_uint8(images)
    for path, pic in zip(targets, pixels.reshape(-1, *pixels.shape[2:])):
        Image.fromarray(pic).save(path, format="PNG")
    labels = ["unconditional" if c is None else f"{c}: {run.class_names[c]}" if run.class_names[c] else str(c)
              for c in rows]  # fmt: skip
    labelled_grid(images, labels).save(targets[-1], format="PNG")
    return targets
