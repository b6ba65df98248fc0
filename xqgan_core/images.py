"""Image decoding shared by training data sources and inference (``Tokenizer``): any file or PIL mode -> 8-bit RGB.

Safety limits live here so every reader gets them: a pixel-count cap checked from the header before anything is
decoded (decompression bombs), 16-bit and 32-bit data converted without float64 copies of the whole image, and
float images holding NaN/inf rejected instead of becoming garbage. Failures raise ``ImageReadError`` whose message
reads ``path: reason``.

Crops (``square_box`` + ``render``) are a square box in the source image's own coordinates resampled once to R x R
(bicubic, antialiased by PIL when shrinking), which equals "resize the shorter side to R, then crop" without
resizing the whole image first.
"""

from __future__ import annotations

import io
import os

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageReadError

#: Default pixel-count cap (width * height): PIL's own decompression-bomb error threshold, about 13400 x 13400 px.
#: An RGB image of that size takes ~540 MB once decoded.
DEFAULT_MAX_PIXELS = 178_956_970

Box = tuple[float, float, float, float]

#: Where the cap is configured, for messages.
MAX_PIXELS_OPTION = "data.max_pixels"


def load_rgb(
    path: str | os.PathLike[str], draft_size: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """Decode an image file into an 8-bit RGB PIL image, raising ``ImageReadError`` ("path: reason") on failure.

    EXIF orientation is applied. ``draft_size`` lets JPEG decoding shrink by a power of two (DCT scaling) while
    keeping both sides >= ``draft_size``: much faster for large photos that are resized down anyway. Images with
    more than ``max_pixels`` pixels are refused from their header, before decoding.
    """
    name = os.fspath(path)
    return _decode(name, name, draft_size, max_pixels)


def decode_rgb(
    data: bytes, name: str, draft_size: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """``load_rgb`` for an encoded image held in memory (e.g. an entry of a webdataset tar); ``name`` is used in
    messages ("name: reason")."""
    return _decode(name, io.BytesIO(data), draft_size, max_pixels)


def _decode(name: str, source: str | io.BytesIO, draft_size: int | None, max_pixels: int) -> Image.Image:
    try:
        empty = source.getbuffer().nbytes == 0 if isinstance(source, io.BytesIO) else os.path.getsize(source) == 0
        if empty:
            raise ImageReadError(f"{name}: empty file (0 bytes)", name, "empty file (0 bytes)")
        with Image.open(source) as im:
            _check_pixel_count(name, im, max_pixels)
            if draft_size is not None and im.format in ("JPEG", "MPO"):
                im.draft("RGB", (draft_size, draft_size))
            im.load()
            return as_rgb(_exif_upright(im))
    except ImageReadError:
        raise
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError, struct.error, ...)
        reason = failure_reason(exc)
        raise ImageReadError(f"{name}: {reason}", name, reason) from exc


def check_image_file(path: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> str | None:
    """Cheap up-front check of one file: None if it looks readable, else the reason.

    PIL's ``verify()`` checks PNG chunk CRCs but not JPEG bodies, so JPEGs are decoded at 1/8 scale instead: the
    whole entropy-coded stream is still read (a truncated body fails) at a fraction of a full decode's cost.
    """
    try:
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
        with Image.open(path) as im:
            _check_pixel_count(path, im, max_pixels)
            if im.format in ("JPEG", "MPO"):
                im.draft("RGB", (1, 1))
                im.load()
            else:
                im.verify()
    except ImageReadError as exc:
        return exc.reason
    except Exception as exc:
        return failure_reason(exc)
    return None


def as_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB: 16-bit and float data are rescaled (not clipped), transparency is composited on
    white (the hidden colour under transparent pixels is arbitrary), CMYK/palette/grayscale are converted.

    Raises ``ValueError`` for float images with NaN or infinite values (they have no meaningful 8-bit rendering).
    """
    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return im
    if mode.startswith("I;16"):
        return Image.fromarray(_uint16_to_uint8(np.asarray(im)), "L").convert("RGB")
    if mode == "I":  # 32-bit signed; comes from 16-bit PNG/TIFF/PGM in practice
        arr = np.asarray(im)
        peak = int(arr.max()) if arr.size else 0
        return Image.fromarray(_scaled_to_uint8(arr, 65535 if peak <= 65535 else peak), "L").convert("RGB")
    if mode == "F":
        arr = np.asarray(im)
        _require_finite(arr)
        peak = float(arr.max()) if arr.size else 0.0
        # float images are usually [0, 1]; otherwise stretch to the peak
        return Image.fromarray(_scaled_to_uint8(arr, 1.0 if peak <= 1.0 else peak), "L").convert("RGB")
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
        a = _uint16_to_uint8(a)
    elif a.dtype.kind == "f":
        _require_finite(a)
        a = _scaled_to_uint8(a, 1.0)
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


# ----------------------------------------------------------------------------------------------------------------


def _check_pixel_count(name: str, im: Image.Image, max_pixels: int) -> None:
    pixels = im.width * im.height
    if pixels > max_pixels:
        reason = (
            f"image too large: {im.width} x {im.height} = {pixels:,} pixels, more than {MAX_PIXELS_OPTION} = "
            f"{max_pixels:,} (a guard against decompression bombs; raise {MAX_PIXELS_OPTION} if the file is genuine)"
        )
        raise ImageReadError(f"{name}: {reason}", name, reason)


def _uint16_to_uint8(a: np.ndarray) -> np.ndarray:
    """round(a / 257) in integer arithmetic, in place on one 4-byte copy (instead of 8-byte float64 temporaries)."""
    out = a.astype(np.uint32)
    out += 128
    out //= 257
    return out.astype(np.uint8)


def _scaled_to_uint8(a: np.ndarray, scale: float) -> np.ndarray:
    """round(clip(a / scale, 0, 1) * 255) in float32, computed in place on one float32 copy."""
    out = a.astype(np.float32)  # always a copy: the in-place steps below must not touch the caller's array
    out *= np.float32(255.0 / scale)
    np.clip(out, 0.0, 255.0, out=out)
    np.rint(out, out=out)
    return out.astype(np.uint8)


class NonFiniteImageError(ValueError):
    """A float image holds NaN or infinite values."""


def _require_finite(a: np.ndarray) -> None:
    if a.size and not (np.isfinite(a.min()) and np.isfinite(a.max())):  # NaN propagates; no per-pixel temporary
        raise NonFiniteImageError("float image contains NaN or infinite pixel values")


def failure_reason(exc: BaseException) -> str:
    """A short human reason for a decoding failure (the "reason" part of "path: reason")."""
    if isinstance(exc, NonFiniteImageError):
        return str(exc)
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
