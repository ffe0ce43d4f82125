"""The Batch API against a batch file, on the same server and the same file.

    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.batch_api [--lines 20000] [--rounds 2]

One local server (`handler.py --serve`, the bundled all-MiniLM-L6-v2, float32) answers one JSONL
file of short one-text lines (4 to 14 words) two ways:
- the Batch API: upload, create, poll every 0.5 s until completed, download the output file (the
  openai SDK); its lines run at the flex tier, `BATCH_CONCURRENCY` (64) at a time;
- a batch file: `embedding-worker batch FILE --output OUT --endpoint URL` against the same server
  (its defaults: jobs of 64 lines, 8 jobs in flight), run in this process.
Each is timed from the first byte sent to the last line in hand; the rounds are interleaved
(A B, B A, ...) and the ratio is the median over rounds of batch-file time / Batch API time
(above 1: the Batch API is faster).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

from bench.batch_file import write_input
from bench.common import offline, start_local_server, stop_server, wait_listening


async def through_batch_api(url: str, source: Path) -> float:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    started = time.perf_counter()
    with open(source, "rb") as data:
        uploaded = await client.files.create(file=data, purpose="batch")
    batch = await client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h"
    )
    while batch.status not in ("completed", "failed", "cancelled", "expired"):
        await asyncio.sleep(0.5)
        batch = await client.batches.retrieve(batch.id)
    assert batch.status == "completed" and batch.error_file_id is None, batch
    assert batch.output_file_id is not None
    output = await client.files.content(batch.output_file_id)
    elapsed = time.perf_counter() - started
    assert output.content.count(b"\n") == batch.request_counts.total
    await client.close()
    return elapsed


async def through_batch_file(url: str, source: Path, output: Path) -> float:
    from embedding_worker.transports.batch_files import run_batch
    from embedding_worker.transports.batch_run import BatchOptions

    output.unlink(missing_ok=True)
    options = BatchOptions(
        input=source, output=output, text=False, defaults={}, progress=False, endpoint=url
    )
    started = time.perf_counter()
    summary = await run_batch(None, options)
    elapsed = time.perf_counter() - started
    assert summary.unanswered == 0 and summary.failed == 0 and not summary.aborted, summary
    return elapsed


async def compare(lines: int, rounds: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        source = write_input(folder / "in.jsonl", lines)
        warm = write_input(folder / "warm.jsonl", 200)
        env = {"BATCH_DIR": str(folder / "batches"), "BATCH_SIZES": "32"}
        with open(folder / "server.log", "w+b") as log_file:
            server, port = start_local_server(".", env, log_file)
            try:
                await wait_listening(server, port, log_file)
                url = f"http://127.0.0.1:{port}"
                await through_batch_api(url, warm)
                await through_batch_file(url, warm, folder / "warm-out.jsonl")
                times: dict[str, list[float]] = {"batch_api": [], "batch_file": []}
                for round_number in range(rounds):
                    order = ("batch_api", "batch_file")
                    for variant in order if round_number % 2 == 0 else order[::-1]:
                        if variant == "batch_api":
                            elapsed = await through_batch_api(url, source)
                        else:
                            elapsed = await through_batch_file(url, source, folder / "out.jsonl")
                        times[variant].append(elapsed)
                        print(f"round {round_number}: {variant} {lines / elapsed:.0f} lines/s")
            finally:
                stop_server(server)
    ratios = [f / a for a, f in zip(times["batch_api"], times["batch_file"], strict=True)]
    return {
        "lines": lines,
        "rounds": rounds,
        "batch_api_lines_per_s": lines / statistics.median(times["batch_api"]),
        "batch_file_lines_per_s": lines / statistics.median(times["batch_file"]),
        "ratio": statistics.median(ratios),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    offline()
    result = asyncio.run(compare(args.lines, args.rounds))
    print(json.dumps(result, indent=2))
    print(
        f"Batch API {result['batch_api_lines_per_s']:.0f} lines/s, batch file "
        f"{result['batch_file_lines_per_s']:.0f} lines/s: {result['ratio']:.2f}x"
    )


if __name__ == "__main__":
    main()
