"""Strict image decoding: every image is fully decoded at ingest, or rejected with a reason.

Training and evaluation loaders only ever see files that passed here, so they can stay strict and
never retry on an unreadable image.

Rules:

- The decoder is chosen from the file's content but restricted to the dataset's formats
  (``Image.open(..., formats=...)``): a PNG named ``.jpg`` is rejected for a JPEG-only dataset.
- ``verify()`` (checksums, structure) and then a full ``load()`` of every pixel on a fresh handle:
  ``verify`` alone decodes nothing. Truncated files are rejected: ``LOAD_TRUNCATED_IMAGES`` is never set.
- Decompression bombs are refused: more than `max_pixels` pixels (Pillow's own default limit unless
  told otherwise, and enforced here even if someone raised ``Image.MAX_IMAGE_PIXELS``), and Pillow's
  ``DecompressionBombWarning`` is turned into a rejection.
- Every decoder failure (``OSError``, ``ValueError``, ``SyntaxError``, ``EOFError``, ``struct.error``
  and the other exceptions Pillow plugins raise on malformed data) becomes :class:`ImageRejected`.
- EXIF orientation is applied (``ImageOps.exif_transpose``), so width/height are as displayed.
- Modes are converted to 8-bit RGB as follows (see ``_to_rgb``):

  ============================  =============================================================
  RGB                           unchanged
  L, 1                          grey replicated to the three channels (1: 0/255)
  P without transparency        palette expanded
  RGBA, LA, PA, RGBa, La,       alpha-composited over black: ``out = colour * alpha / 255``
  P / L / RGB with transparency
  CMYK                          Pillow's conversion (``R = 255 - min(255, C + K)``, no ICC)
  YCbCr, HSV, LAB               Pillow's conversion to RGB
  I;16, I;16L, I;16B, I;16N     16-bit: scaled ``round(v * 255 / 65535)``, never clipped
  I (32-bit int)                values in [0, 65535]: scaled as 16-bit; otherwise stretched
                                linearly from [min, max] to [0, 255]
  F (32-bit float)              values in [0, 1]: ``round(v * 255)``; otherwise stretched from
                                [min, max]; NaN/inf rejected
  ============================  =============================================================

  (16-bit-per-channel RGB PNGs are opened by Pillow as 8-bit RGB, keeping the high byte.)
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# Pillow's default MAX_IMAGE_PIXELS (~89.5 megapixels): a re-ID crop is a few thousand pixels.
DEFAULT_MAX_PIXELS = 1024 * 1024 * 1024 // 4 // 3

_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
_WITH_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")


class ImageRejected(ValueError):
    """The file is not a usable image; `reason` says why (it goes to the quarantine table)."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        # Crosses process boundaries (process pools, Ray workers) with both arguments.
        return (type(self), (self.path, self.reason))


def load_rgb(path: str | Path, formats: Sequence[str], max_pixels: int = DEFAULT_MAX_PIXELS, *,
             verify: bool = True) -> Image.Image:
    """Open `path` with a decoder restricted to `formats`, decode every pixel, return 8-bit RGB.

    Raises :class:`ImageRejected` with a one-line reason for anything that is not a complete,
    reasonably sized image of one of `formats`. ``verify=False`` skips the structural ``verify()``
    pass (chunk checksums) but still decodes every pixel: for files that already passed ingest.
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError as exc:
        raise ImageRejected(path, "file not found") from exc
    except OSError as exc:
        raise ImageRejected(path, f"unreadable file: {exc.strerror or exc}") from exc
    return decode_rgb(data, formats, name=path, max_pixels=max_pixels, verify=verify)


def decode_rgb(data: bytes, formats: Sequence[str], name: str | Path = "<bytes>",
               max_pixels: int = DEFAULT_MAX_PIXELS, *, verify: bool = True) -> Image.Image:
    """:func:`load_rgb` for bytes already in memory (`name` is only used in messages)."""
    if not data:
        raise ImageRejected(name, "empty file (0 bytes)")
    allowed = [f.upper() for f in formats]
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            if verify:
                with Image.open(io.BytesIO(data), formats=allowed) as probe:
                    _check_size(probe, name, max_pixels)
                    probe.verify()
            # Not a `with` block: closing would discard the pixels; the image owns only a BytesIO.
            img = Image.open(io.BytesIO(data), formats=allowed)
            _check_size(img, name, max_pixels)
            img.load()
            ImageOps.exif_transpose(img, in_place=True)
            return _to_rgb(img, name)
        except ImageRejected:
            raise
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
            raise ImageRejected(name, f"decompression bomb refused: {exc}") from exc
        except Image.UnidentifiedImageError as exc:
            raise ImageRejected(name, f"not an image of format {'/'.join(allowed)}") from exc
        except OSError as exc:
            raise ImageRejected(name, f"corrupt or truncated image: {exc}") from exc
        except Exception as exc:  # ValueError, SyntaxError, EOFError, struct.error, MemoryError, ...
            raise ImageRejected(name, f"corrupt image ({type(exc).__name__}: {exc})") from exc


def image_size(data: bytes, formats: Sequence[str], name: str | Path = "<bytes>") -> tuple[int, int]:
    """(width, height) from the header alone (``Image.open`` decodes no pixel): what a size limit is checked
    on before any decoding. Raises :class:`ImageRejected` when no decoder of `formats` reads the header."""
    if not data:
        raise ImageRejected(name, "empty file (0 bytes)")
    with warnings.catch_warnings():
        # Sizes past Pillow's warning threshold are what the caller checks next, against its own limit.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data), formats=[f.upper() for f in formats]) as probe:
                return probe.size
        except Image.DecompressionBombError as exc:  # over twice Pillow's limit: refused by Pillow itself
            raise ImageRejected(name, f"decompression bomb refused: {exc}") from exc
        except Image.UnidentifiedImageError as exc:
            raise ImageRejected(name, f"not an image of format {'/'.join(formats)}") from exc
        except Exception as exc:  # a malformed header: OSError, ValueError, SyntaxError, struct.error, ...
            raise ImageRejected(name, f"corrupt image header ({type(exc).__name__}: {exc})") from exc


def _check_size(img: Image.Image, name: str | Path, max_pixels: int) -> None:
    width, height = img.size
    if width <= 0 or height <= 0:
        raise ImageRejected(name, f"empty image ({width}x{height})")
    if width * height > max_pixels:
        raise ImageRejected(name, f"decompression bomb refused: {width}x{height} = {width * height} "
                                  f"pixels, over the limit of {max_pixels}")


def _to_rgb(img: Image.Image, name: str | Path) -> Image.Image:
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode in _SIXTEEN_BIT:
        return _grey_to_rgb(np.asarray(img, dtype=np.float64) * (255.0 / 65535.0))
    if mode == "I":
        values = np.asarray(img, dtype=np.float64)
        low, high = float(values.min()), float(values.max())
        if low >= 0.0 and high <= 65535.0:
            return _grey_to_rgb(values * (255.0 / 65535.0))
        return _grey_to_rgb(_stretch(values, low, high))
    if mode == "F":
        values = np.asarray(img, dtype=np.float64)
        if not np.isfinite(values).all():
            raise ImageRejected(name, "float image with NaN or infinite values")
        low, high = float(values.min()), float(values.max())
        if low >= 0.0 and high <= 1.0:
            return _grey_to_rgb(values * 255.0)
        return _grey_to_rgb(_stretch(values, low, high))
    if mode in _WITH_ALPHA or "transparency" in img.info:
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (0, 0, 0))
        canvas.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))
        return canvas
    return img.convert("RGB")


def _stretch(values: np.ndarray, low: float, high: float) -> np.ndarray:
    return (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)


def _grey_to_rgb(scaled: np.ndarray) -> Image.Image:
    grey = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)  # (H, W); values already in [0, 255]
    return Image.fromarray(grey).convert("RGB")
