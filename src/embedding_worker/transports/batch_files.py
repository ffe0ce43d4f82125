"""Batch files: a file of request lines answered into an OpenAI Batch output file, resumable.

`embedding-worker batch requests.jsonl --output results.jsonl` answers the lines on this machine
(`run_local`), or with `--endpoint URL` on a deployed endpoint (remote.py). Lines are OpenAI Batch
request lines, plain `{"text": ...}` lines, or the lines of a text file, one document each; their
format and answering are operations/batch.py's.

The input is streamed and at most `concurrency` lines are in flight, so memory holds the lines in
flight and the set of custom_ids seen, never the file or its answers. Output lines are appended as
they complete (completion order: match them by custom_id); a run that stops is resumed by running it
again: custom_ids already in the output are skipped, and a partly written last line is cut off
first. The reading, skipping and writing are batch_run.py's, shared by both ways of answering.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..operations.batch import (
    DEFAULT_CONCURRENCY,
    DEFAULT_RETRIES,
    JOB_MAX_LINES,
    Line,
    answer,
    bounded,
)
from .batch_run import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_JOBS,
    BatchOptions,
    BatchRun,
    OutputFileError,
    Summary,
)

if TYPE_CHECKING:
    from ..dispatch import Worker

PLAIN_OPTIONS = ("model", "encoding_format", "dimensions", "prompt_type", "instruction")


async def run_local(worker: Worker, run: BatchRun) -> None:
    options = run.options

    def unhealthy() -> bool:
        return not worker.healthy

    async def one(line: Line) -> None:
        run.write(await answer(worker, line, options.retries, options.backoff_s))

    await bounded(run.lines(), one, options.concurrency, stop=unhealthy)
    if not worker.healthy:
        run.summary.aborted = f"the engine failed: {worker.registry.health.reason}"


async def run_batch(worker: Worker | None, options: BatchOptions) -> Summary:
    with BatchRun(options) as run:
        if options.endpoint:
            from .remote import run_endpoint

            await run_endpoint(run)
        else:
            assert worker is not None, "a local batch run needs a worker"
            await run_local(worker, run)
    return run.summary


# --------------------------------------------------------------------------------------------- #
# Command line (embedding-worker batch): parsed and checked before any model loads


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", type=Path, help="input file")
    parser.add_argument(
        "--output", required=True, type=Path, help="output JSONL (appended, resumed)"
    )
    parser.add_argument(
        "--format",
        choices=("auto", "jsonl", "text"),
        default="auto",
        help="input format; auto: text for a .txt file, JSONL otherwise",
    )
    parser.add_argument(
        "--concurrency",
        type=_positive,
        default=DEFAULT_CONCURRENCY,
        help="lines in flight on this machine",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=DEFAULT_RETRIES,
        help="tries again after a full queue, a timeout or a failed job",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    plain = parser.add_argument_group("plain lines and text files (ignored by full batch lines)")
    plain.add_argument("--model")
    plain.add_argument("--encoding-format", choices=("float", "base64"))
    plain.add_argument("--dimensions", type=_positive)
    plain.add_argument("--prompt-type")
    plain.add_argument("--instruction")
    remote = parser.add_argument_group("a deployed RunPod endpoint (API key from RUNPOD_API_KEY)")
    remote.add_argument("--endpoint", help="https://api.runpod.ai/v2/<ENDPOINT_ID>")
    remote.add_argument("--jobs", type=_positive, default=DEFAULT_JOBS, help="jobs in flight")
    remote.add_argument(
        "--chunk-size",
        type=_positive,
        default=DEFAULT_CHUNK_SIZE,
        help=f"lines per job (at most {JOB_MAX_LINES})",
    )


def options_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> BatchOptions:
    """The run's options; a usage error exits through `parser` (status 2)."""
    if not args.input.is_file():
        parser.error(f"{args.input}: no such file")
    if args.output.resolve() == args.input.resolve():
        parser.error("--output must not be the input file")
    if args.chunk_size > JOB_MAX_LINES:
        parser.error(f"--chunk-size: at most {JOB_MAX_LINES}")
    text = args.format == "text" or (args.format == "auto" and args.input.suffix.lower() == ".txt")
    defaults = {
        name: getattr(args, name) for name in PLAIN_OPTIONS if getattr(args, name) is not None
    }
    return BatchOptions(
        input=args.input,
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


def main(worker: Worker | None, options: BatchOptions) -> int:
    """Run a batch file: the exit status (0: every line answered; 1: some left for the next run;
    2: an output file that is not ours, a file error; 130: Ctrl-C). `worker` is None with
    `--endpoint`: the lines go to the deployed endpoint and no model loads here."""

    async def run_and_stop() -> Summary:
        try:
            return await run_batch(worker, options)
        finally:
            if worker is not None:
                await worker.stop()  # Infinity's threads would keep the process alive

    from tqdm.contrib.logging import logging_redirect_tqdm

    try:
        # Log lines go above the progress bar instead of through it.
        with logging_redirect_tqdm():
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
