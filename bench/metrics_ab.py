"""What metrics cost: the handler with metrics on and off against the raw engine, and one scrape.

    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.metrics_ab [--model minilm] [--length short]
        [--inputs 1024] [--rounds 21] [--scrapes 200] [--hook-calls 20000]

Two workers on one model (float32), one with METRICS=false, and two identical raw Infinity engines
(the A/A control), called in interleaved rounds of concurrent 16-input requests through the RunPod
handler. Prints paired median ratios of wall and CPU time (> 1: the first named is faster). On a
shared machine those ratios resolve no better than the A/A row, so the CPU that metrics add to a
request is also measured alone, in a loop, against the handler's CPU a request.

Then the cost of one scrape of a worker serving 5 models, each seen on several routes, at every
tier, with successes and two kinds of failure (the series a busy worker exports): the median time
of `GET /metrics`'s body, its size and series, and that time over the handler's time a request.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import statistics
import time

from bench.baseline import raw_engine
from bench.common import (
    FULL_MODELS,
    LENGTHS,
    float32_config,
    in_requests,
    interleaved,
    paired_ratio,
    texts_of_length,
)
from embedding_worker import operations
from embedding_worker.allocator import keep_freed_memory
from embedding_worker.dispatch import Worker, route_label
from embedding_worker.engines.tokenization import counted
from embedding_worker.metrics import Metrics, RequestRecord, tag_inputs
from embedding_worker.tiers import TIERS
from embedding_worker.transports.runpod import runpod_handler

SCRAPE_MODELS = 5
# What each model of the scrape has seen: these routes, every tier, these outcomes.
SCRAPE_ROUTES = ("/v1/embeddings", "/v1/rerank", "/v1/models/{model}", "/embeddings")
SCRAPE_OUTCOMES = ((200, None), (400, "invalid_input"), (429, "queue_full"))


def busy_metrics() -> Metrics:
    """Metrics of a worker serving SCRAPE_MODELS models, with every series a busy one has."""
    ids = [f"org/model-{i}" for i in range(SCRAPE_MODELS)]
    metrics = Metrics(ids, [route_label(op) for op in operations.OPERATIONS])
    for served_id in ids:
        model = metrics.models[served_id]
        model.batch_formed([12] * 32, [])
        for route in SCRAPE_ROUTES:
            for tier in TIERS:
                for status, code in SCRAPE_OUTCOMES:
                    now = time.perf_counter()
                    record = RequestRecord(now - 0.02, route, tier, served_id, 16, 200)
                    record.entered, record.handed, record.answered = now - 0.015, now - 0.01, now
                    metrics.finish(record, status, code)
    return metrics


def hooks_cpu_per_request(texts_per_request: int, calls: int) -> float:
    """CPU seconds of everything metrics add to one request, measured alone: dispatch's record and
    its `finish`, the engine's marks on the texts and the queue depth's two changes, and half of a
    32-row batch's report (two requests of 16 texts fill one batch)."""
    metrics = Metrics(["org/model"], [route_label(op) for op in operations.OPERATIONS])
    model = metrics.models["org/model"]
    texts = counted([f"text {i}" for i in range(texts_per_request)], [12] * texts_per_request)
    lengths = [12] * 2 * texts_per_request
    started = time.process_time()
    for i in range(calls):
        now = time.perf_counter()
        record = RequestRecord(now, "/v1/embeddings", "default")
        record.model, record.entered = "org/model", now
        tag_inputs(texts, record)
        model.queue_changed(1, texts_per_request)
        if i % 2:
            model.batch_formed(lengths, texts + texts)
        model.queue_changed(1, -texts_per_request)
        record.answered, record.inputs, record.tokens = now, texts_per_request, 200
        metrics.finish(record, 200, None)
    return (time.process_time() - started) / calls


async def compare(args: argparse.Namespace) -> None:
    keep_freed_memory(os.environ, None)  # the worker's malloc settings
    config = float32_config(args.model)
    on = Worker.from_config(config)
    off = Worker.from_config(dataclasses.replace(config, metrics=False))
    assert on.metrics is not None and off.metrics is None
    engine, control = raw_engine(config), raw_engine(config)
    for subject in (engine, control):
        await subject.astart()
    await on.start()
    await off.start()
    served = on.registry.models[0].served_id
    tokenizer = on.registry.models[0].tokens.tokenizer
    requests = in_requests(texts_of_length(tokenizer, LENGTHS[args.length], args.inputs))

    def raw(subject):
        async def call() -> None:
            await asyncio.gather(*(subject.embed(sentences=r) for r in requests))

        return call

    def through(worker: Worker):
        handler = runpod_handler(worker)

        async def call() -> None:
            jobs = [
                {"id": str(i), "input": {"model": served, "input": r}}
                for i, r in enumerate(requests)
            ]
            outputs = await asyncio.gather(*(handler(job) for job in jobs))
            if any("error" in output for output in outputs):
                raise RuntimeError(outputs[0])

        return call

    variants = {
        "engine": raw(engine),
        "engine A/A": raw(control),
        "metrics on": through(on),
        "metrics off": through(off),
    }
    await interleaved(variants, 2)  # warm-up
    cpu: dict[str, list[float]] = {}
    times = await interleaved(variants, args.rounds, cpu)
    where = f"{args.model} {args.length} x{args.inputs}, {args.rounds} rounds"
    for a, b in (
        ("engine A/A", "engine"),
        ("metrics on", "engine"),
        ("metrics off", "engine"),
        ("metrics on", "metrics off"),
    ):
        print(
            f"{where}: {a} / {b}: wall {paired_ratio(times, a, b):.3f}, "
            f"CPU {paired_ratio(cpu, a, b):.3f}"
        )
    per_request = statistics.median(times["metrics on"]) / len(requests)
    cpu_per_request = statistics.median(cpu["metrics off"]) / len(requests)
    hooks = hooks_cpu_per_request(texts_per_request=len(requests[0]), calls=args.hook_calls)
    print(
        f"the metrics' own CPU a request of {len(requests[0])} texts (dispatch's record, the "
        f"engine's marks and queue depth, half a batch), {args.hook_calls} in a loop: "
        f"{1e6 * hooks:.1f} us, {hooks / cpu_per_request:.4f} of the handler's CPU a request "
        f"with metrics off ({1e3 * cpu_per_request:.2f} ms)"
    )

    metrics = busy_metrics()
    healthy = dict.fromkeys(metrics.models, True)
    body = metrics.exposition(healthy)
    wall, cpu_s = [], []
    for _ in range(args.scrapes):
        started, started_cpu = time.perf_counter(), time.process_time()
        metrics.exposition(healthy)
        wall.append(time.perf_counter() - started)
        cpu_s.append(time.process_time() - started_cpu)
    scrape, scrape_cpu = statistics.median(wall), statistics.median(cpu_s)
    series = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
    print(
        f"one scrape at {SCRAPE_MODELS} models ({series} series, {len(body)} bytes), median of "
        f"{args.scrapes}: wall {1e3 * scrape:.2f} ms, CPU {1e3 * scrape_cpu:.2f} ms: "
        f"{100 * scrape_cpu / 15:.2f}% of a core at a 15 s scrape interval; "
        f"{scrape / per_request:.2f}x the handler's wall time a {LENGTHS[args.length]}-token "
        f"x16 request in these rounds ({1e3 * per_request:.2f} ms)"
    )
    for subject in (engine, control):
        await subject.astop()
    await on.stop()
    await off.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.metrics_ab",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", choices=FULL_MODELS, default="minilm")
    parser.add_argument("--length", choices=list(LENGTHS), default="short")
    parser.add_argument("--inputs", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--scrapes", type=int, default=200)
    parser.add_argument("--hook-calls", type=int, default=20000)
    asyncio.run(compare(parser.parse_args()))


if __name__ == "__main__":
    main()
