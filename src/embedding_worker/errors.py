"""The one way to make an error: `APIError`, rendered as the OpenAI error object, and the one
retry policy that every client of an answer reads.

Every failure a client can see is an APIError with a `kind` (what went wrong, in the worker's own
words), an OpenAI `type`, a stable `code` and the `param` at fault. An error carries no HTTP
status: each wire format maps the kind to its own (statuses.py), as TEI's routers map its core
errors. Messages name the field, never echo the payload. Whether a failure is worth another try
is told by its HTTP status alone (`is_retryable`), so that batch lines, batch files and jobs sent
to a deployed endpoint, which see only statuses, decide as the worker does.
"""

from __future__ import annotations

from enum import Enum
from typing import Any


class ErrorKind(Enum):
    """What went wrong, whatever carries the answer back."""

    INVALID = "invalid"  # the request is malformed or asks what cannot be done
    TOO_LARGE = "too_large"  # the request, or the answer it asks for, is over a size limit
    NOT_FOUND = "not_found"  # no such route, model or job
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    REQUEST_TIMEOUT = "request_timeout"  # the client did not send its request in time
    HEADERS_TOO_LARGE = "headers_too_large"
    OVERLOADED = "overloaded"  # busy now: the same request is welcome later
    UNAVAILABLE = "unavailable"  # cannot serve now: a retry here or elsewhere may succeed
    INTERNAL = "internal"  # the worker failed on this request


# 408 and 429 ask for the same request again, later; 502, 503 and 504 say that a server or a
# gateway could not serve it now. A 500 is a server failing on this request: sent again, it fails
# again, so it is answered as it is.
RETRYABLE_STATUSES = frozenset({408, 429, 502, 503, 504})
# The longest a client waits on one Retry-After: a server that asks for more is left for a later
# try (the next attempt, or the next run of a batch file) rather than holding the client.
MAX_RETRY_WAIT_S = 60.0


# The kinds whose request may succeed when sent again: the HTTP statuses they map to are
# RETRYABLE_STATUSES (statuses.py).
RETRYABLE_KINDS = frozenset(
    {ErrorKind.REQUEST_TIMEOUT, ErrorKind.OVERLOADED, ErrorKind.UNAVAILABLE}
)


def is_retryable(status: int | None) -> bool:
    """Whether an answer with this HTTP status may be different when the request is sent again."""
    return status in RETRYABLE_STATUSES


def retry_wait(attempt: int, backoff_s: float, retry_after: float | None = None) -> float:
    """Seconds to wait before retry number `attempt` (0: the first): exponential backoff from
    `backoff_s`, or the server's Retry-After when that is longer, at most MAX_RETRY_WAIT_S."""
    wait = backoff_s * 2**attempt
    if retry_after is not None and retry_after > wait:
        wait = retry_after
    return min(wait, MAX_RETRY_WAIT_S)


class APIError(Exception):
    def __init__(
        self,
        kind: ErrorKind,
        message: str,
        *,
        type: str,
        code: str,
        param: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        # Whole seconds a client should wait before retrying (HTTP's Retry-After); None: unknown.
        self.retry_after = retry_after

    @property
    def retryable(self) -> bool:
        """Whether the same request may succeed when sent again."""
        return self.kind in RETRYABLE_KINDS

    def to_dict(self) -> dict[str, Any]:
        """The OpenAI error body: {"error": {"message", "type", "param", "code"}}."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def __repr__(self) -> str:
        return f"APIError({self.kind.value}, {self.code!r}, {self.message!r})"


def invalid_input(message: str, param: str | None = None, code: str = "invalid_input") -> APIError:
    return APIError(
        ErrorKind.INVALID, message, type="invalid_request_error", code=code, param=param
    )


def too_large(message: str, param: str | None = None, code: str = "request_too_large") -> APIError:
    """413: the request, or the answer it asks for, is over a size limit (named in the message)."""
    return APIError(
        ErrorKind.TOO_LARGE, message, type="invalid_request_error", code=code, param=param
    )


def model_not_found(message: str) -> APIError:
    return APIError(
        ErrorKind.NOT_FOUND,
        message,
        type="invalid_request_error",
        code="model_not_found",
        param="model",
    )


def not_found(message: str) -> APIError:
    return APIError(ErrorKind.NOT_FOUND, message, type="invalid_request_error", code="not_found")


def unauthorized(message: str) -> APIError:
    return APIError(
        ErrorKind.UNAUTHORIZED, message, type="invalid_request_error", code="invalid_api_key"
    )


def method_not_allowed(message: str) -> APIError:
    return APIError(
        ErrorKind.METHOD_NOT_ALLOWED,
        message,
        type="invalid_request_error",
        code="method_not_allowed",
    )


def forbidden(message: str) -> APIError:
    """403: a request the server refuses to serve from where it came (a foreign Origin or Host)."""
    return APIError(ErrorKind.FORBIDDEN, message, type="invalid_request_error", code="forbidden")


def request_timeout(message: str, code: str = "request_timeout") -> APIError:
    """408: the client did not send its whole request in time, or a batch's line was not answered
    within the batch's completion window (`batch_expired`)."""
    return APIError(ErrorKind.REQUEST_TIMEOUT, message, type="invalid_request_error", code=code)


def headers_too_large(message: str) -> APIError:
    """431: the request line and headers are over the server's limit."""
    return APIError(
        ErrorKind.HEADERS_TOO_LARGE, message, type="invalid_request_error", code="headers_too_large"
    )


# The Retry-After of a retryable refusal whose wait the worker cannot estimate.
DEFAULT_RETRY_AFTER_S = 5


def overloaded(
    message: str, retry_after: int = DEFAULT_RETRY_AFTER_S, code: str = "queue_full"
) -> APIError:
    """429: the worker is busy; the same request is welcome again after `retry_after` seconds."""
    return APIError(
        ErrorKind.OVERLOADED,
        message,
        type="rate_limit_error",
        code=code,
        retry_after=max(1, retry_after),
    )


def unavailable(
    message: str, code: str = "engine_unavailable", retry_after: int = DEFAULT_RETRY_AFTER_S
) -> APIError:
    """503: this request could not be served now; a retry (here or on another worker) may be."""
    return APIError(
        ErrorKind.UNAVAILABLE,
        message,
        type="server_error",
        code=code,
        retry_after=max(1, retry_after),
    )


def internal(message: str = "internal error while serving the request") -> APIError:
    return APIError(ErrorKind.INTERNAL, message, type="server_error", code="internal_error")
