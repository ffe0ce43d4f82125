"""Service tiers: one-text priority requests while a flex job runs, against an idle worker and
against FIFO (the same work, all at the default tier).

    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.tiers [--flex-texts 2048] [--every-ms 250]
        [--model minilm|llm-reranker]

On the bundled all-MiniLM-L6-v2 (DTYPES=auto), in one process: a job of `--flex-texts` medium texts
(about 110 tokens) is sent, and while it runs a one-text request every `--every-ms`; the p50 and p99
latency of those requests, as ratios to the same requests on an idle worker, with the job at the
flex tier and the requests at priority, and with both at the default tier (FIFO). With
`--model llm-reranker`, the same on a random Qwen3-Reranker-shaped model (tests/model_factory.py:
hidden 256, 4 layers, float32, batch 16): a rerank job of `--flex-texts` documents, and one-document
rerank requests. Each table also gives one batch's median seconds (the model's forward pass, timed
alone), against which the priority p50 is bounded: at most 2 x idle plus one batch.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
from pathlib import Path

from embedding_worker.config import DEFAULT_MODEL_ID, load_config
from embedding_worker.dispatch import Worker
from embedding_worker.transports.runpod import answer_job

WORDS = "the quick brown fox jumps over a lazy dog near old stone bridges under quiet stars".split()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class Bodies:
    """The jobs of one model: a big one of `texts`, and a one-input request."""

    def __init__(self, rerank_model: str | None) -> None:
        self.rerank_model = rerank_model

    def job(self, texts: list[str], tier: str) -> dict:
        if self.rerank_model:
            return {"model": self.rerank_model, "query": "which is it", "documents": texts}
        return {"input": texts, "service_tier": tier}

    def one(self, i: int, tier: str) -> dict:
        if self.rerank_model:
            body = {
                "model": self.rerank_model,
                "query": f"question {i}",
                "documents": ["an answer"],
            }
            return {**body, "service_tier": tier}
        return {"input": f"question {i}", "service_tier": tier}


BODIES = Bodies(None)


async def latencies(worker: Worker, tier: str, count: int, every_s: float) -> list[float]:
    seconds = []
    for i in range(count):
        started = time.perf_counter()
        reply = await answer_job(worker, BODIES.one(i, tier))
        assert reply.ok, reply.body
        seconds.append(time.perf_counter() - started)
        await asyncio.sleep(max(0.0, every_s - seconds[-1]))
    return seconds


async def during_job(
    worker: Worker, texts: list[str], job_tier: str, tier: str, every_s: float
) -> tuple[list[float], float]:
    started = time.perf_counter()
    body = {**BODIES.job(texts, job_tier), "service_tier": job_tier}
    job = asyncio.ensure_future(answer_job(worker, body))
    seconds: list[float] = []
    while not job.done():
        seconds += await latencies(worker, tier, 1, every_s)
    assert (await job).ok
    return seconds, time.perf_counter() - started


class BatchSeconds:
    """A scheduler observer (engines.scheduler.BatchObserver): the model seconds of full batches."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self.seconds: list[float] = []

    def batch_formed(self, model: str, tier: str, rows: int, tokens: int, padded: int) -> None:
        pass

    def batch_finished(self, model: str, rows: int, seconds: float) -> None:
        if rows >= self.batch_size:
            self.seconds.append(seconds)


def main() -> None:
    global BODIES
    parser = argparse.ArgumentParser(prog="python -m bench.tiers", description=__doc__)
    parser.add_argument("--flex-texts", type=int, default=2048)
    parser.add_argument("--every-ms", type=float, default=250)
    parser.add_argument("--model", choices=["minilm", "llm-reranker"], default="minilm")
    args = parser.parse_args()
    rng = random.Random(0)
    words = 80 if args.model == "minilm" else 40
    texts = [" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(args.flex_texts)]
    every_s = args.every_ms / 1e3
    # Admission's measured pace comes from the idle phase's one-input requests, far below the
    # model's throughput: a fixed bound keeps the job and the requests in (admission is not measured
    # here).
    env = {"MODEL_NAMES": DEFAULT_MODEL_ID, "MAX_QUEUED_TOKENS": "100000000"}
    if args.model == "llm-reranker":
        from tests import model_factory

        folder = tempfile.mkdtemp(prefix="bench-tiers-")
        path = model_factory.make_qwen3_reranker(
            Path(folder) / "qwen3-reranker",
            hidden_size=256,
            num_layers=4,
            head_dim=32,
            intermediate_size=512,
        )
        env = {**env, "MODEL_NAMES": str(path), "BATCH_SIZES": "16", "DTYPES": "float32"}

    async def run() -> None:
        global BODIES
        worker = Worker.from_config(load_config(env))
        await worker.start()
        model = worker.registry.models[0]
        if args.model == "llm-reranker":
            BODIES = Bodies(model.served_id)
        batches = BatchSeconds(model.spec.batch_size)
        model.scheduler.observers.append(batches)
        try:
            await answer_job(worker, BODIES.job(texts[:64], "default"))  # warm-up
            idle = await latencies(worker, "priority", 40, every_s)
            tiered, tiered_s = await during_job(worker, texts, "flex", "priority", every_s)
            fifo, fifo_s = await during_job(worker, texts, "default", "default", every_s)
        finally:
            await worker.stop()
        p50, p99 = statistics.median(idle), percentile(idle, 0.99)
        batch_s = statistics.median(batches.seconds) if batches.seconds else float("nan")
        print(
            f"{args.model}: {args.flex_texts} medium inputs in the job; a one-input request every "
            f"{every_s:g} s; one full batch {1e3 * batch_s:.0f} ms"
        )
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
        bound = 2 * p50 + batch_s
        tiered_p50 = statistics.median(tiered)
        verdict = "within" if tiered_p50 <= bound else "over"
        print(
            f"priority p50 during the flex job {1e3 * tiered_p50:.0f} ms: {verdict} the bound "
            f"2 x idle + one batch = {1e3 * bound:.0f} ms"
        )

    asyncio.run(run())


if __name__ == "__main__":
    main()
