"""Image inputs: what a request may send as an image, and its decoding within limits.

An image arrives as a data URI (`data:image/png;base64,...`) or, where IMAGE_URL_HOSTS allows it, a
URL (image_urls.py fetches it). Decoding refuses more than IMAGE_MAX_BYTES of encoded bytes; more
than IMAGE_MAX_PIXELS pixels, checked from the header before any pixel is decoded (the guard
against decompression bombs; Pillow's own guard, which refuses at open, stays as it is); formats
other than PNG, JPEG, WebP and GIF (its first frame); and anything Pillow cannot read. Each refusal
is an invalid_input naming the item. A request's images together decode at most
IMAGE_MAX_REQUEST_PIXELS (a 413), each charged from its header before it is decoded. A decoded
image is converted to RGB (what every CLIP processor does first) and handed at once to the model's
own `prepare_image`, in a thread: only the model's small input is kept, never the full-size pixels.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import re
import threading
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

from . import errors, image_urls
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


def _too_many_request_pixels(limits: Limits) -> APIError:
    return errors.too_large(
        f"the request's images hold more than {limits.max_request_image_pixels} pixels to decode "
        "(IMAGE_MAX_REQUEST_PIXELS); split them into smaller requests",
        param="input",
    )


class PixelBudget:
    """The pixels one request's images may decode (IMAGE_MAX_REQUEST_PIXELS): decoding costs about
    the same per pixel whatever the file's size (a 3 KB PNG can hold 25 million one-bit pixels), so
    each image is charged from its header, before it is decoded. Decoding threads share it."""

    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        self.left = limits.max_request_image_pixels
        self._lock = threading.Lock()

    def charge(self, image: Any) -> None:
        cost = decoded_pixels(image)
        with self._lock:
            if cost > self.left:
                raise _too_many_request_pixels(self._limits)
            self.left -= cost


def decoded_pixels(image: Any) -> int:
    """Pixels times frames decoded: `load()` decodes an animation's first frame only, so an
    animated GIF, WebP or PNG costs one frame, whatever the frames after it."""
    width, height = image.size
    return width * height


def _opened(data: bytes, index: int, limits: Limits) -> Any:
    """An encoded image's header read and checked: format, size and pixels; nothing decoded."""
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
    return image


def decode(data: bytes, index: int, limits: Limits, budget: PixelBudget | None = None) -> Any:
    """An encoded image as an RGB Pillow image, within the limits, charged to `budget` (if any)
    before it is decoded; refusals name the item."""
    from PIL import Image

    image = _opened(data, index, limits)
    if budget is not None:
        budget.charge(image)
    try:
        image.load()  # the first frame of an animation
        return image if image.mode == "RGB" else image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        raise _refused(index, "is a damaged or truncated image") from None


def charge_data_uris(
    refs: Sequence[tuple[int, ImageRef]], budget: PixelBudget, limits: Limits
) -> None:
    """Every data URI's header read and charged, so that a request over its pixels is refused
    before any image is decoded or fetched."""
    for index, ref in refs:
        budget.charge(_opened(data_uri_bytes(ref, index, limits), index, limits))


def prepare(
    refs: Sequence[tuple[int, ImageRef]], prepare_image: Callable[[Any], Any], limits: Limits
) -> list[Any]:
    """Decode each (item index, data URI) and turn it into the model's input at once."""
    return [
        prepare_image(decode(data_uri_bytes(ref, index, limits), index, limits))
        for index, ref in refs
    ]


# Requests of a few images are decoded in one thread hop; larger ones in a few, so that the decoding
# uses the cores the model leaves free.
_IMAGES_PER_THREAD = 8


async def prepare_all(
    items: Sequence[tuple[int, ImageRef]], prepare_image: Callable[[Any], Any], limits: Limits
) -> list[Any]:
    """Every (item index, image) unpacked or fetched, decoded and made the model's input, in
    order, off the event loop (decoding a large image takes milliseconds).

    Data URIs are charged to the request's pixels first, all of them, before anything is decoded or
    fetched. Each image URL is decoded as soon as it arrives, charged from its header first, and
    its bytes given back at once (image_urls.Fetcher bounds the bytes held)."""
    budget = PixelBudget(limits)
    data_uris = [(index, ref) for index, ref in items if ref.is_data_uri]
    urls = [(index, ref.source) for index, ref in items if not ref.is_data_uri]
    if data_uris:
        await asyncio.to_thread(charge_data_uris, data_uris, budget, limits)
    done: dict[int, Any] = {}

    async def unpack(chunk: list[tuple[int, ImageRef]]) -> None:
        prepared = await asyncio.to_thread(prepare, chunk, prepare_image, limits)
        done.update(zip((index for index, _ in chunk), prepared))

    def prepare_fetched(data: bytes, index: int) -> Any:
        return prepare_image(decode(data, index, limits, budget))

    async def fetch(fetcher: image_urls.Fetcher, index: int, url: str) -> None:
        async with fetcher.fetched(index, url) as data:
            done[index] = await asyncio.to_thread(prepare_fetched, data, index)

    work = [
        unpack(data_uris[start : start + _IMAGES_PER_THREAD])
        for start in range(0, len(data_uris), _IMAGES_PER_THREAD)
    ]
    if urls:
        async with image_urls.Fetcher(limits) as fetcher:
            await _all(work + [fetch(fetcher, index, url) for index, url in urls])
    else:
        await _all(work)
    return [done[index] for index, _ in items]


async def _all(work: list[Coroutine[Any, Any, None]]) -> None:
    """Run the coroutines together; the first failure cancels the rest and is raised as itself
    (a refusal first, if any)."""
    if len(work) == 1:
        await work[0]
        return
    try:
        async with asyncio.TaskGroup() as group:
            for job in work:
                group.create_task(job)
    except BaseExceptionGroup as failed:
        first = next(
            (e for e in failed.exceptions if isinstance(e, APIError)), failed.exceptions[0]
        )
        raise first from None
