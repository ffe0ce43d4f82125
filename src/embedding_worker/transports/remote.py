"""`--endpoint URL`: a batch file answered by a deployed RunPod endpoint instead of this machine.

Lines go in chunks as batch jobs (`{"input": {"batch": [line, ...]}}`, answered by
`operations.batch.answer_job` on the workers) through RunPod's `/run`, `jobs` of them at once, so
RunPod's autoscaling spreads them over many workers; each job is polled on `/status/{id}`. A job
that fails, times out or cannot be sent is sent again, and so are the lines it answered with a
retryable status (`errors.is_retryable`: a full queue, a timeout), at most `retries` times, after
the longest Retry-After they carry or the exponential backoff (`errors.retry_wait`); lines still
unanswered then are left out of the output, for the next run. The output file, resuming and skipping
are batch_run.py's.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Iterator
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from .. import errors
from ..operations.batch import LineRequest, bounded, error_line, retry_after_of, status_of
from .batch_run import BatchRun

log = logging.getLogger(__name__)

RETRY_STATES = frozenset({"FAILED", "CANCELLED", "TIMED_OUT"})
MAX_POLL_S = 5.0
MAX_POLL_FAILURES = 5


class EndpointError(Exception):
    """The endpoint refuses the jobs themselves (API key, payload, a worker without batch jobs):
    sending them again cannot help, so the run stops."""


class _JobFailed(Exception):
    """This attempt failed; another may succeed, after `retry_after` seconds if the endpoint said
    so."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class _TooLarge(Exception):
    """The job's answers together are over the worker's answer limit: send fewer lines a job."""


async def run_endpoint(run: BatchRun, transport: httpx.AsyncBaseTransport | None = None) -> None:
    """Answer the run's remaining lines through `run.options.endpoint`. `transport` is for tests
    that inject network faults in front of a real server."""
    options = run.options
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a log line per poll
    key = os.environ.get("RUNPOD_API_KEY")
    if not key:
        log.warning("RUNPOD_API_KEY is not set: jobs are sent without an API key")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    timeout = httpx.Timeout(120.0, connect=10.0)
    async with httpx.AsyncClient(
        base_url=options.endpoint or "", headers=headers, timeout=timeout, transport=transport
    ) as client:
        endpoint = _Endpoint(client, run)
        try:
            await bounded(_chunks(run), endpoint.answer_chunk, options.jobs)
        except EndpointError as exc:
            run.summary.aborted = str(exc)


def _chunks(run: BatchRun) -> Iterator[list[LineRequest]]:
    """The remaining requests in chunks of `chunk_size`; bad lines are answered here, unsent."""
    chunk: list[LineRequest] = []
    for line in run.lines():
        if not isinstance(line, LineRequest):
            run.write(error_line(line.custom_id, line.error))
            continue
        chunk.append(line)
        if len(chunk) == run.options.chunk_size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class _Endpoint:
    def __init__(self, client: httpx.AsyncClient, run: BatchRun) -> None:
        self.client = client
        self.run = run
        self.options = run.options
        self.status_method = "GET"

    async def answer_chunk(self, chunk: list[LineRequest]) -> None:
        """Send one chunk as a job and write its answers, retrying what failed."""
        pending = chunk
        retries = self.options.retries
        retry_after: float | None = None  # the longest wait the last attempt's answers asked for
        for attempt in range(retries + 1):
            if attempt:
                await asyncio.sleep(
                    errors.retry_wait(attempt - 1, self.options.backoff_s, retry_after)
                )
            try:
                outputs = await self._run_job(pending)
            except _TooLarge as exc:
                if len(pending) == 1:
                    raise EndpointError(str(exc)) from None
                half = len(pending) // 2  # answers too large together: two smaller jobs
                await self.answer_chunk(pending[:half])
                await self.answer_chunk(pending[half:])
                return
            except _JobFailed as exc:
                log.warning(
                    "job of %d lines failed (try %d of %d): %s",
                    len(pending),
                    attempt + 1,
                    retries + 1,
                    exc,
                )
                retry_after = exc.retry_after
                continue
            retry = []
            waits = []
            for request, output in zip(pending, outputs):
                if errors.is_retryable(status_of(output)) and attempt < retries:
                    retry.append(request)
                    waits.append(retry_after_of(output) or 0.0)
                else:
                    self.run.write(output)  # a retryable answer on the last try: left out
            pending = retry
            retry_after = max(waits, default=None)
            if not pending:
                return
        self.run.leave_unanswered(len(pending))

    async def _run_job(self, lines: list[LineRequest]) -> list[dict[str, Any]]:
        job = await self._request(
            "POST", "/run", json={"input": {"batch": [r.to_batch_line() for r in lines]}}
        )
        job_id = job.get("id")
        if not isinstance(job_id, str):
            raise _JobFailed(f"/run answered no job id: {_short(job)}")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.options.job_timeout_s
        delay = self.options.poll_s
        poll_failures = 0
        while True:
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, MAX_POLL_S)
            try:
                status = await self._request(self.status_method, f"/status/{job_id}")
                poll_failures = 0
            except _JobFailed:
                poll_failures += 1
                if poll_failures >= MAX_POLL_FAILURES:
                    raise
                continue
            state = status.get("status")
            if state == "COMPLETED":
                return _outputs(status.get("output"), lines)
            if state in RETRY_STATES:
                raise _job_failure(job_id, state, status.get("error"))
            if loop.time() > deadline:
                await self._cancel(job_id)
                waited = self.options.job_timeout_s
                raise _JobFailed(f"job {job_id} unfinished after {waited:.0f} s")

    async def _request(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        response = await self._send(method, path, **kwargs)
        if response.status_code == 405 and path.startswith("/status/") and method == "GET":
            # RunPod's API answers GET /status; its local test server (--rp_serve_api) only POST.
            self.status_method = "POST"
            response = await self._send("POST", path, **kwargs)
        if response.status_code in (401, 403):
            raise EndpointError(
                f"the endpoint refused the API key (HTTP {response.status_code}): "
                "set RUNPOD_API_KEY"
            )
        if response.status_code == 404 and path.startswith("/status/"):
            raise _JobFailed(f"{method} {path}: the job is unknown (expired?)")
        if errors.is_retryable(response.status_code):
            raise _JobFailed(
                f"{method} {path}: HTTP {response.status_code}", _retry_after(response)
            )
        if response.status_code >= 400:
            raise EndpointError(
                f"{method} {path}: HTTP {response.status_code}: {_short(response.text)}"
            )
        try:
            body = response.json()
        except ValueError:
            raise _JobFailed(f"{method} {path}: an answer that is not JSON") from None
        if not isinstance(body, dict):
            raise _JobFailed(f"{method} {path}: unexpected answer {_short(body)}")
        return body

    async def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return await self.client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise _JobFailed(f"{method} {path}: {type(exc).__name__}: {exc}") from None

    async def _cancel(self, job_id: str) -> None:
        try:
            await self.client.post(f"/cancel/{job_id}")
        except httpx.HTTPError:
            pass  # best effort: the job is sent again either way


def _outputs(output: Any, lines: list[LineRequest]) -> list[dict[str, Any]]:
    """A completed job's output lines, checked against the lines sent."""
    data = output.get("data") if isinstance(output, dict) else None
    if not isinstance(data, list) or len(data) != len(lines):
        raise _JobFailed(f"unexpected job output: {_short(output)}")
    for request, line in zip(lines, data):
        if not isinstance(line, dict) or line.get("custom_id") != request.custom_id:
            raise _JobFailed("job output does not match the lines sent")
    return data


def _retry_after(response: httpx.Response) -> float | None:
    """HTTP's Retry-After: seconds, or the date to wait for; None when absent or unreadable."""
    value = response.headers.get("retry-after", "").strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # "-0000": a date in UTC
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - time.time())


def _job_failure(job_id: str, state: str, error: Any) -> Exception:
    """What a failed job's error means: a job the worker refused as a request (a 4xx that
    `errors.is_retryable` does not retry) fails the same way every time; any other failure may not,
    after the wait the worker asked for."""
    failed = _JobFailed(f"job {job_id} {state}: {_short(error)}")
    try:
        parsed = json.loads(error) if isinstance(error, str) else None
    except ValueError:
        return failed
    if not isinstance(parsed, dict):
        return failed
    status = parsed.get("status")
    wait = parsed.get("retry_after")
    if isinstance(wait, int | float) and not isinstance(wait, bool):
        failed.retry_after = wait
    if isinstance(status, int) and 400 <= status < 500 and not errors.is_retryable(status):
        body = parsed.get("error")
        message = body.get("message") if isinstance(body, dict) else None
        if isinstance(body, dict) and body.get("code") == "response_too_large":
            return _TooLarge(message)
        return EndpointError(
            f"the endpoint refused the batch job ({status}): {message or _short(error)}"
        )
    return failed


def _short(value: Any, limit: int = 300) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
