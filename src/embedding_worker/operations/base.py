"""What every operation shares: the `Operation` record the registry holds, the request model base
and its parsing into one typed error, and the checks every operation makes before any work."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Protocol, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .. import errors
from ..engines import Capability, ModelEngine, ModelRegistry
from ..errors import APIError
from ..limits import SMALL_CHARS, Limits, is_small
from ..metrics import Metrics
from ..reply import Answer
from ..request_context import request_id

T = TypeVar("T")


class Context(Protocol):
    """What an operation may use of the worker that runs it."""

    registry: ModelRegistry
    limits: Limits
    line_routes: Mapping[str, Operation]  # the routes a batch line may name, and their operations
    metrics: Metrics | None  # the worker's figures (metrics.py); None: METRICS off

    @property
    def healthy(self) -> bool: ...

    async def request(self, route: str, body: Any, line: str | None = None) -> Answer:
        """Answer another route's request within this job; `line` names it in the job's logs."""
        ...


# An answer is an object, or, in the shapes of servers that answer one (TEI's /tokenize), a list.
Run = Callable[[Context, dict[str, Any]], Awaitable[dict[str, Any] | list[Any]]]
# An upper estimate of the JSON bytes of a body's answer, from its fields alone (no work): what a
# batch job's answer is bounded by before any line runs. Raises APIError for a body whose answer
# would be an error.
AnswerBytes = Callable[[Context, dict[str, Any]], int]

# Whether a standard-flavour job that holds an operation's fields is that operation, by what the
# served models can do; cheap and never raising: it runs before any check of the job.
Applies = Callable[[ModelRegistry, dict[str, Any]], bool]


@dataclass(frozen=True)
class Operation:
    """One operation of the worker, as dispatch, the HTTP server and batch files see it."""

    name: str
    run: Run  # a validated-size body in, the answer body out; failures raise APIError
    # The OpenAI route (`openai_route`, and the HTTP path under /v1 and /openai/v1); None for an
    # operation that only exists as a standard-flavour job.
    route: str | None = None
    method: str = "POST"  # the HTTP method of `route`
    # Standard flavour: a job input holding any of these fields is this operation (the registry's
    # order decides between operations), if `job_applies` says so where fields are shared; and how
    # to say so in an error message.
    job_fields: tuple[str, ...] = ()
    job_applies: Applies | None = None
    job_hint: str = ""
    batch_line: bool = False  # a batch line's `url` may name this route
    answer_bytes: AnswerBytes | None = None  # a batch line's answer estimate; None: a small one
    scheduled: bool = True  # runs model work at a service tier, which its answer names


# ------------------------------------------------------------------------------------ requests


class RequestModel(BaseModel):
    """Requests are pydantic models in strict mode: a JSON string is never silently turned into a
    number, a bool into an int, or a float into an int; unknown fields are ignored (clients send
    fields of other servers)."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True, populate_by_name=True)


# Model ids are short; a longer one is refused before it can be echoed in an error message.
ModelName = Annotated[str, Field(min_length=1, max_length=256)]

RequestT = TypeVar("RequestT", bound=RequestModel)


async def parse(model: type[RequestT], body: Any) -> RequestT:
    """Validate a request body; any failure becomes one invalid_input APIError naming the field.

    A body past `is_small` is validated in a thread: its validators walk every item."""
    if not isinstance(body, dict):
        raise errors.invalid_input("the request body must be a JSON object")
    if is_small(body):
        return _validate(model, body)
    return await asyncio.to_thread(_validate, model, body)


def _validate(model: type[RequestT], body: dict[str, Any]) -> RequestT:
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise _to_api_error(exc) from None


def _to_api_error(exc: ValidationError) -> APIError:
    first = exc.errors(include_url=False, include_input=False)[0]
    loc = [str(part) for part in first["loc"]]
    field = loc[0] if loc else None
    where = ".".join(loc) if loc else "body"
    if first["type"] == "missing":
        message = f"'{where}' is required"
    else:
        text = first["msg"].removeprefix("Value error, ")
        message = f"'{where}': {text}"
    return errors.invalid_input(message, param=field)


# ------------------------------------------------------------------------------------ answers
# Plain dicts: they are built for every request, and runpod serialises them with the standard json
# module; the keys follow the OpenAI and Cohere references.


def answer_id(prefix: str) -> str:
    """The answer's id: its kind and the request's id (X-Request-Id), so a client, the logs and
    the trace name one request alike."""
    return f"{prefix}-{request_id() or uuid.uuid4().hex}"


def created() -> int:
    return int(time.time())


def usage(tokens: int) -> dict[str, int]:
    return {"prompt_tokens": tokens, "total_tokens": tokens}


# ------------------------------------------------------------------------------------ checks

# Work on texts of at most this many characters in all runs on the event loop: tokenizing them
# costs less than the hop to a thread (about 0.1 ms). Anything larger runs in a thread, where
# the Rust tokenizer releases the GIL (engines/tokenization.py), so that /health and the other
# requests keep flowing meanwhile: a text of 20 MB takes half a minute to tokenize.
INLINE_CHARS = SMALL_CHARS


def chars(texts: Iterable[str]) -> int:
    """The characters of `texts` in all: O(1) a text."""
    return sum(map(len, texts))


async def off_loop(size: int, call: Callable[..., T], *args: Any) -> T:
    """`call(*args)` inline when `size` (characters, or values) is at most INLINE_CHARS, else in a
    thread."""
    if size <= INLINE_CHARS:
        return call(*args)
    return await asyncio.to_thread(call, *args)


_NOT_CAPABLE = {
    Capability.EMBED: "model_not_embedding",
    Capability.EMBED_IMAGES: "model_not_image_embedding",
    Capability.RERANK: "model_not_reranker",
    Capability.CLASSIFY: "model_not_classifier",
}


def model_for(registry: ModelRegistry, name: str | None, capability: Capability) -> ModelEngine:
    """The model a request names, checked to have the operation's capability."""
    model = registry.resolve(name, capability)
    if not model.can(capability):
        raise errors.invalid_input(
            f"model '{model.served_id}' is {model.role.noun} model and cannot {capability.value}",
            param="model",
            code=_NOT_CAPABLE[capability],
        )
    return model


def check_count(count: int, limits: Limits, param: str) -> None:
    if count > limits.max_inputs:
        raise errors.invalid_input(
            f"'{param}' holds {count} items, more than the limit of {limits.max_inputs} "
            "per request",
            param=param,
        )


def check_lengths(
    model: ModelEngine, lengths: Sequence[int], truncate: bool, limits: Limits, param: str
) -> int:
    """Apply the per-input and per-request token limits; returns the tokens the model will see."""
    if not truncate:
        for i, n in enumerate(lengths):
            if n > model.max_length:
                raise errors.invalid_input(
                    f"'{param}' item {i} has {n} tokens, more than the model's maximum of "
                    f'{model.max_length}; shorten it or send "truncate": true',
                    param=param,
                    code="context_length_exceeded",
                )
    total = sum(min(n, model.max_length) for n in lengths)
    check_request_tokens(total, limits, param)
    return total


def check_request_tokens(total: int, limits: Limits, param: str, noun: str = "tokens") -> None:
    """At most MAX_REQUEST_TOKENS tokens (`noun`: what the request holds of them) in one request."""
    if total > limits.max_request_tokens:
        raise errors.invalid_input(
            f"the request holds {total} {noun}, more than the limit of {limits.max_request_tokens} "
            "per request (MAX_REQUEST_TOKENS); split it",
            param=param,
            code="request_too_large",
        )


def nonempty_texts(value: Any) -> list[str]:
    """A request field of one or more texts: a string, or a non-empty array of non-empty strings
    (for a pydantic `mode="before"` validator)."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ValueError("must be a string or a non-empty array of strings")
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item:
            raise ValueError(f"item {i} must be a non-empty string")
    return value


def check_finite(values: np.ndarray, model: ModelEngine) -> None:
    """A model that overflows (float16) gives NaN, which is not JSON: fail instead of answering
    it."""
    if not np.isfinite(values).all():
        raise errors.internal(
            f"model '{model.served_id}' produced NaN or infinite values; try another DTYPES"
        )
