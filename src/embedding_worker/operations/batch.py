"""Batch lines: OpenAI Batch request lines in, OpenAI Batch output lines out.

This module is the batch-line format and the operation that answers a RunPod job holding lines,
`{"batch": [line, ...]}` -> `{"object": "list", "data": [output line, ...]}` in the same order. Each
line is another operation's request (its `url`), answered through the worker's dispatch on its own;
the batch files on disk and over a deployed endpoint (transports/batch_files.py, remote.py) use the
same lines and the same answering.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson

from .. import errors
from ..errors import APIError
from ..limits import ENVELOPE_BYTES, Limits, check_answer_bytes, is_small
from ..statuses import Reply
from .base import Context, Operation

JOB_MAX_LINES = 1000  # most lines in one RunPod batch job (RunPod's /run takes at most 10 MB)
DEFAULT_CONCURRENCY = 64  # lines in flight: enough for the engine to fill its batches
DEFAULT_RETRIES = 3
DEFAULT_BACKOFF_S = 0.5

T = TypeVar("T")
_END: Any = object()


# --------------------------------------------------------------------------------------------- #
# Request lines


@dataclass(frozen=True)
class LineRequest:
    """A request line that can be run: an OpenAI route and its body."""

    custom_id: str
    url: str
    body: dict[str, Any]

    def to_batch_line(self) -> dict[str, Any]:
        return {"custom_id": self.custom_id, "method": "POST", "url": self.url, "body": self.body}


@dataclass(frozen=True)
class BadLine:
    """A line that cannot be run; it is answered with an error line."""

    custom_id: str
    error: APIError


Line = LineRequest | BadLine


def line_id(line_no: int) -> str:
    """The custom_id of a line that carries none (text files, plain lines, unreadable lines)."""
    return f"line-{line_no}"


def bad_line(custom_id: str, line_no: int, message: str) -> BadLine:
    error = errors.invalid_input(f"line {line_no}: {message}", code="invalid_batch_line")
    return BadLine(custom_id, error)


def parse_line(
    value: Any, line_no: int, defaults: Mapping[str, Any], routes: Collection[str]
) -> Line:
    """One decoded JSON line: an OpenAI Batch request line whose `url` is one of `routes`, or a
    plain `{"text": ...}` line.

    A plain line embeds its text with `defaults` (model, encoding_format, ...) and the custom_id it
    carries, or `line-N` without one.
    """
    if not isinstance(value, dict):
        return bad_line(line_id(line_no), line_no, "a batch line must be a JSON object")
    custom_id = value.get("custom_id")
    if "url" not in value and "body" not in value and "text" in value:
        if custom_id is None:
            custom_id = line_id(line_no)
        if not isinstance(custom_id, str) or not custom_id:
            return bad_line(line_id(line_no), line_no, "'custom_id' must be a non-empty string")
        return LineRequest(custom_id, "/v1/embeddings", {**defaults, "input": value["text"]})
    if not isinstance(custom_id, str) or not custom_id:
        return bad_line(line_id(line_no), line_no, "'custom_id' must be a non-empty string")
    method = value.get("method", "POST")
    if method != "POST":
        return bad_line(custom_id, line_no, "'method' must be \"POST\"")
    url = value.get("url")
    if not isinstance(url, str) or url.rstrip("/") not in routes:
        return bad_line(custom_id, line_no, f"'url' must be one of {', '.join(routes)}")
    body = value.get("body")
    if not isinstance(body, dict):
        return bad_line(custom_id, line_no, "'body' must be a JSON object")
    return LineRequest(custom_id, url.rstrip("/"), body)


# --------------------------------------------------------------------------------------------- #
# Output lines (OpenAI Batch output: {"id", "custom_id", "response", "error"})


def response_line(
    custom_id: str,
    status: int,
    body: dict[str, Any] | list[Any],
    retry_after: int | None = None,
) -> dict[str, Any]:
    """An answered request; HTTP errors are answers too (`response.status_code` >= 400). A line
    has no headers: a retryable failure's Retry-After is `response.retry_after`."""
    named = body.get("id") if isinstance(body, dict) else None
    request_id = named if isinstance(named, str) else f"req_{uuid.uuid4().hex}"
    response = {"status_code": status, "request_id": request_id, "body": body}
    if retry_after is not None:
        response["retry_after"] = retry_after
    return {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": custom_id,
        "response": response,
        "error": None,
    }


def error_line(custom_id: str, error: APIError) -> dict[str, Any]:
    """A line that never became a request (OpenAI's "non-HTTP error"): `response` is null."""
    return {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": custom_id,
        "response": None,
        "error": {"code": error.code, "message": error.message},
    }


def status_of(output: Mapping[str, Any]) -> int | None:
    response = output.get("response")
    return response.get("status_code") if isinstance(response, dict) else None


def retry_after_of(output: Mapping[str, Any]) -> float | None:
    """The seconds an output line's server asks to wait before sending its request again."""
    response = output.get("response")
    wait = response.get("retry_after") if isinstance(response, dict) else None
    return wait if isinstance(wait, int | float) and not isinstance(wait, bool) else None


async def answer(
    context: Context,
    line: Line,
    retries: int = DEFAULT_RETRIES,
    backoff_s: float = DEFAULT_BACKOFF_S,
) -> dict[str, Any]:
    """The output line for one line. A retryable answer (a full queue, a timeout) is retried,
    at most `retries` times while the worker is healthy, after the wait it asks for or the backoff
    (`errors.retry_wait`); after that the retryable answer is returned as it is."""
    if isinstance(line, BadLine):
        return error_line(line.custom_id, line.error)
    for attempt in range(retries + 1):
        reply = Reply.of(await context.request(line.url, line.body, line=line.custom_id))
        if not errors.is_retryable(reply.status) or attempt == retries or not context.healthy:
            break
        await asyncio.sleep(errors.retry_wait(attempt, backoff_s, reply.retry_after))
    return response_line(line.custom_id, reply.status, reply.body, reply.retry_after)


async def bounded(
    items: Iterable[T],
    work: Callable[[T], Awaitable[None]],
    limit: int,
    stop: Callable[[], bool] = lambda: False,
) -> None:
    """Run `work(item)` for every item, at most `limit` at once, taking the next item only when a
    slot is free (the items are read lazily: a file is never read ahead). The first exception stops
    the intake, lets the running work finish, and is raised."""
    slots = asyncio.Semaphore(limit)
    running: set[asyncio.Task[None]] = set()
    failures: list[BaseException] = []

    async def one(item: T) -> None:
        try:
            await work(item)
        except Exception as exc:  # noqa: BLE001 - re-raised below, after the others finish
            failures.append(exc)
        finally:
            slots.release()

    pending = iter(items)
    try:
        while True:
            await slots.acquire()  # before reading the next item: nothing is read ahead
            item = next(pending, _END) if not (failures or stop()) else _END
            if item is _END:
                slots.release()
                break
            task = asyncio.create_task(one(item))
            running.add(task)
            task.add_done_callback(running.discard)
        if running:
            await asyncio.gather(*running)
    except asyncio.CancelledError:
        for task in running:  # interrupted: nothing keeps running (or writing) behind our back
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        raise
    if failures:
        raise failures[0]


# --------------------------------------------------------------------------------------------- #
# The RunPod job form


async def answer_job(context: Context, job_input: dict[str, Any]) -> dict[str, Any]:
    """Answer every line of a batch job, in order. Each line is answered on its own (duplicate
    custom_ids included); retryable failures stay in the answer for the sender to retry."""
    lines = job_input.get("batch")
    if not isinstance(lines, list) or not lines:
        raise errors.invalid_input(
            "'batch' must be a non-empty array of batch lines", param="batch"
        )
    if len(lines) > JOB_MAX_LINES:
        raise errors.too_large(
            f"'batch' holds {len(lines)} lines; at most {JOB_MAX_LINES} in one job", param="batch"
        )
    # Each line's answer is within the limit, their sum may not be: RunPod would drop it and the
    # sender would wait for nothing. Refused before any line runs, from each line's estimate (a
    # large job's lines are read in a thread).
    if is_small(lines):
        estimate = answers_estimate(context, lines)
    else:
        estimate = await asyncio.to_thread(answers_estimate, context, lines)
    _check_answers_size(estimate, len(lines), context.limits)
    outputs: list[dict[str, Any]] = [{}] * len(lines)

    async def run(indexed: tuple[int, Any]) -> None:
        index, value = indexed
        line = parse_line(value, index + 1, {}, context.line_routes)
        outputs[index] = await answer(context, line)

    await bounded(enumerate(lines), run, DEFAULT_CONCURRENCY)
    # The backstop, for answers past their estimate (the outputs whose size depends on the texts'
    # tokens are not estimated). runpod writes JSON with spaces: about 1/8 more than orjson.
    size = await asyncio.to_thread(_written_size, outputs)
    _check_answers_size(size + size // 8, len(lines), context.limits)
    return {"object": "list", "data": outputs}


def _written_size(outputs: list[dict[str, Any]]) -> int:
    """The bytes of `outputs` as one JSON array, one line a call: orjson holds the GIL for a call,
    and the event loop gets its turn between lines."""
    return 1 + sum(len(orjson.dumps(output)) + 1 for output in outputs)


# An output line around its answer ({"id": "batch_req_...", "custom_id": ..., "response":
# {"status_code": 200, "request_id": ..., "body": ...}, "error": null}), its custom_id aside; and an
# error line or an error answer whole (its message is at most a few hundred bytes).
LINE_BYTES = 192
ERROR_LINE_BYTES = 640


def answers_estimate(context: Context, lines: list[Any]) -> int:
    """An upper estimate of the JSON bytes of a job's answer, from each line's fields: the sum of
    each line's answer estimate (its operation's `answer_bytes`), a line that would fail counted as
    its error. Runs no line and reads no text but reranked documents that are returned."""
    total = ENVELOPE_BYTES
    for index, value in enumerate(lines):
        line = parse_line(value, index + 1, {}, context.line_routes)
        total += LINE_BYTES + len(line.custom_id)
        if isinstance(line, BadLine):
            total += ERROR_LINE_BYTES
            continue
        estimate = context.line_routes[line.url].answer_bytes
        try:
            total += ERROR_LINE_BYTES if estimate is None else estimate(context, line.body)
        except APIError:
            total += ERROR_LINE_BYTES
    return total


def _check_answers_size(size: int, lines: int, limits: Limits) -> None:
    check_answer_bytes(
        size,
        limits,
        answer=f"the answers of {lines} lines",
        advice='send fewer lines per job or ask for "encoding_format": "base64"',
        param="batch",
    )


OPERATION = Operation(
    name="batch",
    run=answer_job,
    job_fields=("batch",),
    job_hint="'batch' (batch lines)",
    scheduled=False,  # each line's answer names its own tier
)
