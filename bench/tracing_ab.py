"""The handler with OpenTelemetry traces on against off, and against the raw engine, in one run.

    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.tracing_ab [--model minilm] [--length short]
        [--inputs 1024] [--rounds 21]

One worker on one model (float32) called through the RunPod handler in interleaved rounds of
concurrent 16-input requests: with traces off (twice: the second is the A/A control, the smallest
difference the row resolves), and with traces on, every request a span with its children, encoded
as the OTLP exporter encodes them (the protobuf request, not sent: the figure is the worker's, not a
collector's) and handed over within the round. A plain Infinity engine is the baseline. Prints
paired median ratios of wall and CPU time (> 1 means the first named is faster).
"""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import Sequence
from typing import Any

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

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
from embedding_worker import tracing
from embedding_worker.allocator import keep_freed_memory
from embedding_worker.dispatch import Worker
from embedding_worker.transports.runpod import runpod_handler


class EncodingExporter(SpanExporter):
    """Encodes each batch of spans as an OTLP/HTTP export request, and drops it."""

    def __init__(self) -> None:
        self.spans = 0
        self.bytes = 0

    def export(self, spans: Sequence[Any]) -> SpanExportResult:
        self.spans += len(spans)
        self.bytes += len(encode_spans(spans).SerializePartialToString())
        return SpanExportResult.SUCCESS


async def compare(args: argparse.Namespace) -> None:
    keep_freed_memory(os.environ, None)  # the worker's malloc settings
    config = float32_config(args.model)
    worker = Worker.from_config(config)
    engine = raw_engine(config)
    await engine.astart()
    await worker.start()
    model = worker.registry.models[0]
    texts = texts_of_length(model.tokens.tokenizer, LENGTHS[args.length], args.inputs)
    requests = in_requests(texts)
    handler = runpod_handler(worker)
    jobs = [
        {"id": str(i), "input": {"model": model.served_id, "input": r}}
        for i, r in enumerate(requests)
    ]
    exporter = EncodingExporter()
    assert tracing.configure({}, exporter=exporter)

    async def raw() -> None:
        await asyncio.gather(*(engine.embed(sentences=r) for r in requests))

    async def through_handler() -> None:
        outputs = await asyncio.gather(*(handler(job) for job in jobs))
        if any("error" in output for output in outputs):
            raise RuntimeError(outputs[0])

    async def untraced() -> None:
        with tracing.suspended():
            await through_handler()

    async def traced() -> None:
        await through_handler()
        await asyncio.to_thread(tracing.flush)  # the round pays for encoding its own spans

    variants = {"engine": raw, "off": untraced, "off again": untraced, "on": traced}
    await interleaved(variants, 2)  # warm-up
    exporter.spans = exporter.bytes = 0
    cpu: dict[str, list[float]] = {}
    times = await interleaved(variants, args.rounds, cpu)
    for a, b in (("on", "off"), ("off again", "off"), ("off", "engine"), ("on", "engine")):
        print(
            f"{args.model} {args.length} x{args.inputs}, {args.rounds} rounds: tracing {a} / {b}: "
            f"wall {paired_ratio(times, a, b):.3f}, CPU {paired_ratio(cpu, a, b):.3f}"
        )
    traced_requests = args.rounds * len(requests)
    each, size = exporter.spans / traced_requests, exporter.bytes / traced_requests
    print(
        f"spans exported: {exporter.spans} for {traced_requests} requests "
        f"({each:.1f} a request, {size:.0f} bytes of OTLP a request)"
    )
    tracing.shutdown()
    await engine.astop()
    await worker.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.tracing_ab",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", choices=FULL_MODELS, default="minilm")
    parser.add_argument("--length", choices=list(LENGTHS), default="short")
    parser.add_argument("--inputs", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=21)
    asyncio.run(compare(parser.parse_args()))


if __name__ == "__main__":
    main()
