"""Load through the RunPod handler in-process, against the raw Infinity engine as the baseline.

    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.load [--jobs 4000] [--concurrency 300]
        [--model tiny|minilm] [--rounds 3]

Both runs send the same jobs (1 to 4 short texts each) at the same concurrency, in the same
process: the baseline awaits a plain `AsyncEmbeddingEngine.embed` (bench/baseline.py); the worker
run goes through runpod's `run_job` and the worker's handler (validation, limits, tokenizer counts,
encoding). It prints jobs/s, latency percentiles, the worker/engine throughput ratio (paired,
interleaved rounds) and the RSS growth.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench.baseline import raw_engine
from embedding_worker.config import DEFAULT_MODEL_ID, load_config
from embedding_worker.dispatch import Worker
from embedding_worker.transports.runpod import import_runpod, runpod_handler

WORDS = "alpha beta gamma delta river stone cloud paper light green quick slow open".split()


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def make_jobs(count: int, seed: int) -> list[list[str]]:
    rng = random.Random(seed)
    pool = [f"{i} " + " ".join(rng.choices(WORDS, k=rng.randint(1, 40))) for i in range(300)]
    return [rng.sample(pool, rng.randint(1, 4)) for _ in range(count)]


async def timed(
    calls: list[Callable[[], Awaitable[Any]]], concurrency: int
) -> tuple[float, list[float]]:
    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []

    async def one(call: Callable[[], Awaitable[Any]]) -> None:
        async with gate:
            started = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(one(c) for c in calls))
    return time.perf_counter() - started, sorted(latencies)


def pct(values: list[float], p: float) -> float:
    return 1e3 * values[min(len(values) - 1, int(p * len(values)))]


async def compare(args: argparse.Namespace) -> None:
    # runpod as the worker imports it (its settings, its quieter start); then its job runner
    import_runpod()
    from runpod.serverless.modules.rp_job import run_job

    if args.model == "tiny":
        from tests.model_factory import make_bert_embedder

        source = str(make_bert_embedder(Path(tempfile.mkdtemp()) / "tiny-bert-embedder"))
    else:
        source = DEFAULT_MODEL_ID
    worker = Worker.from_config(load_config({"MODEL_NAMES": source, "DTYPES": "float32"}))
    await worker.start()
    engine = raw_engine(worker.config)
    await engine.astart()
    model = worker.registry.models[0]
    handler = runpod_handler(worker)
    jobs = make_jobs(args.jobs, seed=1)

    async def engine_call(texts: list[str]) -> None:
        await engine.embed(sentences=texts)

    def worker_job(i: int, texts: list[str]) -> Callable[[], Awaitable[Any]]:
        job = {"id": f"job-{i}", "input": {"model": model.served_id, "input": texts}}
        return lambda: run_job(handler, job)

    # Warm-up of both: each has its own copy of the model, whose first batches allocate.
    await timed([lambda t=t: engine_call(t) for t in jobs[:200]], args.concurrency)
    await timed([worker_job(i, t) for i, t in enumerate(jobs[:200])], args.concurrency)
    # Interleaved rounds, the ratio paired by round: the machine's load falls on both alike.
    base_runs, work_runs = [], []
    rss_before = rss_mib()
    for _ in range(args.rounds):
        engine_calls = [lambda t=t: engine_call(t) for t in jobs]
        base_runs.append(await timed(engine_calls, args.concurrency))
        worker_calls = [worker_job(i, t) for i, t in enumerate(jobs)]
        work_runs.append(await timed(worker_calls, args.concurrency))
    rss_after = rss_mib()
    await worker.stop()
    await engine.astop()

    n = len(jobs)
    base_s, base_lat = min(base_runs, key=lambda run: run[0])
    work_s, work_lat = min(work_runs, key=lambda run: run[0])
    ratio = statistics.median(b[0] / w[0] for b, w in zip(base_runs, work_runs))
    texts = sum(map(len, jobs))
    print(f"model {model.served_id}, {n} jobs ({texts} texts), concurrency {args.concurrency}")
    rows = (("engine alone", base_s, base_lat), ("worker", work_s, work_lat))
    for name, seconds, latencies in rows:
        print(
            f"{name:13}: {n / seconds:7.0f} jobs/s  p50 {pct(latencies, 0.5):6.0f} ms  "
            f"p99 {pct(latencies, 0.99):6.0f} ms  (best round)"
        )
    print(f"worker / engine throughput: {ratio:.2f} (median of {args.rounds} paired rounds)")
    print(f"RSS {rss_before:.0f} -> {rss_after:.0f} MiB over the {args.rounds} rounds")


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.load",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--jobs", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=300)
    parser.add_argument("--model", choices=("tiny", "minilm"), default="tiny")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RUNPOD_DEBUG_LEVEL", "WARN")  # runpod prints a line per job at INFO
    asyncio.run(compare(args))


if __name__ == "__main__":
    main()
