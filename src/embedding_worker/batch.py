"""Batch files: OpenAI Batch request lines in, OpenAI Batch output lines out, through one dispatch.

Three transports share the line handling here:
- `python handler.py --batch requests.jsonl --output results.jsonl`: on this machine (`run_local`);
- a RunPod job `{"input": {"batch": [line, ...]}}` answering `{"object": "list", "data": [output
  line, ...]}` in the same order (`answer_job`, routed by dispatch.py);
- the same command with `--endpoint URL`: chunks of lines sent as such jobs to a deployed endpoint
  (batch_remote.py).

Every request line goes through `Worker.call`. The input is streamed and at most `concurrency` lines
are in flight, so memory holds the lines in flight and the set of custom_ids seen, never the file or
its answers. Output lines are appended as they complete (completion order: match them by
custom_id); a run that stops is resumed by running it again: custom_ids already in the output are
skipped, and a partly written last line is cut off first.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Iterable, Iterator, Mapping, TypeVar

import orjson

from . import errors
from .errors import APIError

if TYPE_CHECKING:
    from .dispatch import Worker

log = logging.getLogger(__name__)

LINE_ROUTES = ("/v1/embeddings", "/v1/rerank")
JOB_MAX_LINES = 1000  # most lines in one RunPod batch job (RunPod's /run takes at most 10 MB)
DEFAULT_CONCURRENCY = 64  # lines in flight: enough for the engine to fill its batches
RETRY_STATUSES = frozenset({429, 503})  # queue full, engine timeout: worth another try
PLAIN_OPTIONS = ("model", "encoding_format", "dimensions", "prompt_type", "instruction")

T = TypeVar("T")
_END: Any = object()


# --------------------------------------------------------------------------------------------- #
# Request lines


@dataclass(frozen=True)
class Request:
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


Line = Request | BadLine


def line_id(line_no: int) -> str:
    """The custom_id of a line that carries none (text files, plain lines, unreadable lines)."""
    return f"line-{line_no}"


def _bad(custom_id: str, line_no: int, message: str) -> BadLine:
    error = errors.invalid_input(f"line {line_no}: {message}", code="invalid_batch_line")
    return BadLine(custom_id, error)


def parse_line(value: Any, line_no: int, defaults: Mapping[str, Any]) -> Line:
    """One decoded JSON line: an OpenAI Batch request line, or a plain `{"text": ...}` line.

    A plain line embeds its text with `defaults` (model, encoding_format, ...) and the custom_id it
    carries, or `line-N` without one.
    """
    if not isinstance(value, dict):
        return _bad(line_id(line_no), line_no, "a batch line must be a JSON object")
    custom_id = value.get("custom_id")
    if "url" not in value and "body" not in value and "text" in value:
        if custom_id is None:
            custom_id = line_id(line_no)
        if not isinstance(custom_id, str) or not custom_id:
            return _bad(line_id(line_no), line_no, "'custom_id' must be a non-empty string")
        return Request(custom_id, "/v1/embeddings", {**defaults, "input": value["text"]})
    if not isinstance(custom_id, str) or not custom_id:
        return _bad(line_id(line_no), line_no, "'custom_id' must be a non-empty string")
    method = value.get("method", "POST")
    if method != "POST":
        return _bad(custom_id, line_no, "'method' must be \"POST\"")
    url = value.get("url")
    if not isinstance(url, str) or url.rstrip("/") not in LINE_ROUTES:
        return _bad(custom_id, line_no, f"'url' must be one of {', '.join(LINE_ROUTES)}")
    body = value.get("body")
    if not isinstance(body, dict):
        return _bad(custom_id, line_no, "'body' must be a JSON object")
    return Request(custom_id, url.rstrip("/"), body)


def read_jsonl_line(raw: bytes, line_no: int, defaults: Mapping[str, Any]) -> Line | None:
    """One line of a JSONL file; None for a blank line."""
    if not raw.strip():
        return None
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return _bad(line_id(line_no), line_no, "not valid JSON")
    return parse_line(value, line_no, defaults)


def read_text_line(raw: bytes, line_no: int, defaults: Mapping[str, Any]) -> Line | None:
    """One line of a text file: one document to embed, custom_id `line-N`; None for a blank line."""
    if not raw.strip():
        return None
    try:
        text = raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        return _bad(line_id(line_no), line_no, "not valid UTF-8")
    return Request(line_id(line_no), "/v1/embeddings", {**defaults, "input": text})


# --------------------------------------------------------------------------------------------- #
# Output lines (OpenAI Batch output: {"id", "custom_id", "response", "error"})


def response_line(custom_id: str, status: int, body: dict[str, Any]) -> dict[str, Any]:
    """An answered request; HTTP errors are answers too (`response.status_code` >= 400)."""
    request_id = body.get("id") if isinstance(body.get("id"), str) else f"req_{uuid.uuid4().hex}"
    return {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": custom_id,
        "response": {"status_code": status, "request_id": request_id, "body": body},
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


def is_retryable(output: Mapping[str, Any]) -> bool:
    return status_of(output) in RETRY_STATUSES


async def answer(
    worker: Worker, line: Line, retries: int = 3, backoff_s: float = 0.5
) -> dict[str, Any]:
    """The output line for one line. A full queue or a timeout is retried (bounded, with backoff)
    while the worker is healthy; after that the retryable answer is returned as it is."""
    if isinstance(line, BadLine):
        return error_line(line.custom_id, line.error)
    for attempt in range(retries + 1):
        reply = await worker.call(line.url, line.body)
        if reply.status not in RETRY_STATUSES or attempt == retries or not worker.healthy:
            break
        await asyncio.sleep(backoff_s * 2**attempt)
    return response_line(line.custom_id, reply.status, reply.body)


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
# The RunPod job form: {"batch": [line, ...]} -> {"object": "list", "data": [output line, ...]}


async def answer_job(worker: Worker, job_input: Mapping[str, Any]) -> dict[str, Any]:
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
    outputs: list[dict[str, Any]] = [{}] * len(lines)

    async def run(indexed: tuple[int, Any]) -> None:
        index, value = indexed
        outputs[index] = await answer(worker, parse_line(value, index + 1, {}))

    await bounded(enumerate(lines), run, DEFAULT_CONCURRENCY)
    # Each line's answer is within the limit, their sum may not be: RunPod would drop it and the
    # sender would wait for nothing. runpod writes JSON with spaces: about 1/8 more than orjson.
    size = len(orjson.dumps(outputs))
    size += size // 8
    if size > worker.limits.max_response_bytes:
        raise errors.too_large(
            f"the answers of {len(lines)} lines would be about {size} bytes, more than the limit "
            f"of {worker.limits.max_response_bytes} (MAX_RESPONSE_BYTES); send fewer lines per "
            'job or ask for "encoding_format": "base64"',
            param="batch",
            code="response_too_large",
        )
    return {"object": "list", "data": outputs}


# --------------------------------------------------------------------------------------------- #
# The output file


class OutputFileError(Exception):
    """The output file cannot be resumed (it is not a batch output file)."""


class OutputFile:
    """The results file, appended one whole line at a time and resumable.

    `open()` cuts off a partly written last line (a run killed mid-write), reads the custom_ids
    already answered, and opens the file for appending.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: Any = None

    def open(self) -> set[str]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.touch()
        cut = _cut_partial_last_line(self.path)
        if cut:
            log.warning("%s: cut off a partly written last line (%d bytes)", self.path, cut)
        done: set[str] = set()
        with open(self.path, "rb") as existing:
            for number, raw in enumerate(existing, 1):
                if not raw.strip():
                    continue
                try:
                    custom_id = orjson.loads(raw).get("custom_id")
                except (orjson.JSONDecodeError, AttributeError):
                    custom_id = None
                if not isinstance(custom_id, str):
                    raise OutputFileError(
                        f"{self.path} line {number} is not a batch output line; "
                        "refusing to append to it (choose another --output)"
                    )
                done.add(custom_id)
        self._file = open(self.path, "ab")
        return done

    def write(self, output: Mapping[str, Any]) -> None:
        # One write and a flush per line: a kill leaves at most one partial line, cut off on resume.
        self._file.write(orjson.dumps(output) + b"\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _cut_partial_last_line(path: Path) -> int:
    """Truncate `path` after its last newline; the number of bytes cut."""
    with open(path, "r+b") as file:
        size = file.seek(0, os.SEEK_END)
        end = size
        while end > 0:
            start = max(0, end - 65536)
            file.seek(start)
            block = file.read(end - start)
            newline = block.rfind(b"\n")
            if newline >= 0:
                keep = start + newline + 1
                break
            end = start
        else:
            keep = 0
        if keep < size:
            file.truncate(keep)
        return size - keep


# --------------------------------------------------------------------------------------------- #
# Running a file


@dataclass
class BatchOptions:
    input: Path
    output: Path
    text: bool  # a text file, one document per line
    defaults: dict[str, Any]  # request options of plain lines and text files
    concurrency: int = DEFAULT_CONCURRENCY
    retries: int = 3
    backoff_s: float = 0.5
    progress: bool = True
    endpoint: str | None = None
    jobs: int = 8
    chunk_size: int = 64
    poll_s: float = 0.5
    job_timeout_s: float = 1800.0


@dataclass
class Summary:
    answered: int = 0
    failed: int = 0  # answered with an error (status >= 400 or a bad line)
    already_done: int = 0
    duplicates: int = 0
    unanswered: int = 0  # retryable failures not written: the next run retries them
    aborted: str | None = None
    duplicate_lines: list[int] = field(default_factory=list)

    def describe(self, output: Path) -> str:
        text = (
            f"batch: {self.answered} lines answered ({self.failed} with errors) into {output}; "
            f"{self.already_done} already there, {self.duplicates} duplicate custom_ids skipped, "
            f"{self.unanswered} unanswered"
        )
        if self.duplicate_lines:
            numbers = ", ".join(map(str, self.duplicate_lines))
            text += f"\nbatch: duplicate custom_ids on lines {numbers}"
            if self.duplicates > len(self.duplicate_lines):
                text += ", ..."
        if self.aborted:
            text += f"\nbatch: stopped: {self.aborted}"
        if self.unanswered or self.aborted:
            text += "\nbatch: run the same command again to answer the rest"
        return text


class BatchRun:
    """One run over an input file into an output file: the reading, skipping and writing shared by
    the local and the endpoint modes."""

    def __init__(self, options: BatchOptions) -> None:
        self.options = options
        self.summary = Summary()
        self.output = OutputFile(options.output)
        self.done: set[str] = set()
        self.seen: set[str] = set()
        self.progress: Any = None

    def __enter__(self) -> BatchRun:
        self.done = self.output.open()
        from tqdm import tqdm

        self.progress = tqdm(
            total=max(0, _count_lines(self.options.input) - len(self.done)),
            unit="line",
            file=sys.stderr,
            disable=not self.options.progress,
            dynamic_ncols=True,
            smoothing=0.1,
        )
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.close()
        self.output.close()

    def lines(self) -> Iterator[Line]:
        """The input's lines still to answer, read lazily, each custom_id once."""
        reader = read_text_line if self.options.text else read_jsonl_line
        with open(self.options.input, "rb") as source:
            for line_no, raw in enumerate(source, 1):
                line = reader(raw, line_no, self.options.defaults)
                if line is None:
                    continue
                if line.custom_id in self.done:
                    self.summary.already_done += 1
                    continue
                if line.custom_id in self.seen:
                    # Kept once: the output must hold one line per custom_id for resuming and
                    # matching to work. The first occurrence is the one answered.
                    self.summary.duplicates += 1
                    if len(self.summary.duplicate_lines) < 20:
                        self.summary.duplicate_lines.append(line_no)
                    self.progress.update(1)
                    continue
                self.seen.add(line.custom_id)
                yield line

    def write(self, output: Mapping[str, Any]) -> None:
        """Record an output line; a retryable failure is left out, for the next run to retry."""
        if is_retryable(output):
            self.summary.unanswered += 1
        else:
            self.output.write(output)
            self.summary.answered += 1
            status = status_of(output)
            if status is None or status >= 400:
                self.summary.failed += 1
        self.progress.update(1)

    def leave_unanswered(self, count: int) -> None:
        """Lines given up on in this run: not written, so the next run answers them."""
        self.summary.unanswered += count
        self.progress.update(count)


def _count_lines(path: Path) -> int:
    """Non-blank lines, for the progress bar's total (one streaming pass)."""
    with open(path, "rb") as source:
        return sum(1 for raw in source if raw.strip())


async def run_local(worker: Worker, run: BatchRun) -> None:
    options = run.options

    def unhealthy() -> bool:
        return not worker.healthy

    async def one(line: Line) -> None:
        run.write(await answer(worker, line, options.retries, options.backoff_s))

    await bounded(run.lines(), one, options.concurrency, stop=unhealthy)
    if not worker.healthy:
        run.summary.aborted = f"the engine failed: {worker.registry.health.reason}"


async def run_batch(worker: Worker, options: BatchOptions) -> Summary:
    with BatchRun(options) as run:
        if options.endpoint:
            from .batch_remote import run_endpoint

            await run_endpoint(run)
        else:
            await run_local(worker, run)
    return run.summary


# --------------------------------------------------------------------------------------------- #
# Command line


def wants_batch(argv: list[str]) -> bool:
    """Whether the command line asks for a batch run (other flags are left to other transports)."""
    detector = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    detector.add_argument("--batch")
    known, _ = detector.parse_known_args(argv)
    return known.batch is not None


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python handler.py",
        description="Answer a batch file (OpenAI Batch JSONL, plain {\"text\"} lines, or a .txt "
        "file with one document per line) into an OpenAI Batch output file; resumable.",
        allow_abbrev=False,
    )
    parser.add_argument("--batch", required=True, type=Path, help="input file")
    parser.add_argument(
        "--output", required=True, type=Path, help="output JSONL (appended, resumed)"
    )
    parser.add_argument(
        "--format", choices=("auto", "jsonl", "text"), default="auto",
        help="input format; auto: text for a .txt file, JSONL otherwise",
    )
    parser.add_argument("--concurrency", type=_positive, default=DEFAULT_CONCURRENCY,
                        help="lines in flight on this machine")
    parser.add_argument("--retries", type=int, default=3,
                        help="tries again after a full queue, a timeout or a failed job")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    plain = parser.add_argument_group("plain lines and text files (ignored by full batch lines)")
    plain.add_argument("--model")
    plain.add_argument("--encoding-format", choices=("float", "base64"))
    plain.add_argument("--dimensions", type=_positive)
    plain.add_argument("--prompt-type")
    plain.add_argument("--instruction")
    remote = parser.add_argument_group("a deployed RunPod endpoint (API key from RUNPOD_API_KEY)")
    remote.add_argument("--endpoint", help="https://api.runpod.ai/v2/<ENDPOINT_ID>")
    remote.add_argument("--jobs", type=_positive, default=8, help="jobs in flight")
    remote.add_argument("--chunk-size", type=_positive, default=64,
                        help=f"lines per job (at most {JOB_MAX_LINES})")
    return parser


def parse_options(argv: list[str]) -> BatchOptions:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.batch.is_file():
        parser.error(f"--batch {args.batch}: no such file")
    if args.output.resolve() == args.batch.resolve():
        parser.error("--output must not be the input file")
    if args.chunk_size > JOB_MAX_LINES:
        parser.error(f"--chunk-size: at most {JOB_MAX_LINES}")
    text = args.format == "text" or (args.format == "auto" and args.batch.suffix.lower() == ".txt")
    defaults = {
        name: getattr(args, name) for name in PLAIN_OPTIONS if getattr(args, name) is not None
    }
    return BatchOptions(
        input=args.batch,
        output=args.output,
        text=text,
        defaults=defaults,
        concurrency=args.concurrency,
        retries=max(0, args.retries),
        progress=not args.no_progress,
        endpoint=args.endpoint.rstrip("/") if args.endpoint else None,
        jobs=args.jobs,
        chunk_size=args.chunk_size,
    )


def main(worker: Worker, argv: list[str]) -> int:
    """`python handler.py --batch ...`: the exit status (0: every line answered; 1: some left for
    the next run; 2: bad usage, an output file that is not ours, a file error; 130: Ctrl-C)."""
    options = parse_options(argv)

    async def run_and_stop() -> Summary:
        try:
            return await run_batch(worker, options)
        finally:
            await worker.stop()  # Infinity's threads would keep the process alive

    try:
        summary = asyncio.run(run_and_stop())
    except OutputFileError as exc:
        print(f"batch: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the input vanished, the disk is full, ...
        print(f"batch: {exc}; run the same command again to resume", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("batch: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    print(summary.describe(options.output), file=sys.stderr)
    return 1 if summary.unanswered or summary.aborted else 0
