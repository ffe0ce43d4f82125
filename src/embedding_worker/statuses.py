"""HTTP's view of an answer, for the wire formats that carry an HTTP status: the local HTTP
server, RunPod's failed jobs (whose error text holds the status) and OpenAI Batch output lines.

Core errors carry a kind, never a status (errors.py); this is the one map from kind to status.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import APIError, ErrorKind
from .reply import Answer

HTTP_STATUS: Mapping[ErrorKind, int] = {
    ErrorKind.INVALID: 400,
    ErrorKind.UNAUTHORIZED: 401,
    ErrorKind.FORBIDDEN: 403,
    ErrorKind.NOT_FOUND: 404,
    ErrorKind.METHOD_NOT_ALLOWED: 405,
    ErrorKind.REQUEST_TIMEOUT: 408,
    ErrorKind.TOO_LARGE: 413,
    ErrorKind.OVERLOADED: 429,
    ErrorKind.HEADERS_TOO_LARGE: 431,
    ErrorKind.INTERNAL: 500,
    ErrorKind.UNAVAILABLE: 503,
}


def http_status(error: APIError) -> int:
    """The HTTP status an error is sent with."""
    return HTTP_STATUS[error.kind]


@dataclass(frozen=True)
class Reply:
    """An answer as HTTP sends it: a status, the body (the answer, or the OpenAI error object),
    and the seconds a client should wait before retrying a retryable failure."""

    status: int
    body: dict[str, Any] | list[Any]  # a list only where the API answers one (TEI's /tokenize)
    retry_after: int | None = None

    @property
    def ok(self) -> bool:
        return self.status < 400

    @classmethod
    def of(cls, answer: Answer) -> Reply:
        error = answer.error
        if error is None:
            assert answer.body is not None
            return cls(200, answer.body)
        return cls(http_status(error), error.to_dict(), error.retry_after)
