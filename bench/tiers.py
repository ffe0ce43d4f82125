"""Service tiers: one-text priority requests while a flex job runs, against an idle worker and
against FIFO (the same work, all at the default tier).

    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.tiers [--flex-texts 2048] [--every-ms 250]

On the bundled all-MiniLM-L6-v2 (DTYPES=auto), in one process: a job of `--flex-texts` medium texts
(about 110 tokens) is sent, and while it runs a one-text request every `--every-ms`; the p50 and p99
latency of those requests, as ratios to the same requests on an idle worker, with the job at the
flex tier and the requests at priority, and with both at the default tier (FIFO).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time

from embedding_worker.config import DEFAULT_MODEL_ID, load_config
from embedding_worker.dispatch import Worker
from embedding_worker.transports.runpod import answer_job

WORDS = "the quick brown fox jumps over a lazy dog near old stone bridges under quiet stars".split()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def latencies(worker: Worker, tier: str, count: int, every_s: float) -> list[float]:
    seconds = []
    for i in range(count):
        started = time.perf_counter()
        reply = await answer_job(worker, {"input": f"question {i}", "service_tier": tier})
        assert reply.ok, reply.body
        seconds.append(time.perf_counter() - started)
        await asyncio.sleep(max(0.0, every_s - seconds[-1]))
    return seconds


async def during_job(
    worker: Worker, texts: list[str], job_tier: str, tier: str, every_s: float
) -> tuple[list[float], float]:
    started = time.perf_counter()
    job = asyncio.ensure_future(answer_job(worker, {"input": texts, "service_tier": job_tier}))
    seconds: list[float] = []
    while not job.done():
        seconds += await latencies(worker, tier, 1, every_s)
    assert (await job).ok
    return seconds, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.tiers", description=__doc__)
    parser.add_argument("--flex-texts", type=int, default=2048)
    parser.add_argument("--every-ms", type=float, default=250)
    args = parser.parse_args()
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(80)) for _ in range(args.flex_texts)]
    every_s = args.every_ms / 1e3

    async def run() -> None:
        worker = Worker.from_config(load_config({"MODEL_NAMES": DEFAULT_MODEL_ID}))
        await worker.start()
        try:
            await answer_job(worker, {"input": texts[:64]})  # warm-up
            idle = await latencies(worker, "priority", 40, every_s)
            tiered, tiered_s = await during_job(worker, texts, "flex", "priority", every_s)
            fifo, fifo_s = await during_job(worker, texts, "default", "default", every_s)
        finally:
            await worker.stop()
        p50, p99 = statistics.median(idle), percentile(idle, 0.99)
        print(f"{args.flex_texts} medium texts in the job; a one-text request every {every_s:g} s")
        print("| requests | count | p50 ms | p99 ms | p50 / idle | p99 / idle | job s |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        rows = [("idle worker", idle, None), ("priority during a flex job", tiered, tiered_s)]
        rows.append(("FIFO: default during a default job", fifo, fifo_s))
        for name, values, job_s in rows:
            q50, q99 = statistics.median(values), percentile(values, 0.99)
            job = f"{job_s:.1f}" if job_s is not None else "-"
            print(
                f"| {name} | {len(values)} | {1e3 * q50:.0f} | {1e3 * q99:.0f} "
                f"| {q50 / p50:.1f} | {q99 / p99:.1f} | {job} |"
            )

    asyncio.run(run())


if __name__ == "__main__":
    main()
