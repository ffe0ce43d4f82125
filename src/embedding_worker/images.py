"""Image inputs: what a request may send as an image, and its decoding within limits.

An image arrives as a data URI (`data:image/png;base64,...`) or, where IMAGE_URL_HOSTS allows it, a
URL (image_urls.py fetches it). Decoding refuses more than IMAGE_MAX_BYTES of encoded bytes; more
than IMAGE_MAX_PIXELS pixels, checked from the header before any pixel is decoded (the guard
against decompression bombs; Pillow's own guard, which refuses at open, stays as it is); formats
other than PNG, JPEG, WebP and GIF (its first frame); and anything Pillow cannot read. Each refusal
is an invalid_input naming the item. A decoded image is converted to RGB (what every CLIP
processor does first) and handed at once to the model's own `prepare_image`, in a thread: only the
model's small input is kept, never the full-size pixels.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from . import errors
from .errors import APIError
from .limits import Limits

# Pillow's names of the formats decoded, and the subtypes of `data:image/<subtype>` that name them.
FORMATS = ("PNG", "JPEG", "WEBP", "GIF")
DATA_URI_TYPES = {"png": "PNG", "jpeg": "JPEG", "jpg": "JPEG", "webp": "WEBP", "gif": "GIF"}
# Smaller images are refused by Infinity's image path and carry nothing a model could use.
MIN_SIDE = 3

_DATA_URI = re.compile(r"data:image/([a-z0-9.+-]+)((?:;[a-z0-9=._+-]+)*);base64,", re.IGNORECASE)


@dataclass(frozen=True)
class ImageRef:
    """An image item of a request, not yet decoded: a data URI or a URL."""

    source: str

    @property
    def is_data_uri(self) -> bool:
        return self.source[:5].lower() == "data:"


def is_image_data_uri(text: str) -> bool:
    """Whether an input string is an image rather than a text: it opens as an image data URI."""
    return text[:11].lower() == "data:image/"


def _refused(index: int, reason: str) -> APIError:
    return errors.invalid_input(f"'input' item {index} {reason}", param="input")


def _base64_size(text_length: int) -> int:
    return text_length * 3 // 4


def data_uri_bytes(ref: ImageRef, index: int, limits: Limits) -> bytes:
    """The encoded image a data URI carries, its declared type and size checked."""
    header = _DATA_URI.match(ref.source)
    if header is None:
        raise _refused(index, "is not a base64 image data URI (data:image/<type>;base64,...)")
    subtype = header.group(1).lower()
    if subtype not in DATA_URI_TYPES:
        raise _refused(
            index, f"is an image of a type not decoded here; send one of {', '.join(FORMATS)}"
        )
    payload = ref.source[header.end() :]
    if _base64_size(len(payload)) > limits.max_image_bytes:
        raise _too_many_bytes(index, limits)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise _refused(index, "is not valid base64 after its data URI header") from None


def _too_many_bytes(index: int, limits: Limits) -> APIError:
    return _refused(
        index, f"is an image of more than {limits.max_image_bytes} bytes (IMAGE_MAX_BYTES)"
    )


def _too_many_pixels(index: int, size: str, limits: Limits) -> APIError:
    return _refused(
        index,
        f"is an image of {size}, more than {limits.max_image_pixels} pixels (IMAGE_MAX_PIXELS)",
    )


def decode(data: bytes, index: int, limits: Limits) -> Any:
    """An encoded image as an RGB Pillow image, within the limits; refusals name the item."""
    from PIL import Image, UnidentifiedImageError

    if len(data) > limits.max_image_bytes:
        raise _too_many_bytes(index, limits)
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)  # reads the header only
    except Image.DecompressionBombError:  # Pillow's own guard, at twice its MAX_IMAGE_PIXELS
        raise _too_many_pixels(index, "a size", limits) from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise _refused(
            index, f"is not an image that can be decoded here ({', '.join(FORMATS)})"
        ) from None
    width, height = image.size
    if width * height > limits.max_image_pixels:
        raise _too_many_pixels(index, f"{width}x{height} pixels", limits)
    if width < MIN_SIDE or height < MIN_SIDE:
        raise _refused(
            index, f"is an image of {width}x{height} pixels, under {MIN_SIDE}x{MIN_SIDE}"
        )
    try:
        image.load()  # the first frame of an animation
        return image if image.mode == "RGB" else image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        raise _refused(index, "is a damaged or truncated image") from None


# An image item as it reaches decoding: a data URI, or the bytes fetched for a URL.
Encoded = ImageRef | bytes


def prepare(
    encoded: Sequence[tuple[int, Encoded]], prepare_image: Callable[[Any], Any], limits: Limits
) -> list[Any]:
    """Decode each (item index, image) and turn it into the model's input at once."""
    prepared = []
    for index, image in encoded:
        data = data_uri_bytes(image, index, limits) if isinstance(image, ImageRef) else image
        prepared.append(prepare_image(decode(data, index, limits)))
    return prepared


# Requests of a few images are decoded in one thread hop; larger ones in a few, so that the decoding
# uses the cores the model leaves free.
_IMAGES_PER_THREAD = 8


async def prepare_all(
    encoded: list[tuple[int, Encoded]], prepare_image: Callable[[Any], Any], limits: Limits
) -> list[Any]:
    """`prepare` off the event loop: unpacking and decoding a large image take milliseconds."""
    chunks = [
        encoded[start : start + _IMAGES_PER_THREAD]
        for start in range(0, len(encoded), _IMAGES_PER_THREAD)
    ]
    if len(chunks) == 1:
        return await asyncio.to_thread(prepare, chunks[0], prepare_image, limits)
    done = await asyncio.gather(
        *(asyncio.to_thread(prepare, chunk, prepare_image, limits) for chunk in chunks)
    )
    return [item for chunk in done for item in chunk]
