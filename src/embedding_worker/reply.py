"""What dispatch answers: `Reply`, an HTTP status and a body, and its RunPod job output."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

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


class JobOutput(dict):
    """A successful job's output, as runpod receives it: a plain dict whose repr is a preview.

    runpod formats every job's output into two DEBUG f-strings even when DEBUG is off
    (rp_job.run_job), and prints it once in a local test run: a preview costs a few items whatever
    the answer's size, where the full repr of 256 x 1024 floats costs as much as writing the answer.
    JSON encoders see an ordinary dict.
    """

    def __repr__(self) -> str:
        return json.dumps(preview(dict(self)), ensure_ascii=False)


@dataclass(frozen=True)
class Reply:
    """What an operation answered: an HTTP status and a body (the OpenAI body, or an error body)."""

    status: int
    body: dict[str, Any]
    openai_route: bool = False  # asked through RunPod's OpenAI proxy
    refresh_worker: bool = False  # the worker is broken: ask RunPod for a new one
    retry_after: int | None = None  # seconds to wait before retrying a retryable failure

    @property
    def ok(self) -> bool:
        return self.status < 400

    def runpod_output(self) -> Any:
        """The job output RunPod expects.

        Success: the OpenAI body (standard flavour), or a one-element list holding it (OpenAI proxy,
        as RunPod's own OpenAI-compatible workers answer). Failure: a top-level "error" whose value
        is the JSON text of the OpenAI error object plus its status, which makes the job FAILED
        (runpod's local API answers HTTP 500 if that value is not a string).
        """
        if self.ok:
            output = JobOutput(self.body)
            return [output] if self.openai_route else output
        error = dict(self.body, status=self.status)
        if self.retry_after is not None:  # no headers on a job: the wait goes in the error text
            error["retry_after"] = self.retry_after
        failed: dict[str, Any] = {"error": json.dumps(error, ensure_ascii=False)}
        if self.refresh_worker:
            failed["refresh_worker"] = True
        return failed
