"""The request being answered: its id and what log lines and its trace say about it.

One `RequestContext` per request, in the `current_request` context variable: the local server sets
it for each HTTP request (its id from `X-Request-Id`, or made), dispatch for a job that arrives any
other way (a RunPod job: its job id). asyncio copies the variable into every task the request
starts, so a log line deep in an engine call still names its request (logs.py). Dispatch fills in
the route, model, tier and outcome as it learns them.

A request id from outside is bounded (`MAX_REQUEST_ID_CHARS`, `REQUEST_ID_CHARS`): anything else is
ignored and a fresh id made, so a client can neither make the worker echo a huge header nor put
control characters into its logs.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

MAX_REQUEST_ID_CHARS = 128
REQUEST_ID_CHARS = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:/+=@"
)


@dataclass(slots=True)
class RequestContext:
    """One request: its id and, as dispatch learns them, what it asked and how it ended."""

    id: str
    route: str | None = None  # the HTTP path or OpenAI route; the operation's name for a job
    model: str | None = None
    tier: str | None = None
    status: int | None = None  # the HTTP status of its answer, once known
    code: str | None = None  # the error code of a failed answer
    inputs: int | None = None
    tokens: int | None = None
    started: float = field(default_factory=time.perf_counter)
    trace: Any = None  # its tracing.Trace while traces are exported
    dispatched: bool = False  # a dispatch has answered under this context (batch lines nest)

    @property
    def duration_s(self) -> float:
        return time.perf_counter() - self.started


current_request: ContextVar[RequestContext | None] = ContextVar(
    "embedding_worker_request", default=None
)


def new_request_id() -> str:
    return os.urandom(16).hex()


def valid_request_id(raw: bytes | str | None) -> str | None:
    """`raw` as a request id if it is one a log line and a header may carry, else None."""
    if not raw or len(raw) > MAX_REQUEST_ID_CHARS:
        return None
    text = raw.decode("latin-1") if isinstance(raw, bytes) else raw
    if not REQUEST_ID_CHARS.issuperset(text):
        return None
    return text


def request_id_of(headers: Iterable[tuple[bytes, bytes]]) -> str:
    """The id of an HTTP request with these (ASGI, lower-case) headers: its valid `X-Request-Id`,
    else a new one."""
    for name, value in headers:
        if name == b"x-request-id":
            return valid_request_id(value.strip()) or new_request_id()
    return new_request_id()


def request_id() -> str | None:
    """The current request's id, if a request is being answered."""
    context = current_request.get()
    return context.id if context is not None else None
