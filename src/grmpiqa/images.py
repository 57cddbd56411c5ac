"""Robust image decoding: every file becomes an 8-bit RGB ``PIL.Image`` or an ImageError.

Handles EXIF orientation, grayscale, palette, RGBA/LA (composited on white, as a viewer
shows them), CMYK and 16-bit PNG/TIFF. Only the raster formats of
:data:`ALLOWED_FORMATS` are ever decoded, chosen by the file's first bytes
(:func:`sniff_format`) whatever its name, and Pillow is opened with only that format's
plugin: no plugin that runs an external program (EPS runs Ghostscript) is reachable.
Images above ``max_pixels``, or whose decoded size (:func:`decoded_bytes`: width x height
x channels x bytes per sample, from the header) is above ``max_decoded_bytes``, are
refused before their pixels are decoded. See docs/reliability.md ("Limits").
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TypeVar

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from grmpiqa.errors import ImageError, ImageTooLargeError, NotAnImageError

T = TypeVar("T")
DEFAULT_MAX_PIXELS = 100_000_000
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm", ".jfif"}
)

#: The Pillow formats grmpiqa decodes, with the first bytes that identify each. A file is
#: decoded only when its content starts with one of these signatures, and then only by
#: that format's Pillow plugin (``Image.open(..., formats=[...])``): PostScript/EPS (which
#: runs Ghostscript), PDF, PSD, JPEG 2000, ICO, SVG, ... are refused whatever the file is
#: called. GIF: the first frame. TIFF: the first page.
ALLOWED_FORMATS: dict[str, tuple[bytes, ...]] = {
    "JPEG": (b"\xff\xd8\xff",),
    "PNG": (b"\x89PNG\r\n\x1a\n",),
    "GIF": (b"GIF87a", b"GIF89a"),
    "BMP": (b"BM",),
    "TIFF": (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"),
    "WEBP": (b"RIFF",),  # and b"WEBP" at offset 8 (checked in sniff_format)
    "PPM": (b"P1", b"P2", b"P3", b"P4", b"P5", b"P6"),
}
#: How many leading bytes :func:`sniff_format` needs.
SNIFF_BYTES = 16
#: Content recognised only to say what it is in the refusal.
_OTHER_CONTENT: tuple[tuple[bytes, str], ...] = (
    (b"%!PS", "PostScript"),
    (b"\xc5\xd0\xd3\xc6", "EPS"),
    (b"%PDF", "PDF"),
    (b"8BPS", "Photoshop PSD"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
    (b"\xffO\xffQ", "JPEG 2000"),
    (b"PK\x03\x04", "a ZIP archive"),
    (b"<svg", "SVG"),
    (b"<?xml", "XML"),
)
#: An encoded image larger than this many bytes per allowed pixel (16-bit RGBA
#: uncompressed is 8), plus :data:`ENCODED_SLACK`, is refused before it is read into memory.
ENCODED_BYTES_PER_PIXEL = 8
ENCODED_SLACK = 1 << 20


def accepted_formats() -> str:
    """The allowlist as users read it (``JPEG, PNG, GIF, BMP, TIFF, WEBP, PPM``)."""
    return ", ".join(ALLOWED_FORMATS)


def sniff_format(head: bytes) -> str | None:
    """The allowed Pillow format whose signature ``head`` (the first
    :data:`SNIFF_BYTES` bytes of a file) starts with, or None.

    >>> sniff_format(b"\\x89PNG\\r\\n\\x1a\\n" + bytes(8))
    'PNG'
    >>> sniff_format(b"%!PS-Adobe-3.0 EPSF-3.0") is None
    True
    """
    for fmt, signatures in ALLOWED_FORMATS.items():
        if head.startswith(signatures):
            if fmt == "WEBP" and head[8:12] != b"WEBP":
                continue
            return fmt
    return None


def _describe_content(head: bytes) -> str:
    stripped = head.lstrip()
    for magic, what in _OTHER_CONTENT:
        if head.startswith(magic) or stripped.startswith(magic):
            return what
    if stripped[:1] == b"<":
        return "HTML or XML text"
    return "unrecognised format"


def _refuse_content(name: str, head: bytes) -> NotAnImageError:
    if not head:
        return NotAnImageError(f"{name}: empty file, not an image")
    return NotAnImageError(
        f"{name}: not an image file in an accepted format ({_describe_content(head)}; "
        f"accepted: {accepted_formats()})"
    )


def max_encoded_bytes(max_pixels: int) -> int:
    """The largest encoded image (a tar member, an upload) worth reading for ``max_pixels``."""
    return int(max_pixels) * ENCODED_BYTES_PER_PIXEL + ENCODED_SLACK


def check_encoded_size(size: int, max_pixels: int, name: str) -> None:
    """Refuse (before reading it) an encoded image of ``size`` bytes no allowed image needs."""
    limit = max_encoded_bytes(max_pixels)
    if size > limit:
        raise ImageTooLargeError(
            f"{name}: {size} bytes, larger than any image within the pixel limit could be "
            f"({limit} bytes for {max_pixels} pixels, --max-pixels)"
        )


def _bytes_per_sample(img: Image.Image) -> int:
    """Bytes per channel sample the decoder produces (16-bit data counts 2, 32-bit 4)."""
    mode = img.mode
    if mode in ("I", "F"):
        return 4
    if mode.startswith("I;16"):
        return 2
    for tile in getattr(img, "tile", None) or []:
        args = tile.args
        raw = args[0] if isinstance(args, tuple) and args else args
        if isinstance(raw, str) and ";16" in raw:  # e.g. a 16-bit RGB PNG ("RGB;16B")
            return 2
    return 1


def decoded_bytes(img: Image.Image) -> int:
    """What decoding ``img`` (opened, not loaded) costs in bytes, from its header:
    width x height x channels x bytes per sample (16-bit data counts 2 bytes a sample).

    After a JPEG ``draft`` the reduced size is what counts.
    """
    w, h = img.size
    return int(w) * int(h) * len(img.getbands()) * _bytes_per_sample(img)


@dataclass(frozen=True)
class ImageInfo:
    """What an image's header says: its format, size, mode and decoded cost."""

    format: str
    width: int
    height: int
    mode: str
    decoded_bytes: int


def split_by_budget(costs: Sequence[int], budget: int) -> list[list[int]]:
    """Consecutive groups of indices whose summed ``costs`` stay within ``budget`` (an
    item over the budget on its own forms its own group): the images a batched decoder
    may hold decoded at once.

    >>> split_by_budget([3, 3, 3, 9, 1], 6)
    [[0, 1], [2], [3], [4]]
    """
    groups: list[list[int]] = []
    total = 0
    for i, c in enumerate(costs):
        if groups and total + c <= budget and groups[-1]:
            groups[-1].append(i)
            total += c
        else:
            groups.append([i])
            total = c
    return groups


def is_image_file(path: str | os.PathLike[str]) -> bool:
    """True when the file name has a known image extension."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def load_image(
    source: str | os.PathLike[str] | bytes,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    *,
    min_side: int | None = None,
    name: str | None = None,
    max_decoded_bytes: int | None = None,
) -> Image.Image:
    """Decode a file (or its bytes) fully into an RGB image; :class:`ImageError` names it.

    ``min_side``: the image will only be used at this size or smaller (e.g. resized to
    244 x 244), so a JPEG may be decoded at a reduced scale (1/2, 1/4 or 1/8, the DCT's
    own scaling, much faster for large photos) as long as both sides stay at least
    ``min_side``. Other formats decode in full. EXIF orientation is applied after.
    ``name`` is what errors call the image (default: the path, or ``<image bytes>``).
    ``max_decoded_bytes``: refuse an image whose :func:`decoded_bytes` is larger.
    Only :data:`ALLOWED_FORMATS` are decoded (by content, see :func:`sniff_format`).
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        return load_image_bytes(
            bytes(source),
            name or "<image bytes>",
            max_pixels,
            min_side=min_side,
            max_decoded_bytes=max_decoded_bytes,
        )
    label = name or str(source)
    with _open_file(source, label) as fh:
        return _decode(fh, label, max_pixels, min_side, max_decoded_bytes)


def check_regular_file(path: str | os.PathLike[str], label: str) -> int:
    """A path to score must be a regular file (a FIFO named ``x.jpg`` would block);
    returns its size."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ImageError(f"{label}: no such file") from None
    except OSError as err:
        raise ImageError(f"{label}: cannot read file ({err.strerror or err})") from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageError(f"{label}: is a directory, not an image")
    if not stat.S_ISREG(st.st_mode):
        raise ImageError(f"{label}: not a regular file")
    return int(st.st_size)


@contextlib.contextmanager
def _open_file(path: str | os.PathLike[str], label: str) -> Iterator[IO[bytes]]:
    """``open(path, "rb")`` whose failures are one-line :class:`ImageError` naming ``label``."""
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        raise ImageError(f"{label}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{label}: is a directory, not an image") from None
    except PermissionError:
        raise ImageError(f"{label}: cannot read file (permission denied)") from None
    with fh:
        yield fh


def load_image_bytes(
    data: bytes,
    name: str = "<upload>",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    *,
    min_side: int | None = None,
    max_decoded_bytes: int | None = None,
) -> Image.Image:
    """Decode image bytes (an upload) like :func:`load_image`; errors name ``name``."""
    if not data:
        raise NotAnImageError(f"{name}: empty file, not an image")
    return _decode(io.BytesIO(data), name, max_pixels, min_side, max_decoded_bytes)


def probe_image(
    source: str | os.PathLike[str] | bytes,
    name: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    *,
    min_side: int | None = None,
) -> ImageInfo:
    """Read only the header of an image (no pixels): its format, size, mode and
    :func:`decoded_bytes` as :func:`load_image` would decode it (a JPEG at the reduced
    DCT scale ``min_side`` allows). Refuses what :func:`load_image` refuses from the
    header alone (content outside the allowlist, too many pixels)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        label = name or "<image bytes>"
        if not source:
            raise NotAnImageError(f"{label}: empty file, not an image")
        return _with_open(io.BytesIO(bytes(source)), label, max_pixels, min_side, _info)
    label = name or str(source)
    with _open_file(source, label) as fh:
        return _with_open(fh, label, max_pixels, min_side, _info)


def _info(img: Image.Image, name: str) -> ImageInfo:
    w, h = img.size
    return ImageInfo(str(img.format), w, h, img.mode, decoded_bytes(img))


def _open_allowed(fh: IO[bytes], name: str) -> Image.Image:
    """Sniff the content and open it with only that format's Pillow plugin."""
    head = fh.read(SNIFF_BYTES)
    fmt = sniff_format(head)
    if fmt is None:
        raise _refuse_content(name, head)
    fh.seek(0)
    return Image.open(fh, formats=[fmt])


def _with_open(
    fh: IO[bytes],
    name: str,
    max_pixels: int,
    min_side: int | None,
    then: Callable[[Image.Image, str], T],
) -> T:
    """Open ``fh`` (allowlisted, sniffed), check the pixel limit, apply the JPEG draft,
    then ``then(img, name)``; Pillow's errors become one-line :class:`ImageError` s."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with _open_allowed(fh, name) as img:
                w, h = img.size
                if w * h > max_pixels:
                    raise ImageTooLargeError(
                        f"{name}: image too large ({w}x{h} = {w * h} pixels > limit {max_pixels})"
                    )
                if (
                    min_side is not None
                    and img.format in ("JPEG", "MPO")
                    and min(w, h) > 2 * min_side
                ):
                    scale = min(w, h) / min_side
                    img.draft("RGB", (max(1, int(w / scale)), max(1, int(h / scale))))
                return then(img, name)
    except ImageError:
        raise
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except UnidentifiedImageError:
        raise NotAnImageError(
            f"{name}: not an image file (unrecognised format; accepted: {accepted_formats()})"
        ) from None
    except Image.DecompressionBombError as err:
        raise ImageTooLargeError(f"{name}: image too large ({err})") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as err:
        raise ImageError(f"{name}: cannot decode image ({err})") from None


def _decode(
    source: Path | IO[bytes],
    name: str,
    max_pixels: int,
    min_side: int | None = None,
    max_decoded_bytes: int | None = None,
) -> Image.Image:
    if isinstance(source, Path):
        with open(source, "rb") as fh:
            return _decode(fh, name, max_pixels, min_side, max_decoded_bytes)

    def load(img: Image.Image, label: str) -> Image.Image:
        if max_decoded_bytes is not None:
            cost = decoded_bytes(img)
            if cost > max_decoded_bytes:
                raise ImageTooLargeError(
                    f"{label}: image too large to decode ({img.size[0]}x{img.size[1]} {img.mode}"
                    f" = {_mb(cost)} decoded > limit {_mb(max_decoded_bytes)})"
                )
        img.load()
        return to_rgb(img)

    return _with_open(source, name, max_pixels, min_side, load)


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


#: 16-bit value -> round(v * 255 / 65535) (exact: (2v + 257) // 514, no ties exist).
_LUT16 = ((np.arange(65536, dtype=np.uint32) * 2 + 257) // 514).astype(np.uint8)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB, honouring EXIF orientation."""
    img = ImageOps.exif_transpose(img) or img
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        # round(v * 255 / 65535) through a table: one pass, no wider temporary
        arr8 = _LUT16[np.asarray(img)]
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if mode == "I":
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
