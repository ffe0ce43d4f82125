"""What dispatch answers: `Answer`, a body or an error, and `preview`, an answer cut short for a
person or a log to read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import APIError

# A preview shows this many items of an answer, and this many numbers of each vector.
PREVIEW_ITEMS = 3
PREVIEW_NUMBERS = 4


# Strings a preview shows as they are: names and messages the worker wrote itself. Any other
# string (a document asked back, a base64 vector) may be the payload, and logs never echo it.
_SHOWN_STRINGS = frozenset(
    {
        "object",
        "model",
        "id",
        "status",
        "error",
        "type",
        "code",
        "param",
        "service_tier",
        "response_type",
        "version",
    }
)


def preview(body: Any, key: str | None = None) -> Any:
    """The answer with long lists cut short, for a person to read: vectors keep their first numbers
    and say how many there are, lists of items their first few, and strings that may carry the
    payload only their length. Bounded work whatever the size."""
    if isinstance(body, dict):
        return {k: preview(value, k) for k, value in body.items()}
    if isinstance(body, list):
        if body and all(isinstance(x, float) for x in body[:PREVIEW_NUMBERS]):
            if len(body) <= PREVIEW_NUMBERS:
                return body
            return [*(round(x, 6) for x in body[:PREVIEW_NUMBERS]), f"... {len(body)} numbers"]
        shown = [preview(item, key) for item in body[:PREVIEW_ITEMS]]
        if len(body) > PREVIEW_ITEMS:
            shown.append(f"... {len(body) - PREVIEW_ITEMS} more")
        return shown
    if isinstance(body, str) and key not in _SHOWN_STRINGS:
        return f"<{len(body)} characters>"
    return body


@dataclass(frozen=True, slots=True)
class Answer:
    """What an operation answered: its body, or the error it raised. No transport's shape: each
    transport writes it in its own (statuses.Reply for HTTP, transports/runpod.py for jobs)."""

    body: dict[str, Any] | list[Any] | None = None  # a list only where the API answers one
    error: APIError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None
