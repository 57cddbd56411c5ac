"""Request bodies -> named images, or a per-image error with its reason.

Two forms are accepted (``POST /v1/score``): multipart form data with one or more file
fields named ``image``, or JSON ``{"images": [{"name": "a.jpg", "data": "<base64>"}]}``
(``data`` may be a ``data:`` URL). Names are labels only: the service never opens a
path named in a request.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from dataclasses import dataclass
from typing import Any

from PIL import Image
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request

from grmpiqa.errors import ImageError, ImageTooLargeError, NotAnImageError
from grmpiqa.images import load_image_bytes
from grmpiqa.utils import load_json

#: Reasons of per-image errors (also the ``reason`` label of the error metric).
REASONS = ("not_an_image", "too_large", "corrupt", "bad_data")
#: A JSON request body nests 3 levels ({"images": [{...}]}); deeper is refused unparsed.
MAX_REQUEST_JSON_DEPTH = 16
_MAX_NAME = 200


class RequestError(Exception):
    """The request as a whole is unusable: answered with ``status`` and ``message``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Upload:
    """One image of a request: its bytes, or why there are none."""

    name: str
    data: bytes | None = None
    error: str | None = None
    reason: str | None = None


def _clean_name(name: Any, index: int) -> str:
    text = str(name) if name else f"image{index + 1}"
    text = text.replace("\\", "/").rsplit("/", 1)[-1] or f"image{index + 1}"
    return "".join(c for c in text if c.isprintable())[:_MAX_NAME]


async def read_uploads(request: Request, max_images: int) -> list[Upload]:
    """The images of a ``/v1/score`` request, in request order."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        uploads = await _from_multipart(request, max_images)
    elif ctype == "application/json" or ctype.endswith("+json"):
        uploads = await asyncio.to_thread(_from_json, await request.body())
    else:
        raise RequestError(
            415,
            f"unsupported content type {ctype or '(none)'!r}: send multipart/form-data with "
            'file fields named \'image\', or application/json {"images": [{"name", "data"}]}',
        )
    if not uploads:
        raise RequestError(400, "no images in the request (file fields must be named 'image')")
    if len(uploads) > max_images:
        raise RequestError(
            413, f"{len(uploads)} images in one request; the limit is {max_images} (--max-images)"
        )
    return uploads


async def _from_multipart(request: Request, max_images: int) -> list[Upload]:
    try:
        form = await request.form(max_files=max_images + 1, max_fields=max_images + 64)
    except HTTPException as err:
        if "Too many files" in str(err.detail) or "Too many fields" in str(err.detail):
            raise RequestError(
                413,
                f"more than {max_images} images in one request; the limit is {max_images} "
                "(--max-images)",
            ) from None
        raise RequestError(400, f"malformed multipart body ({err.detail})") from None
    except Exception as err:  # noqa: BLE001 - the multipart parser raises several types
        raise RequestError(400, f"malformed multipart body ({err})") from None
    try:
        out = []
        for i, item in enumerate(form.getlist("image")):
            if isinstance(item, UploadFile):
                out.append(Upload(_clean_name(item.filename, i), await item.read()))
            else:
                name = _clean_name(None, i)
                out.append(
                    Upload(name, error=f"{name}: a text field, not a file", reason="bad_data")
                )
        return out
    finally:
        await form.close()


def _from_json(body: bytes) -> list[Upload]:
    try:
        doc = load_json(body, MAX_REQUEST_JSON_DEPTH)
    except (ValueError, UnicodeDecodeError) as err:
        raise RequestError(400, f"body is not valid JSON ({err})") from None
    images = doc.get("images") if isinstance(doc, dict) else None
    if not isinstance(images, list):
        raise RequestError(400, 'JSON body must be {"images": [{"name": ..., "data": ...}]}')
    out = []
    for i, item in enumerate(images):
        if not isinstance(item, dict):
            name = _clean_name(None, i)
            out.append(Upload(name, error=f"{name}: entry is not an object", reason="bad_data"))
            continue
        name = _clean_name(item.get("name"), i)
        data = item.get("data")
        if not isinstance(data, str):
            out.append(Upload(name, error=f"{name}: no base64 'data' string", reason="bad_data"))
            continue
        if data.startswith("data:") and "," in data:
            data = data.split(",", 1)[1]
        try:
            out.append(Upload(name, base64.b64decode("".join(data.split()), validate=True)))
        except (binascii.Error, ValueError):
            out.append(Upload(name, error=f"{name}: 'data' is not valid base64", reason="bad_data"))
    return out


def decode(
    upload: Upload, max_pixels: int, min_side: int | None = None, max_bytes: int | None = None
) -> Image.Image:
    """Decode an upload (as ``grmpiqa score`` decodes files: a large JPEG may decode at a
    reduced scale down to ``min_side``; only allowlisted formats, by content); raises
    :class:`ImageError` (subclasses tell the reason)."""
    if upload.data is None:
        raise ImageError(upload.error or f"{upload.name}: no data")
    return load_image_bytes(
        upload.data, upload.name, max_pixels, min_side=min_side, max_decoded_bytes=max_bytes
    )


def reason_of(err: ImageError) -> str:
    if isinstance(err, NotAnImageError):
        return "not_an_image"
    if isinstance(err, ImageTooLargeError):
        return "too_large"
    return "corrupt"


def status_when_none_readable(reasons: list[str]) -> int:
    """HTTP status when no image of a request could be read: 413 if any was too large,
    415 if none was an image at all, else 400."""
    if "too_large" in reasons:
        return 413
    if reasons and all(r == "not_an_image" for r in reasons):
        return 415
    return 400
