"""Sample grids: images in rows with 2-px white gutters, optionally a label left of each row (a class name), written
atomically. Used by the generator run's evaluation (``samples.png``) and by ``xqgan-run sample`` (``grid.png``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from .atomic import atomic_path

__all__ = ["to_uint8", "in_rows", "grid_image", "save_grid", "save_image_grid"]

GUTTER = 2


def to_uint8(images: Tensor) -> np.ndarray:
    """``(..., 3, H, W)`` in [-1, 1] -> ``(..., H, W, 3)`` uint8."""
    arr = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return np.ascontiguousarray(arr.movedim(-3, -1).numpy())


def in_rows(pixels: np.ndarray, columns: int) -> np.ndarray:
    """``(N, H, W, 3)`` pixels as ``(rows, columns, H, W, 3)``, the last row padded with white."""
    n = pixels.shape[0]
    rows = -(-n // columns)
    padded = np.full((rows * columns, *pixels.shape[1:]), 255, dtype=np.uint8)
    padded[:n] = pixels
    return padded.reshape(rows, columns, *pixels.shape[1:])


def grid_image(pixels: np.ndarray, labels: Sequence[str] = ()) -> Image.Image:
    """``(rows, n, H, W, 3)`` uint8 pixels as one picture, row r labelled ``labels[r]`` on its left (no labels: no
    margin)."""
    rows, n, h, w, _ = pixels.shape
    labels = list(labels) or [""] * rows
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = max((int(probe.textlength(label, font=font)) for label in labels), default=0)
    row_h = max(h, 12) if text_w else h
    margin = text_w + 3 * GUTTER if text_w else 0
    canvas = Image.new("RGB", (margin + n * (w + GUTTER) + GUTTER, rows * (row_h + GUTTER) + GUTTER), "white")
    draw = ImageDraw.Draw(canvas)
    for r in range(rows):
        y = GUTTER + r * (row_h + GUTTER)
        if labels[r]:  # vertically centred by its box (text anchors need FreeType fonts)
            top, bottom = draw.textbbox((0, 0), labels[r], font=font)[1::2]
            draw.text((GUTTER, y + (row_h - (bottom - top)) // 2 - top), labels[r], fill="black", font=font)
        for c in range(n):
            canvas.paste(Image.fromarray(pixels[r, c]), (margin + GUTTER + c * (w + GUTTER), y + (row_h - h) // 2))
    return canvas


def save_grid(picture: Image.Image, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, durable=False) as tmp:
        picture.save(tmp, format="PNG")
    return path


def save_image_grid(images: Tensor, path: str | Path, columns: int = 8) -> Path:
    """Images ``(N, 3, H, W)`` in [-1, 1] as one PNG, ``columns`` per row (the last row padded with white)."""
    pixels = to_uint8(images)
    return save_grid(grid_image(in_rows(pixels, max(1, min(columns, pixels.shape[0])))), path)
