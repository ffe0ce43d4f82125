"""The one way to make an error: `APIError`, rendered as the OpenAI error object.

Every failure a client can see is an APIError with an HTTP status, an OpenAI `type`, a stable `code`
and the `param` at fault. Messages name the field, never echo the payload.
"""

from __future__ import annotations

from typing import Any


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str,
        code: str,
        param: str | None = None,
        retryable: bool = False,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.retryable = retryable

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
        return f"APIError({self.status}, {self.code!r}, {self.message!r})"


def invalid_input(message: str, param: str | None = None, code: str = "invalid_input") -> APIError:
    return APIError(400, message, type="invalid_request_error", code=code, param=param)


def too_large(message: str, param: str | None = None, code: str = "request_too_large") -> APIError:
    """413: the request, or the answer it asks for, is over a size limit (named in the message)."""
    return APIError(413, message, type="invalid_request_error", code=code, param=param)


def model_not_found(message: str) -> APIError:
    return APIError(
        404, message, type="invalid_request_error", code="model_not_found", param="model"
    )


def not_found(message: str) -> APIError:
    return APIError(404, message, type="invalid_request_error", code="not_found")


def unauthorized(message: str) -> APIError:
    return APIError(401, message, type="invalid_request_error", code="invalid_api_key")


def method_not_allowed(message: str) -> APIError:
    return APIError(405, message, type="invalid_request_error", code="method_not_allowed")


def overloaded(message: str) -> APIError:
    return APIError(429, message, type="rate_limit_error", code="queue_full", retryable=True)


def unavailable(message: str, code: str = "engine_unavailable") -> APIError:
    return APIError(503, message, type="server_error", code=code, retryable=True)


def internal(message: str = "internal error while serving the request") -> APIError:
    return APIError(500, message, type="server_error", code="internal_error")
