"""OpenAI's Files and Batches routes over the store, and the scheduler that runs the batches.

The HTTP server (transports/http.py) asks `BatchAPI.routes(path)` for the handlers of a path and
turns their `BatchAnswer` into its response; its API key, Host and Origin checks and its drain apply
as to every route. The scheduler starts with the server: it takes up the batches a restart left
unfinished, and any other server's whose lease has ended, one batch at a time, under a lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol
from urllib.parse import parse_qs

from ... import errors
from ...logs import get_logger, redacted_traceback
from ...operations import LINE_ROUTES, OPENAI_PREFIXES
from .multipart import FormReader, boundary_of
from .runner import Runner, now
from .settings import BatchSettings, default_dir
from .store import BATCH_ID, FILE_ID, FINAL, Lease, Store, checked, new_batch_id, new_file_id

if TYPE_CHECKING:
    from ...dispatch import Worker

log = get_logger(__name__)

COMPLETION_WINDOWS = {"24h": 24 * 3600}
FORM_OVERHEAD_BYTES = 64 * 1024  # an upload's multipart framing and fields beside the file
WRITE_BYTES = 1024 * 1024  # an upload is written to disk in pieces of this size, on a thread
READ_BYTES = 1024 * 1024  # and a download read so
METADATA_KEYS, METADATA_KEY_CHARS, METADATA_VALUE_CHARS = 16, 64, 512
STOP_WAIT_S = 10.0  # on shutdown, how long the lines in flight may take to finish


class Incoming(Protocol):
    """What a route reads of its request (transports/http.py's `Request`)."""

    query: bytes

    def header(self, name: bytes) -> bytes: ...

    async def json(self) -> Any: ...

    def stream(
        self, limit: int, timeout_s: float, too_large: Callable[[int], errors.APIError] | None
    ) -> AsyncIterator[bytes]: ...


@dataclass(frozen=True)
class Download:
    """A stored file's bytes, read as they are sent."""

    size: int
    chunks: AsyncGenerator[bytes, None]


@dataclass(frozen=True)
class BatchAnswer:
    body: Any = None  # a JSON body
    status: int = 200
    download: Download | None = None  # or a file's bytes


Handler = Callable[[Incoming], Awaitable[BatchAnswer]]


async def _read(source: BinaryIO) -> AsyncGenerator[bytes, None]:
    try:
        while chunk := await asyncio.to_thread(source.read, READ_BYTES):
            yield chunk
    finally:
        source.close()


def _query(request: Incoming) -> dict[str, str]:
    parsed = parse_qs(request.query.decode("latin-1"), keep_blank_values=True)
    return {name: values[0] for name, values in parsed.items()}


def _limit(query: dict[str, str], default: int, most: int) -> int:
    raw = query.get("limit")
    if raw is None:
        return default
    if not raw.isdigit() or not 1 <= int(raw) <= most:
        raise errors.invalid_input(f"'limit' must be a whole number from 1 to {most}", "limit")
    return int(raw)


def _page(items: list[dict[str, Any]], after: str | None, limit: int) -> dict[str, Any]:
    """OpenAI's cursor page: the items after the one whose id is `after`, at most `limit`."""
    if after is not None:
        ids = [item["id"] for item in items]
        if after not in ids:
            raise errors.not_found("no such object to list after ('after')")
        items = items[ids.index(after) + 1 :]
    page = items[:limit]
    return {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": len(items) > limit,
    }


def _metadata(value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    if (
        not isinstance(value, dict)
        or len(value) > METADATA_KEYS
        or not all(isinstance(k, str) and len(k) <= METADATA_KEY_CHARS for k in value)
        or not all(isinstance(v, str) and len(v) <= METADATA_VALUE_CHARS for v in value.values())
    ):
        raise errors.invalid_input(
            f"'metadata' must be an object of at most {METADATA_KEYS} strings (keys up to "
            f"{METADATA_KEY_CHARS} characters, values up to {METADATA_VALUE_CHARS})",
            param="metadata",
        )
    return value


def _filename(raw: str | None) -> str:
    """The name a file was uploaded under, as a label only (it never names a path here)."""
    name = (raw or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if ch.isprintable())[:255]
    return name or "upload.jsonl"


@dataclass
class _Tally:
    """What an upload's file part has held so far."""

    size: int = 0
    newlines: int = 0
    last: bytes = b"\n"


class BatchAPI:
    def __init__(self, settings: BatchSettings | None = None, body_timeout_s: float = 120.0):
        self.settings = settings or BatchSettings()
        self.store = Store(self.settings.dir or default_dir())
        self._body_timeout_s = body_timeout_s
        self._owner = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        self._worker: Callable[[], Worker | None] = lambda: None
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._runner: Runner | None = None
        self._collections: dict[str, dict[str, Handler]] = {
            "files": {"GET": self.list_files, "POST": self.upload},
            "batches": {"GET": self.list_batches, "POST": self.create_batch},
        }

    # --- routing --------------------------------------------------------------------------------

    def routes(self, path: str) -> dict[str, Handler] | None:
        """The handlers of a path under /v1 or /openai/v1, by method; None for any other path."""
        rest = next((path[len(p) :] for p in OPENAI_PREFIXES if path.startswith(p + "/")), None)
        if rest is None:
            return None
        parts = rest.strip("/").split("/")
        if len(parts) == 1:
            return self._collections.get(parts[0])
        kind, object_id, *tail = parts
        if kind == "files" and not tail:
            return {
                "GET": lambda r: self.get_file(object_id),
                "DELETE": lambda r: self.delete_file(object_id),
            }
        if kind == "files" and tail == ["content"]:
            return {"GET": lambda r: self.file_content(object_id)}
        if kind == "batches" and not tail:
            return {"GET": lambda r: self.get_batch(object_id)}
        if kind == "batches" and tail == ["cancel"]:
            return {"POST": lambda r: self.cancel_batch(object_id)}
        return None

    # --- files ----------------------------------------------------------------------------------

    async def upload(self, request: Incoming) -> BatchAnswer:
        """POST /v1/files: the file part streamed to a temporary file, bounded in bytes and lines
        as it arrives, then stored whole."""
        boundary = boundary_of(request.header(b"content-type").decode("latin-1"))
        most = self.settings.max_file_bytes
        limit = most + FORM_OVERHEAD_BYTES
        declared = request.header(b"content-length")
        if declared.isdigit() and int(declared) > limit:
            raise _file_too_large(most)
        temp = await asyncio.to_thread(self.store.temp_path)
        out = await asyncio.to_thread(open, temp, "wb")
        pending = bytearray()
        seen = _Tally()

        def sink(data: bytes) -> None:
            seen.size += len(data)
            if seen.size > most:
                raise _file_too_large(most)
            seen.newlines += data.count(b"\n")
            seen.last = data[-1:]
            pending.extend(data)

        reader = FormReader(boundary, "file", sink)
        # The body may take as long as the largest upload at the pace SERVER_BODY_TIMEOUT_S allows
        # for SERVER_MAX_BODY_BYTES-sized bodies; the server's own bound stays for other routes.
        timeout_s = self._body_timeout_s * max(1.0, limit / (20 * 1024 * 1024))
        try:
            async for chunk in request.stream(limit, timeout_s, lambda _: _file_too_large(most)):
                reader.feed(chunk)
                if len(pending) >= WRITE_BYTES:
                    await asyncio.to_thread(out.write, bytes(pending))
                    pending.clear()
            reader.finish()
            await asyncio.to_thread(out.write, bytes(pending))
            await asyncio.to_thread(out.close)
            purpose = reader.fields.get("purpose")
            if purpose != "batch":
                raise errors.invalid_input("'purpose' must be \"batch\"", param="purpose")
            if not reader.has_file or not seen.size:
                raise errors.invalid_input("the upload has no file, or an empty one", "file")
            lines = seen.newlines + (seen.last != b"\n")
            if lines > self.settings.max_lines:
                raise errors.too_large(
                    f"the file has more than {self.settings.max_lines} lines (BATCH_MAX_LINES)",
                    param="file",
                )
            file_id = new_file_id()
            record = {
                "file": {
                    "id": file_id,
                    "object": "file",
                    "bytes": seen.size,
                    "created_at": now(),
                    "filename": _filename(reader.filename),
                    "purpose": "batch",
                    "status": "processed",
                    "expires_at": None,
                    "status_details": None,
                },
                "order": time.time_ns(),
            }
            if not await asyncio.to_thread(self.store.prune_files, self.settings.max_files):
                raise errors.overloaded(
                    f"{self.settings.max_files} files are kept, all inputs of unfinished batches "
                    "(BATCH_MAX_FILES); retry when one has finished",
                    retry_after=60,
                )
            await asyncio.to_thread(self.store.add_file, file_id, temp, record)
        finally:
            out.close()
            await asyncio.to_thread(temp.unlink, missing_ok=True)
        return BatchAnswer(record["file"])

    async def list_files(self, request: Incoming) -> BatchAnswer:
        query = _query(request)
        records = await asyncio.to_thread(self.store.all_files)
        purpose = query.get("purpose")
        items = [r["file"] for r in records if purpose is None or r["file"]["purpose"] == purpose]
        order = query.get("order", "desc")
        if order not in ("asc", "desc"):
            raise errors.invalid_input("'order' must be asc or desc", param="order")
        if order == "desc":
            items.reverse()
        after = query.get("after")
        if after is not None:
            checked(FILE_ID, after, "file")
        return BatchAnswer(_page(items, after, _limit(query, 10_000, 10_000)))

    async def _file(self, file_id: str) -> dict[str, Any]:
        record = await asyncio.to_thread(self.store.get_file, file_id)
        if record is None:
            raise errors.not_found("no such file")
        return record["file"]

    async def get_file(self, file_id: str) -> BatchAnswer:
        return BatchAnswer(await self._file(file_id))

    async def file_content(self, file_id: str) -> BatchAnswer:
        await self._file(file_id)
        try:
            source = await asyncio.to_thread(open, self.store.file_content(file_id), "rb")
        except FileNotFoundError:
            raise errors.not_found("no such file") from None
        size = os.fstat(source.fileno()).st_size
        return BatchAnswer(download=Download(size, _read(source)))

    async def delete_file(self, file_id: str) -> BatchAnswer:
        checked(FILE_ID, file_id, "file")
        if file_id in await asyncio.to_thread(self.store.inputs_in_use):
            raise errors.invalid_input(
                "the file is the input of a batch that has not finished; cancel the batch first",
                param="file_id",
                code="file_in_use",
            )
        if not await asyncio.to_thread(self.store.remove_file, file_id):
            raise errors.not_found("no such file")
        return BatchAnswer({"id": file_id, "object": "file", "deleted": True})

    # --- batches --------------------------------------------------------------------------------

    async def create_batch(self, request: Incoming) -> BatchAnswer:
        body = await request.json()
        if not isinstance(body, dict):
            raise errors.invalid_input("the request body must be a JSON object")
        input_file_id = body.get("input_file_id")
        if not isinstance(input_file_id, str):
            raise errors.invalid_input("'input_file_id' is required", param="input_file_id")
        record = await asyncio.to_thread(self.store.get_file, input_file_id)
        if record is None:
            raise errors.not_found("no such file ('input_file_id')")
        if record["file"]["purpose"] != "batch":
            raise errors.invalid_input(
                "'input_file_id' must be a file uploaded with purpose \"batch\"",
                param="input_file_id",
            )
        endpoint = body.get("endpoint")
        if not isinstance(endpoint, str) or endpoint.rstrip("/") not in LINE_ROUTES:
            raise errors.invalid_input(
                f"'endpoint' must be one of {', '.join(LINE_ROUTES)}", param="endpoint"
            )
        window = body.get("completion_window")
        if window not in COMPLETION_WINDOWS:
            raise errors.invalid_input(
                f"'completion_window' must be one of {', '.join(COMPLETION_WINDOWS)}",
                param="completion_window",
            )
        metadata = _metadata(body.get("metadata"))
        if not await asyncio.to_thread(self.store.prune_batches, self.settings.retention):
            raise errors.overloaded(
                f"{self.settings.retention} batches are kept and none has finished "
                "(BATCH_RETENTION); retry when one has",
                retry_after=60,
            )
        created = now()
        batch = {
            "id": new_batch_id(),
            "object": "batch",
            "endpoint": endpoint.rstrip("/"),
            "errors": None,
            "input_file_id": input_file_id,
            "completion_window": window,
            "status": "validating",
            "output_file_id": None,
            "error_file_id": None,
            "created_at": created,
            "in_progress_at": None,
            "expires_at": created + COMPLETION_WINDOWS[window],
            "finalizing_at": None,
            "completed_at": None,
            "failed_at": None,
            "expired_at": None,
            "cancelling_at": None,
            "cancelled_at": None,
            "request_counts": {"total": 0, "completed": 0, "failed": 0},
            "metadata": metadata,
        }
        await asyncio.to_thread(
            self.store.put_batch, {"batch": batch, "order": time.time_ns(), "final": None}
        )
        self._wake.set()
        return BatchAnswer(batch)

    def _view(self, record: dict[str, Any]) -> dict[str, Any]:
        """The Batch object; a cancellation asked for and not yet taken up shows as cancelling."""
        batch = dict(record["batch"])
        if batch["status"] not in FINAL and batch["status"] != "cancelling":
            asked = self.store.cancel_requested(batch["id"])
            if asked is not None:
                batch.update(status="cancelling", cancelling_at=int(asked))
        return batch

    async def _batch(self, batch_id: str) -> dict[str, Any]:
        record = await asyncio.to_thread(self.store.get_batch, batch_id)
        if record is None:
            raise errors.not_found("no such batch")
        return record

    async def get_batch(self, batch_id: str) -> BatchAnswer:
        record = await self._batch(batch_id)
        return BatchAnswer(await asyncio.to_thread(self._view, record))

    async def list_batches(self, request: Incoming) -> BatchAnswer:
        query = _query(request)
        records = await asyncio.to_thread(self.store.all_batches)
        items = await asyncio.to_thread(lambda: [self._view(r) for r in reversed(records)])
        after = query.get("after")
        if after is not None:
            checked(BATCH_ID, after, "batch")
        return BatchAnswer(_page(items, after, _limit(query, 20, 100)))

    async def cancel_batch(self, batch_id: str) -> BatchAnswer:
        """Asks the batch's runner, whichever server it is on, to stop: the lines answered so far
        are kept in its output and error files; a finished batch is answered as it is."""
        record = await self._batch(batch_id)
        if record["batch"]["status"] not in FINAL:
            await asyncio.to_thread(self.store.request_cancel, batch_id)
            runner = self._runner
            if runner is not None and runner.batch_id == batch_id:
                runner.cancel(time.time())
            self._wake.set()
        return BatchAnswer(await asyncio.to_thread(self._view, record))

    # --- the scheduler --------------------------------------------------------------------------

    def start(self, worker: Callable[[], Worker | None]) -> None:
        """Start running batches, with the worker `worker()` gives once the models are ready."""
        self._worker = worker
        self._stopping = False
        self._task = asyncio.create_task(self._schedule())

    async def stop(self) -> None:
        """Stop taking lines; the lines in flight finish (for at most STOP_WAIT_S), what is
        written is made durable and the lease given back, so that a restart or another server
        goes on at once."""
        self._stopping = True
        self._wake.set()
        task, self._task = self._task, None
        if task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(task), STOP_WAIT_S)
        except TimeoutError:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    @property
    def _poll_s(self) -> float:
        return max(0.2, min(5.0, self.settings.lease_s / 4))

    async def _schedule(self) -> None:
        await asyncio.to_thread(self.store.clean_tmp)
        while not self._stopping:
            worker = self._worker()
            finished = False
            if worker is not None and worker.healthy:
                try:
                    finished = await self._run_next(worker)
                except Exception as exc:  # a full disk, an unreadable folder: try again later
                    log.error("batches: %s", redacted_traceback(exc))
            if finished:
                continue
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._poll_s):
                    await self._wake.wait()

    async def _run_next(self, worker: Worker) -> bool:
        """Run the oldest unfinished batch this server can lease; whether one ran to its end."""
        records = await asyncio.to_thread(self.store.all_batches)
        for record in records:
            batch_id = record["batch"]["id"]
            if record["batch"]["status"] in FINAL or self._stopping:
                continue
            lease = Lease(
                self.store.batch_path(batch_id, ".lease"), self._owner, self.settings.lease_s
            )
            if not await asyncio.to_thread(lease.acquire):
                continue
            runner = Runner(
                self.store, batch_id, lease, worker, self.settings, lambda: self._stopping
            )
            self._runner = runner
            try:
                await runner.run()
            finally:
                self._runner = None
                await asyncio.to_thread(lease.release)
            done = await asyncio.to_thread(self.store.get_batch, batch_id)
            return done is not None and done["batch"]["status"] in FINAL
        return False


def _file_too_large(most: int) -> errors.APIError:
    return errors.too_large(
        f"the file is over {most} bytes (BATCH_MAX_FILE_BYTES)", param="file", code="file_too_large"
    )
