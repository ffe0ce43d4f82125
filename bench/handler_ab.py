"""The handler with and without one of its optimisations, against the raw engine, in one run.

    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.handler_ab --without reuse [--model minilm]
        [--length short] [--inputs 1024] [--rounds 41] [--glibc-malloc]

--without reuse: one tokenization per text off (engines/tokenization.py): Infinity tokenizes the
texts again.
--without turn-wake: the paced queue wakes Infinity's publisher at each submission, not at the end
of the event loop's turn (engines/scheduler.py).
--without full-wake: a full batch submitted during a turn of the event loop waits for the turn's
end (engines/scheduler.py), instead of going to the model at once.

Two workers on one model (float32; the bundled MiniLM or a random-initialised one of bench.common's
shapes), one of them with the optimisation off, and a plain Infinity engine, called in interleaved
rounds of concurrent 16-input requests. Prints paired median ratios of wall and CPU time (> 1 means
the first named is faster), and each variant's median time from a round's start to its first
forward pass.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import statistics
import time
from typing import Any

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
from embedding_worker.allocator import keep_freed_memory
from embedding_worker.dispatch import Worker
from embedding_worker.engines import ModelRegistry
from embedding_worker.engines.infinity_adapter import replicas
from embedding_worker.engines.spec import Optimisations
from embedding_worker.transports.runpod import runpod_handler

# Each --without choice: the optimisation it switches off (engines.spec.Optimisations).
OPTIMISATIONS = {
    "reuse": "reuse_token_ids",
    "turn-wake": "turn_end_wake",
    "full-wake": "full_batch_wake",
}


async def compare(args: argparse.Namespace) -> None:
    # the worker's malloc settings, unless told otherwise
    keep_freed_memory(os.environ, False if args.glibc_malloc else None)
    config = float32_config(args.model)
    switched_off = Optimisations(**{OPTIMISATIONS[args.without]: False})
    settings = dataclasses.replace(config.engine_settings, optimisations=switched_off)
    full = Worker.from_config(config)
    without = Worker(config, ModelRegistry.load(config.models, settings))
    engine = raw_engine(config)
    await engine.astart()
    await full.start()
    await without.start()
    model = without.registry.models[0]
    served = model.served_id
    texts = texts_of_length(model.tokens.tokenizer, LENGTHS[args.length], args.inputs)
    requests = in_requests(texts)

    # Seconds from each round's start to its first forward pass, per variant.
    first_forward: dict[str, list[float]] = {}
    round_start: dict[str, float] = {}

    def watch_first_forward(name: str, replica: Any) -> None:
        forward = replica.encode_core

        def timed(*args: Any) -> Any:
            if name in round_start:
                since = time.perf_counter() - round_start.pop(name)
                first_forward.setdefault(name, []).append(since)
            return forward(*args)

        replica.encode_core = timed

    async def raw() -> None:
        round_start["engine"] = time.perf_counter()
        await asyncio.gather(*(engine.embed(sentences=r) for r in requests))

    def through(name: str, worker: Worker):
        handler = runpod_handler(worker)

        async def call() -> None:
            jobs = [
                {"id": str(i), "input": {"model": served, "input": r}}
                for i, r in enumerate(requests)
            ]
            round_start[name] = time.perf_counter()
            outputs = await asyncio.gather(*(handler(job) for job in jobs))
            if any("error" in output for output in outputs):
                raise RuntimeError(outputs[0])

        return call

    off = f"without {args.without}"
    variants = {"engine": raw, "handler": through("handler", full), off: through(off, without)}
    await interleaved(variants, 2)  # warm-up
    handler_engine = full.registry.models[0].engine
    for name, subject in (("engine", engine), ("handler", handler_engine), (off, model.engine)):
        watch_first_forward(name, replicas(subject)[0])
    cpu: dict[str, list[float]] = {}
    times = await interleaved(variants, args.rounds, cpu)
    for a, b in (("handler", "engine"), (off, "engine"), ("handler", off)):
        print(
            f"{args.model} {args.length} x{args.inputs}, {args.rounds} rounds: {a} / {b}: "
            f"wall {paired_ratio(times, a, b):.3f}, CPU {paired_ratio(cpu, a, b):.3f}"
        )
    firsts = ", ".join(
        f"{name} {1e3 * statistics.median(seconds):.1f} ms"
        for name, seconds in first_forward.items()
    )
    print(f"first forward pass after (median): {firsts}")
    await engine.astop()
    await full.stop()
    await without.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.handler_ab",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--without", choices=list(OPTIMISATIONS), required=True)
    parser.add_argument("--model", choices=FULL_MODELS, default="minilm")
    parser.add_argument("--length", choices=list(LENGTHS), default="short")
    parser.add_argument("--inputs", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=41)
    parser.add_argument(
        "--glibc-malloc",
        action="store_true",
        help="glibc's default malloc settings, not the worker's "
        "(src/embedding_worker/allocator.py)",
    )
    asyncio.run(compare(parser.parse_args()))


if __name__ == "__main__":
    main()
