"""Batch files: what concurrent lines buy, and memory that does not grow with the file.

    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.batch_file [--lines 1000] [--repeats 3]

On the bundled all-MiniLM-L6-v2 (real weights), one line per short text:
- throughput: `--concurrency 64` (the default) against 1 line at a time, in lines/s, as a ratio
  measured in the same run (the variants are interleaved, medians reported);
- memory: the peak of Python allocations (tracemalloc) while answering N lines and 4N lines; the
  ratio stays near 1 because the file is streamed and only the lines in flight are held.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import tempfile
import time
import tracemalloc
from pathlib import Path

from embedding_worker.config import DEFAULT_MODEL_ID, load_config
from embedding_worker.dispatch import Worker
from embedding_worker.transports.batch_files import run_batch
from embedding_worker.transports.batch_run import BatchOptions

WORDS = "the quick brown fox jumps over a lazy dog near old stone bridges under quiet stars".split()


def write_input(path: Path, lines: int) -> Path:
    rng = random.Random(0)
    with open(path, "w") as out:
        for n in range(lines):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14)))
            body = {"model": DEFAULT_MODEL_ID, "input": [text], "encoding_format": "base64"}
            line = {"custom_id": f"r{n}", "url": "/v1/embeddings", "body": body}
            out.write(json.dumps(line) + "\n")
    return path


async def answer_file(worker: Worker, source: Path, output: Path, concurrency: int) -> float:
    output.unlink(missing_ok=True)
    options = BatchOptions(
        input=source,
        output=output,
        text=False,
        defaults={},
        concurrency=concurrency,
        progress=False,
    )
    started = time.perf_counter()
    summary = await run_batch(worker, options)
    elapsed = time.perf_counter() - started
    assert summary.unanswered == 0 and summary.failed == 0
    return elapsed


async def compare(lines: int, repeats: int) -> None:
    worker = Worker.from_config(load_config({"DTYPES": "float32", "BATCH_SIZES": "32"}))
    await worker.start()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        source = write_input(tmp_path / "in.jsonl", lines)
        await answer_file(worker, source, tmp_path / "warm.jsonl", 64)  # warm-up

        times: dict[int, list[float]] = {1: [], 64: []}
        for repeat in range(repeats):
            for concurrency in (1, 64) if repeat % 2 == 0 else (64, 1):
                times[concurrency].append(
                    await answer_file(worker, source, tmp_path / "out.jsonl", concurrency)
                )
        rate = {c: lines / statistics.median(t) for c, t in times.items()}

        peaks = {}
        for count in (lines, 4 * lines):
            big = write_input(tmp_path / f"in{count}.jsonl", count)
            tracemalloc.start()
            await answer_file(worker, big, tmp_path / "mem.jsonl", 64)
            peaks[count] = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
    await worker.stop()

    print(f"lines/s, 1 line at a time:   {rate[1]:8.1f}")
    print(f"lines/s, 64 lines in flight: {rate[64]:8.1f}   ratio {rate[64] / rate[1]:.2f}x")
    print(f"peak Python memory, {lines} lines: {peaks[lines] / 2**20:7.2f} MiB")
    print(
        f"peak Python memory, {4 * lines} lines: {peaks[4 * lines] / 2**20:7.2f} MiB"
        f"   ratio {peaks[4 * lines] / peaks[lines]:.2f}x for 4x the lines"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.batch_file",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--lines", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    asyncio.run(compare(args.lines, args.repeats))


if __name__ == "__main__":
    main()
