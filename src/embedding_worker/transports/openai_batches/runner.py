"""Running one batch, from wherever it stopped: its input validated, its lines answered at the flex
tier, its output and error files made.

A line is answered by operations/batch.py's `answer`, the same as a line of a batch file or of a
batch job; its output line is appended to the batch's `.output` part (a 2xx answer) or `.errors`
part (an error answer, a line that is not a request), a flushed write per line. About once a second
the parts are fsynced and then the record is written with the counts of that moment, so a record
never claims more than its files hold. A run that stops (a restart, a kill, a lease lost) is taken
up again from the parts: their custom_ids are skipped (a partly written last line is cut off
first), so every line is answered exactly once. Only the lease holder writes a batch's record.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from ... import errors
from ...logs import get_logger, redacted_traceback
from ...operations import LINE_ROUTES
from ...operations.batch import (
    BadLine,
    Line,
    LineRequest,
    answer,
    bounded,
    error_line,
    retry_after_of,
    status_of,
)
from ..batch_run import OutputFile, read_jsonl_line
from .settings import BatchSettings
from .store import FINAL, Lease, Store, new_file_id

if TYPE_CHECKING:
    from ...dispatch import Worker

log = get_logger(__name__)

CHECKPOINT_S = 1.0  # at most this long between making the parts durable and writing the record
MAX_VALIDATION_ERRORS = 10  # errors a failed validation reports (the first ones)
TIER = "flex"  # every line's tier: batch work never goes ahead of interactive work
INLINE_LINE_BYTES = 64 * 1024  # longer lines are parsed on a thread
RETRY_BACKOFF_S = 1.0
PARTS = (("output", ".output"), ("error", ".errors"))


def now() -> int:
    return int(time.time())


def _fsync_path(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# --------------------------------------------------------------------------------------------- #
# Validation: the whole file, before any line runs


def validate(path: Path, endpoint: str, max_lines: int) -> tuple[int, list[dict[str, Any]]]:
    """The number of requests in the input file and its errors (OpenAI's BatchError objects, each
    with its line number): every line a JSON object with a unique `custom_id` whose `url` is the
    batch's endpoint. A `method` or `body` at fault is left to the line's own error answer."""
    found: list[dict[str, Any]] = []
    seen: set[str] = set()
    total = 0

    def fail(line: int | None, code: str, message: str, param: str | None = None) -> None:
        found.append({"code": code, "message": message, "param": param, "line": line})

    try:
        source = open(path, "rb")
    except FileNotFoundError:
        fail(None, "invalid_file", "the input file has been deleted", "input_file_id")
        return 0, found
    with source:
        for number, raw in enumerate(source, 1):
            if len(found) >= MAX_VALIDATION_ERRORS:
                break
            if not raw.strip():
                continue
            total += 1
            if total > max_lines:
                fail(
                    number, "too_many_requests", f"more than {max_lines} requests (BATCH_MAX_LINES)"
                )
                break
            try:
                value = orjson.loads(raw)
            except orjson.JSONDecodeError:
                fail(number, "invalid_json_line", f"line {number} is not valid JSON")
                continue
            if not isinstance(value, dict):
                fail(number, "invalid_json_line", f"line {number} is not a JSON object")
                continue
            custom_id = value.get("custom_id")
            if not isinstance(custom_id, str) or not custom_id:
                fail(
                    number,
                    "missing_required_parameter",
                    f"line {number} has no 'custom_id' string",
                    "custom_id",
                )
            elif custom_id in seen:
                fail(
                    number,
                    "duplicate_custom_id",
                    f"line {number} repeats a custom_id of an earlier line",
                    "custom_id",
                )
            else:
                seen.add(custom_id)
            url = value.get("url")
            route = url.rstrip("/") if isinstance(url, str) else None
            if route not in LINE_ROUTES:
                fail(
                    number,
                    "invalid_url",
                    f"line {number}: 'url' must be one of {', '.join(LINE_ROUTES)}",
                    "url",
                )
            elif route != endpoint:
                fail(
                    number,
                    "mismatched_endpoint",
                    f"line {number}: 'url' is not the batch's endpoint {endpoint}",
                    "url",
                )
    if total == 0 and not found:
        fail(None, "empty_file", "the input file holds no requests")
    return total, found


def output_file_record(file_id: str, batch_id: str, kind: str, size: int) -> dict[str, Any]:
    return {
        "file": {
            "id": file_id,
            "object": "file",
            "bytes": size,
            "created_at": now(),
            "filename": f"{batch_id}_{kind}.jsonl",
            "purpose": "batch_output",
            "status": "processed",
            "expires_at": None,
            "status_details": None,
        },
        "order": time.time_ns(),
    }


# --------------------------------------------------------------------------------------------- #
# One run


class Runner:
    """One batch run by the server that holds its lease, until it ends or has to stop."""

    def __init__(
        self,
        store: Store,
        batch_id: str,
        lease: Lease,
        worker: Worker,
        settings: BatchSettings,
        stopping: Callable[[], bool],
    ) -> None:
        self.store = store
        self.batch_id = batch_id
        self.lease = lease
        self.worker = worker
        self.settings = settings
        self.stopping = stopping
        self.reason: str | None = None  # why the lines stop: cancel, expired, stop
        self.counts = {"completed": 0, "failed": 0}
        self.answered: set[str] = set()
        self.unanswered = 0
        self.record: dict[str, Any] = {}
        self.parts: dict[str, OutputFile] = {}

    def _part(self, suffix: str) -> Path:
        return self.store.batch_path(self.batch_id, suffix)

    async def _save(self) -> bool:
        """Write the record, if this server still holds the batch."""
        if not self.lease.valid:
            return False
        await asyncio.to_thread(self.store.put_batch, self.record)
        return True

    async def run(self) -> None:
        """Take the batch on from where it stopped, renewing the lease until the run ends."""
        ended = asyncio.Event()
        keeper = asyncio.create_task(self._keep_lease(ended))
        try:
            await self._run()
        finally:
            ended.set()
            await keeper  # a renewal under way lands before the lease can be given back

    async def _run(self) -> None:
        record = await asyncio.to_thread(self.store.get_batch, self.batch_id)
        if record is None or record["batch"]["status"] in FINAL:
            return
        self.record = record
        batch = record["batch"]
        asked = await asyncio.to_thread(self.store.cancel_requested, self.batch_id)
        if asked is not None and record.get("final") is None:
            self.cancel(asked)
            record["final"] = "cancelled"
        if batch["status"] == "validating" and record.get("final") is None:
            if not await self._validate():
                return
        if record.get("final") is None:
            final = await self._answer_lines()
            if final is None:
                return
            record["final"] = final
        await self._finalize()

    async def _validate(self) -> bool:
        batch = self.record["batch"]
        content = self.store.file_content(batch["input_file_id"])
        total, found = await asyncio.to_thread(
            validate, content, batch["endpoint"], self.settings.max_lines
        )
        if found:
            batch.update(status="failed", failed_at=now())
            batch["errors"] = {"object": "list", "data": found}
            await self._save()
            return False
        batch.update(status="in_progress", in_progress_at=now())
        batch["request_counts"] = {"total": total, "completed": 0, "failed": 0}
        return await self._save()

    # --- answering the lines --------------------------------------------------------------------

    async def _answer_lines(self) -> str | None:
        """Answer the lines not answered yet; the final status to give the batch, or None when
        the run stops before the batch is done."""
        batch = self.record["batch"]
        if time.time() > batch["expires_at"]:
            self.reason = "expired"
        for kind, suffix in PARTS:
            self.parts[kind] = OutputFile(self._part(suffix))
        try:
            for kind, part in self.parts.items():
                done = await asyncio.to_thread(part.open)
                self.counts["completed" if kind == "output" else "failed"] = len(done)
                self.answered |= done
            source = await asyncio.to_thread(
                open, self.store.file_content(batch["input_file_id"]), "rb"
            )
            ticker = asyncio.create_task(self._tick())
            try:
                with source:
                    await bounded(
                        enumerate(source, 1),
                        self._one,
                        self.settings.concurrency,
                        stop=lambda: self.reason is not None,
                    )
                    if self.reason == "expired":
                        source.seek(0)
                        await asyncio.to_thread(self._expire_the_rest, source)
            finally:
                ticker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await ticker
                await self._checkpoint()
        finally:
            for part in self.parts.values():
                part.close()
        if self.reason == "cancel":
            return "cancelled"
        if self.reason == "expired":
            return "expired"
        if self.reason is None and self.unanswered == 0:
            return "completed"
        return None

    async def _one(self, numbered: tuple[int, bytes]) -> None:
        number, raw = numbered
        if len(raw) <= INLINE_LINE_BYTES:
            line = read_jsonl_line(raw, number, {})
        else:
            line = await asyncio.to_thread(read_jsonl_line, raw, number, {})
        if line is None or line.custom_id in self.answered:
            return
        output = await self._answer(line)
        if output is None or not self.lease.valid:  # stopping, or no longer ours to write
            self.unanswered += 1
            return
        self._record(line.custom_id, output)

    def _record(self, custom_id: str, output: dict[str, Any]) -> None:
        status = status_of(output)
        kind = "output" if status is not None and status < 400 else "error"
        self.parts[kind].write(output)
        self.counts["completed" if kind == "output" else "failed"] += 1
        self.answered.add(custom_id)

    async def _answer(self, line: Line) -> dict[str, Any] | None:
        """The line's output at the flex tier; a retryable answer (a full queue, a timeout) is
        tried again until it is not, or None once the run is stopping."""
        if isinstance(line, LineRequest):
            line = LineRequest(line.custom_id, line.url, {**line.body, "service_tier": TIER})
        attempt = 0
        while True:
            output = await answer(self.worker, line)
            if isinstance(line, BadLine) or not errors.is_retryable(status_of(output)):
                return output
            if self.reason is not None:
                return None
            await asyncio.sleep(errors.retry_wait(attempt, RETRY_BACKOFF_S, retry_after_of(output)))
            attempt += 1

    def _expire_the_rest(self, source: Any) -> None:
        """The completion window has ended: every line not answered gets an error line."""
        expired = errors.request_timeout(
            "the batch's completion window ended before this request ran", code="batch_expired"
        )
        for number, raw in enumerate(source, 1):
            line = read_jsonl_line(raw, number, {})
            if line is not None and line.custom_id not in self.answered:
                self._record(line.custom_id, error_line(line.custom_id, expired))
        self.unanswered = 0

    async def _keep_lease(self, ended: asyncio.Event) -> None:
        """Renew the lease every quarter of its term until the run has `ended`, from validation
        to the final status, so that it is given back well before its end; once it is lost the
        lines stop."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ended.wait(), self.lease.term_s / 4)
                return
            try:
                renewed = await asyncio.to_thread(self.lease.renew)
            except Exception as exc:  # a full disk, a vanished volume: stop, resume later
                log.error("batch %s: %s", self.batch_id, redacted_traceback(exc))
                renewed = False
            if not renewed:
                log.warning("batch %s: lease lost; leaving it", self.batch_id)
                self.reason = self.reason or "stop"
                return

    async def _tick(self) -> None:
        """Once a second: look for a cancellation, the window's end, a failing engine and a lost
        lease, and make what is written durable."""
        while True:
            await asyncio.sleep(CHECKPOINT_S)
            try:
                await self._look_around()
                await self._checkpoint()
            except Exception as exc:  # a full disk, a vanished volume: stop, resume later
                log.error("batch %s: %s", self.batch_id, redacted_traceback(exc))
                self.reason = self.reason or "stop"

    def cancel(self, asked_at: float) -> None:
        """Stop taking lines: the batch is being cancelled (asked for at `asked_at`)."""
        if self.reason is None:
            self.reason = "cancel"
            self.record["batch"].update(status="cancelling", cancelling_at=int(asked_at))

    async def _look_around(self) -> None:
        batch = self.record["batch"]
        if self.reason is not None:
            return
        asked = await asyncio.to_thread(self.store.cancel_requested, self.batch_id)
        if asked is not None:
            self.cancel(asked)
        elif time.time() > batch["expires_at"]:
            self.reason = "expired"
        elif self.stopping() or not self.worker.healthy or not self.lease.valid:
            self.reason = "stop"

    async def _checkpoint(self) -> None:
        """fsync the parts, then write the record with the counts of before the fsync."""
        counts = dict(self.counts)
        for kind, suffix in PARTS:
            if kind in self.parts:
                await asyncio.to_thread(_fsync_path, self._part(suffix))
        self.record["batch"]["request_counts"].update(counts)
        await self._save()

    # --- the end --------------------------------------------------------------------------------

    async def _finalize(self) -> None:
        """Turn the parts into the output and error files and give the batch its final status;
        each step can be taken again after a crash between them."""
        record = self.record
        batch = record["batch"]
        final = record["final"]
        for kind, suffix in PARTS:
            key = f"{kind}_file_id"
            part = self._part(suffix)
            if batch.get(key) is None and part.exists() and part.stat().st_size > 0:
                batch[key] = new_file_id()
        if final == "completed" and batch["status"] != "finalizing":
            batch.update(status="finalizing", finalizing_at=now())
        if not await self._save():
            return
        for kind, suffix in PARTS:
            file_id = batch.get(f"{kind}_file_id")
            if file_id is not None:
                await asyncio.to_thread(self._place, file_id, kind, self._part(suffix))
        batch["status"] = final
        batch[f"{final}_at"] = now()
        if await self._save():
            log.info("batch %s: %s", self.batch_id, final)

    def _place(self, file_id: str, kind: str, part: Path) -> None:
        content = self.store.file_content(file_id)
        if part.exists():
            record = output_file_record(file_id, self.batch_id, kind, part.stat().st_size)
            self.store.add_file(file_id, part, record)
        elif content.exists() and self.store.get_file(file_id) is None:
            record = output_file_record(file_id, self.batch_id, kind, content.stat().st_size)
            self.store.add_file(file_id, None, record)
