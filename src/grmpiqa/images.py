"""Robust image decoding: every file becomes an 8-bit RGB ``PIL.Image`` or an ImageError.

Handles EXIF orientation, grayscale, palette, RGBA/LA (composited on white, as a viewer
shows them), CMYK and 16-bit PNG. Images above ``max_pixels`` are refused before their
pixels are decoded.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from grmpiqa.errors import ImageError, ImageTooLargeError, NotAnImageError

DEFAULT_MAX_PIXELS = 100_000_000
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm", ".jfif"}
)


def is_image_file(path: str | os.PathLike[str]) -> bool:
    """True when the file name has a known image extension."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def load_image(
    source: str | os.PathLike[str] | bytes,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    *,
    min_side: int | None = None,
    name: str | None = None,
) -> Image.Image:
    """Decode a file (or its bytes) fully into an RGB image; :class:`ImageError` names it.

    ``min_side``: the image will only be used at this size or smaller (e.g. resized to
    244 x 244), so a JPEG may be decoded at a reduced scale (1/2, 1/4 or 1/8, the DCT's
    own scaling, much faster for large photos) as long as both sides stay at least
    ``min_side``. Other formats decode in full. EXIF orientation is applied after.
    ``name`` is what errors call the image (default: the path, or ``<image bytes>``).
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        return load_image_bytes(
            bytes(source), name or "<image bytes>", max_pixels, min_side=min_side
        )
    path = Path(source)
    label = name or str(path)
    try:
        return _decode(path, label, max_pixels, min_side)
    except FileNotFoundError:
        raise ImageError(f"{label}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{label}: is a directory, not an image") from None


def load_image_bytes(
    data: bytes,
    name: str = "<upload>",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    *,
    min_side: int | None = None,
) -> Image.Image:
    """Decode image bytes (an upload) like :func:`load_image`; errors name ``name``."""
    if not data:
        raise NotAnImageError(f"{name}: empty file, not an image")
    return _decode(io.BytesIO(data), name, max_pixels, min_side)


def _decode(
    source: Path | io.BytesIO, name: str, max_pixels: int, min_side: int | None = None
) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                w, h = img.size
                if w * h > max_pixels:
                    raise ImageTooLargeError(
                        f"{name}: image too large ({w}x{h} = {w * h} pixels > limit {max_pixels})"
                    )
                if min_side is not None and img.format == "JPEG" and min(w, h) > 2 * min_side:
                    scale = min(w, h) / min_side
                    img.draft("RGB", (max(1, int(w / scale)), max(1, int(h / scale))))
                img.load()
                return to_rgb(img)
    except ImageError:
        raise
    except (FileNotFoundError, IsADirectoryError):
        raise
    except UnidentifiedImageError:
        raise NotAnImageError(f"{name}: not an image file (unrecognised format)") from None
    except Image.DecompressionBombError as err:
        raise ImageTooLargeError(f"{name}: image too large ({err})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise ImageError(f"{name}: cannot decode image ({err})") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB, honouring EXIF orientation."""
    img = ImageOps.exif_transpose(img) or img
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr8 = np.clip(np.round(arr * (255.0 / peak)), 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        scale = 255.0 if arr.max() <= 1.0 else 1.0
        arr8 = np.clip(np.round(arr * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode != "RGB":
        return img.convert("RGB")
    return img
