"""The worker's limits on requests and answers, and the cheap checks that enforce them.

A job's input arrives already parsed (runpod parses the JSON), so its size is estimated in one pass
over the parsed values, which stops as soon as the limit is passed: strings count their exact UTF-8
bytes, numbers their digits. The same pass refuses what the standard json module lets through but no
model or JSON writer can handle: NaN/Infinity, lone UTF-16 surrogates ("\\ud800"), absurd nesting.

Answers are estimated before any work is done, by each operation from the sizes below, and checked
here (`check_answer_bytes`), so a request whose answer could not get back through RunPod is refused
at once instead of vanishing on the way.

The event loop answers /health, /ping and every other request, so it never does work that grows with
a payload: `is_small` tells in a bounded number of steps whether a body is small enough to check and
parse on the loop; a larger one is checked, parsed and tokenized in a thread.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from . import errors

# RunPod's documented payload limit for /runsync is 20 MB (its SDK counts 1 MB = 1,000,000 bytes).
RUNPOD_PAYLOAD_LIMIT = 20_000_000

# A valid request nests at most 6 levels (job > openai_input > extra_body > input > list > token
# id).
MAX_JSON_DEPTH = 32

# Bytes of JSON per number in a float answer: the shortest float32 text plus ", ". 16 covers the
# longest forms like -1.2345678e-05; unit vectors average less (docs/design.md).
FLOAT_BYTES = 16
# '{"object": "embedding", "embedding": ..., "index": 2047}, ' and the like.
ITEM_OVERHEAD_BYTES = 64
# '{"index": 2047, "relevance_score": 0.12345678901234567, "document": {"text": ...}}, '
RERANK_ITEM_BYTES = 96
ENVELOPE_BYTES = 512  # object, model, usage, id, created


# A body is handled on the event loop when it holds at most this many values and this many
# characters of strings: checking and parsing it then costs at most about a tenth of a millisecond,
# less than the hop to a thread. Anything larger costs the loop nothing but that hop.
SMALL_VALUES = 256
SMALL_CHARS = 16_384


@dataclass(frozen=True)
class Limits:
    max_inputs: int = 2048
    max_request_tokens: int = 300_000
    # The most tokens of one text embedded window by window, or of one late-chunked document.
    max_input_tokens: int = 32_768
    max_request_bytes: int = RUNPOD_PAYLOAD_LIMIT
    max_response_bytes: int = RUNPOD_PAYLOAD_LIMIT
    # Images (images.py, image_urls.py): encoded bytes and pixels of one image, the hosts image
    # URLs may name (none: URLs are refused) and the seconds one fetch may take.
    max_image_bytes: int = 10_000_000
    max_image_pixels: int = 25_000_000
    image_url_hosts: frozenset[str] = frozenset()
    image_url_timeout_s: float = 10.0
    # Per request: the pixels its images may decode (ten images at the most pixels: seconds of a
    # core, docs/configuration.md), and the bytes of image URL bodies it may hold at once,
    # downloading or waiting to be decoded.
    max_request_image_pixels: int = 250_000_000
    image_url_bytes_in_flight: int = 64_000_000


def inspect_request(body: Any, limits: Limits) -> None:
    """One pass over a parsed request body: size, nesting, NaN/Infinity, invalid unicode.

    Raises a 413 naming MAX_REQUEST_BYTES, or a 400 naming the top-level field at fault. Cost: one
    visit per value, and never more values than the byte limit allows (each counts at least 1 byte).
    """
    budget = limits.max_request_bytes
    size = 0
    # Flat triples: value, depth, the top-level field it belongs to. A tuple a value would be an
    # allocation the garbage collector counts: a body of millions of values then set off full
    # collections, each holding the GIL for up to a second (a thread checks such a body).
    stack: list[Any] = [body, 0, None]
    push = stack.append
    while stack:
        field = stack.pop()
        depth = stack.pop()
        value = stack.pop()
        kind = type(value)
        if kind is str:
            size += _utf8_size(value, field) + 3  # quotes and a separator
        elif kind is int:
            size += 2 + value.bit_length() * 77 // 256  # digits (log10(2) ~ 77/256) and a separator
        elif kind is list or kind is dict:
            if depth >= MAX_JSON_DEPTH:
                raise errors.invalid_input(
                    f"the request is nested deeper than {MAX_JSON_DEPTH} levels", param=field
                )
            if kind is list:
                size += 2 + len(value)
                for item in value:
                    push(item)
                    push(depth + 1)
                    push(field)
            else:
                size += 2 + 4 * len(value)
                for key, item in value.items():
                    if type(key) is not str:
                        raise errors.invalid_input("object keys must be strings", param=field)
                    size += _utf8_size(key, field)
                    push(item)
                    push(depth + 1)
                    push(key if depth == 0 else field)
        elif kind is float:
            if not math.isfinite(value):
                raise errors.invalid_input(
                    "NaN and Infinity are not valid JSON numbers", param=field
                )
            size += 24
        elif value is None or kind is bool:
            size += 6
        else:
            raise errors.invalid_input("the request holds a value that is not JSON", param=field)
        if size > budget:
            raise errors.too_large(
                f"the request is larger than the limit of {budget} bytes (MAX_REQUEST_BYTES); "
                "split it into smaller requests",
                param=field,
            )


def check_answer_bytes(
    estimate: int, limits: Limits, *, answer: str, advice: str, param: str
) -> None:
    """Refuse an answer estimated at `estimate` bytes if it is over MAX_RESPONSE_BYTES. `answer`
    says what the answer holds ("the answer (3 vectors of 384 numbers)"), `advice` how to ask for a
    smaller one; the 413 `response_too_large` names `param`."""
    if estimate <= limits.max_response_bytes:
        return
    raise errors.too_large(
        f"{answer} would be about {estimate} bytes, more than the limit of "
        f"{limits.max_response_bytes} (MAX_RESPONSE_BYTES; RunPod drops answers over its "
        f"{RUNPOD_PAYLOAD_LIMIT // 1_000_000} MB payload limit); {advice}",
        param=param,
        code="response_too_large",
    )


def is_small(body: Any) -> bool:
    """Whether `body` holds at most SMALL_VALUES values and SMALL_CHARS characters of strings.

    Stops at the first value past either bound, so it costs at most SMALL_VALUES steps whatever the
    body's size: it decides, on the event loop, what may run there.
    """
    values = 0
    chars = 0
    stack = [body]
    while stack:
        value = stack.pop()
        values += 1
        if values > SMALL_VALUES:
            return False
        kind = type(value)
        if kind is str:
            chars += len(value)  # O(1): no pass over the text
            if chars > SMALL_CHARS:
                return False
        elif kind is list:
            if values + len(value) > SMALL_VALUES:
                return False
            stack.extend(value)
        elif kind is dict:
            values += len(value)  # its keys
            if values + len(value) > SMALL_VALUES:
                return False
            for key, item in value.items():
                chars += len(key) if type(key) is str else 1
                stack.append(item)
            if chars > SMALL_CHARS:
                return False
    return True


def utf8_size(text: str) -> int:
    """The UTF-8 bytes of `text`, O(1) for ASCII; never raises (a lone surrogate counts 3)."""
    if text.isascii():
        return len(text)
    return len(text.encode("utf-8", "surrogatepass"))


def _utf8_size(text: str, field: str | None) -> int:
    if text.isascii():  # O(1) in CPython: the common case costs nothing
        return len(text)
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:
        # A lone surrogate ("\ud800"): the json module accepts it, the tokenizer raises TypeError
        # and runpod could not send it back (it writes UTF-8).
        raise errors.invalid_input(
            "a string holds invalid unicode (an unpaired surrogate)", param=field
        ) from None
