"""One run over a batch file: its lines read lazily, each custom_id once, and its answers appended
to a resumable output file. Both ways of answering the lines use it: on this machine
(batch_files.py) and on a deployed endpoint (remote.py).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from .. import errors
from ..operations import LINE_ROUTES
from ..operations.batch import (
    DEFAULT_BACKOFF_S,
    DEFAULT_CONCURRENCY,
    DEFAULT_RETRIES,
    Line,
    LineRequest,
    bad_line,
    line_id,
    parse_line,
    status_of,
)

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_JOBS",
    "BatchOptions",
    "BatchRun",
    "OutputFile",
    "OutputFileError",
    "Summary",
    "read_jsonl_line",
    "read_text_line",
]

log = logging.getLogger(__name__)

DEFAULT_JOBS = 8  # jobs in flight on a deployed endpoint
DEFAULT_CHUNK_SIZE = 64  # lines per job on a deployed endpoint


# --------------------------------------------------------------------------------------------- #
# Input files


def read_jsonl_line(raw: bytes, line_no: int, defaults: Mapping[str, Any]) -> Line | None:
    """One line of a JSONL file; None for a blank line."""
    if not raw.strip():
        return None
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return bad_line(line_id(line_no), line_no, "not valid JSON")
    return parse_line(value, line_no, defaults, LINE_ROUTES)


def read_text_line(raw: bytes, line_no: int, defaults: Mapping[str, Any]) -> Line | None:
    """One line of a text file: one document to embed, custom_id `line-N`; None for a blank line."""
    if not raw.strip():
        return None
    try:
        text = raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        return bad_line(line_id(line_no), line_no, "not valid UTF-8")
    return LineRequest(line_id(line_no), "/v1/embeddings", {**defaults, "input": text})


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
    retries: int = DEFAULT_RETRIES
    backoff_s: float = DEFAULT_BACKOFF_S
    progress: bool = True
    endpoint: str | None = None
    jobs: int = DEFAULT_JOBS
    chunk_size: int = DEFAULT_CHUNK_SIZE
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
                if line.custom_id in self.seen:
                    # Kept once: the output must hold one line per custom_id for resuming and
                    # matching to work. The first occurrence is the one answered.
                    self.summary.duplicates += 1
                    if len(self.summary.duplicate_lines) < 20:
                        self.summary.duplicate_lines.append(line_no)
                    self.progress.update(1)
                    continue
                self.seen.add(line.custom_id)
                if line.custom_id in self.done:
                    self.summary.already_done += 1
                    continue
                yield line

    def write(self, output: Mapping[str, Any]) -> None:
        """Record an output line; a retryable failure is left out, for the next run to retry."""
        status = status_of(output)
        if errors.is_retryable(status):
            self.summary.unanswered += 1
        else:
            self.output.write(output)
            self.summary.answered += 1
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
